#!/bin/sh
# Install the micboard agent on Raspberry Pi OS (64-bit, Bookworm or later) in one command:
#
#   sudo sh deploy/pi/install.sh                      # from a checkout of the repository
#   sudo sh deploy/pi/install.sh micboard_agent-*.whl # from built wheels (shared + agent)
#
# It installs python3-venv, creates /opt/micboard-agent, installs the agent into it, installs the
# systemd unit, and writes /etc/micboard/agent.toml and agent.env templates (mode 600) unless
# they exist. It does not start the agent: edit the templates, then
#   sudo systemctl enable --now micboard-agent
set -eu

PREFIX=${MICBOARD_PREFIX:-/opt/micboard-agent}
CONFIG_DIR=${MICBOARD_CONFIG_DIR:-/etc/micboard}
UNIT_DIR=${MICBOARD_UNIT_DIR:-/etc/systemd/system}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

say() { printf 'micboard-agent install: %s\n' "$*"; }
die() { say "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo sh $0)"

if command -v apt-get >/dev/null 2>&1; then
    say "installing python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip >/dev/null
fi
command -v python3 >/dev/null 2>&1 || die "python3 is missing"
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "python3 >= 3.11 is needed (Raspberry Pi OS Bookworm has 3.11)"

say "creating the virtual environment in $PREFIX"
python3 -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install --quiet --upgrade pip

if [ "$#" -gt 0 ]; then
    say "installing $*"
    "$PREFIX/bin/python" -m pip install --quiet "$@"
elif [ -f "$REPO/agent/pyproject.toml" ]; then
    say "installing from $REPO"
    "$PREFIX/bin/python" -m pip install --quiet "$REPO/shared" "$REPO/agent"
else
    die "give the agent wheels as arguments, or run this from a checkout of the repository"
fi
"$PREFIX/bin/micboard-agent" --version >/dev/null || die "the installed agent does not run"

say "installing the systemd unit"
install -m 0644 "$REPO/systemd/micboard-agent.service" "$UNIT_DIR/micboard-agent.service"
if [ "$PREFIX" != /opt/micboard-agent ]; then
    sed -i "s#/opt/micboard-agent#$PREFIX#g" "$UNIT_DIR/micboard-agent.service"
fi

install -d -m 0755 "$CONFIG_DIR"
if [ ! -e "$CONFIG_DIR/agent.toml" ]; then
    say "writing $CONFIG_DIR/agent.toml (edit site, agent and the interface address)"
    install -m 0600 "$HERE/agent.toml" "$CONFIG_DIR/agent.toml"
fi
if [ ! -e "$CONFIG_DIR/agent.env" ]; then
    say "writing $CONFIG_DIR/agent.env (NATS URL and credentials)"
    install -m 0600 "$HERE/agent.env" "$CONFIG_DIR/agent.env"
fi

if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
say "done. Check the settings with:"
say "  sudo $PREFIX/bin/micboard-agent check --config $CONFIG_DIR/agent.toml"
say "then start it with: sudo systemctl enable --now micboard-agent"
