#!/bin/sh
# Install the micboard collector on a Debian or Ubuntu server in one command:
#
#   sudo sh deploy/collector/install.sh                          # from a checkout of the repository
#   sudo sh deploy/collector/install.sh micboard_collector-*.whl # from built wheels (shared + collector)
#
# It installs python3-venv, creates /opt/micboard-collector, installs the collector (with the
# embedded nats-server) into it, installs the systemd unit and writes an
# /etc/micboard/collector.env template (mode 600) unless it exists. It does not start the
# collector: edit the template, run the check, then
#   sudo systemctl enable --now micboard-collector
set -eu

PREFIX=${MICBOARD_PREFIX:-/opt/micboard-collector}
CONFIG_DIR=${MICBOARD_CONFIG_DIR:-/etc/micboard}
UNIT_DIR=${MICBOARD_UNIT_DIR:-/etc/systemd/system}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

say() { printf 'micboard-collector install: %s\n' "$*"; }
die() { say "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo sh $0)"

if command -v apt-get >/dev/null 2>&1; then
    say "installing python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip >/dev/null
fi
command -v python3 >/dev/null 2>&1 || die "python3 is missing"
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "python3 >= 3.11 is needed"

say "creating the virtual environment in $PREFIX"
python3 -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install --quiet --upgrade pip

if [ "$#" -gt 0 ]; then
    say "installing $*"
    "$PREFIX/bin/python" -m pip install --quiet "$@"
elif [ -f "$REPO/collector/pyproject.toml" ]; then
    say "installing from $REPO"
    "$PREFIX/bin/python" -m pip install --quiet "$REPO/shared[embedded]" "$REPO/collector"
else
    die "give the collector wheels as arguments, or run this from a checkout of the repository"
fi
"$PREFIX/bin/micboard-collector" --version >/dev/null || die "the installed collector does not run"

say "installing the systemd unit"
install -d -m 0755 "$UNIT_DIR"
install -m 0644 "$REPO/systemd/micboard-collector.service" "$UNIT_DIR/micboard-collector.service"
if [ "$PREFIX" != /opt/micboard-collector ]; then
    sed -i "s#/opt/micboard-collector#$PREFIX#g" "$UNIT_DIR/micboard-collector.service"
fi

install -d -m 0755 "$CONFIG_DIR"
if [ ! -e "$CONFIG_DIR/collector.env" ]; then
    say "writing $CONFIG_DIR/collector.env (NATS URL, database URL, HTTP address)"
    install -m 0600 "$HERE/collector.env" "$CONFIG_DIR/collector.env"
fi

if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
say "done. Check the settings, the database and NATS with:"
say "  sudo sh -c 'set -a; . $CONFIG_DIR/collector.env; $PREFIX/bin/micboard-collector check'"
say "migrate a PostgreSQL database with: ... micboard-collector migrate (SQLite migrates itself)"
say "then start it with: sudo systemctl enable --now micboard-collector"
