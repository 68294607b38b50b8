# Shared steps of deploy/pi/install.sh and deploy/collector/install.sh; sourced by them, not run.
# The caller sets COMPONENT (agent or collector), PREFIX, CONFIG_DIR, UNIT_DIR, HERE and REPO.

say() { printf 'micboard-%s install: %s\n' "$COMPONENT" "$*"; }
die() { say "$*" >&2; exit 1; }

# Root, python3 >= 3.11 with venv (installed with apt where there is apt). $1: a hint for an old python.
prepare_python() {
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo sh $0)"
    if command -v apt-get >/dev/null 2>&1; then
        say "installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip >/dev/null
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is missing"
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "python3 >= 3.11 is needed${1:+ ($1)}"
}

# The virtual environment in $PREFIX with the given wheels (and $WHEEL_EXTRAS, what the
# checkout's extras would add), or else the checkout's packages (the arguments after --); then
# checks that micboard-$COMPONENT runs.
install_packages() {
    say "creating the virtual environment in $PREFIX"
    python3 -m venv "$PREFIX"
    "$PREFIX/bin/python" -m pip install --quiet --upgrade pip
    wheels=""
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
        wheels="$wheels $1"
        shift
    done
    [ "$#" -gt 0 ] && shift  # the --
    if [ -n "$wheels" ]; then
        say "installing$wheels"
        # shellcheck disable=SC2086 # one argument per wheel
        "$PREFIX/bin/python" -m pip install --quiet $wheels
        if [ -n "${WHEEL_EXTRAS:-}" ]; then
            say "installing $WHEEL_EXTRAS"
            # shellcheck disable=SC2086 # one argument per requirement
            "$PREFIX/bin/python" -m pip install --quiet $WHEEL_EXTRAS
        fi
    elif [ -f "$REPO/$COMPONENT/pyproject.toml" ]; then
        say "installing from $REPO"
        "$PREFIX/bin/python" -m pip install --quiet "$@"
    else
        die "give the $COMPONENT wheels as arguments, or run this from a checkout of the repository"
    fi
    "$PREFIX/bin/micboard-$COMPONENT" --version >/dev/null || die "the installed $COMPONENT does not run"
}

# The systemd unit, pointed at $PREFIX.
install_unit() {
    unit="micboard-$COMPONENT.service"
    say "installing the systemd unit"
    install -d -m 0755 "$UNIT_DIR"
    install -m 0644 "$REPO/systemd/$unit" "$UNIT_DIR/$unit"
    if [ "$PREFIX" != "/opt/micboard-$COMPONENT" ]; then
        sed -i "s#/opt/micboard-$COMPONENT#$PREFIX#g" "$UNIT_DIR/$unit"
    fi
    if [ "$CONFIG_DIR" != "/etc/micboard" ]; then
        # The unit reads its settings (and the agent its agent.toml credential) from there.
        sed -i "s#/etc/micboard/#$CONFIG_DIR/#g" "$UNIT_DIR/$unit"
    fi
    install -d -m 0755 "$CONFIG_DIR"
}

# A template from $HERE into $CONFIG_DIR (mode 600) unless it exists. $1: file, $2: what to edit.
install_template() {
    if [ ! -e "$CONFIG_DIR/$1" ]; then
        say "writing $CONFIG_DIR/$1 ($2)"
        install -m 0600 "$HERE/$1" "$CONFIG_DIR/$1"
    fi
}

reload_systemd() {
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
}
