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

COMPONENT=agent
PREFIX=${MICBOARD_PREFIX:-/opt/micboard-agent}
CONFIG_DIR=${MICBOARD_CONFIG_DIR:-/etc/micboard}
UNIT_DIR=${MICBOARD_UNIT_DIR:-/etc/systemd/system}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=deploy/install-common.sh
. "$HERE/../install-common.sh"

prepare_python "Raspberry Pi OS Bookworm has 3.11"
install_packages "$@" -- "$REPO/shared" "$REPO/agent"
install_unit
install_template agent.toml "edit site, agent and the interface address"
install_template agent.env "NATS URL and credentials"
reload_systemd
say "done. Check the settings with:"
say "  sudo sh -c 'set -a; . $CONFIG_DIR/agent.env; [ -f $CONFIG_DIR/nats.nk ] && MICBOARD_NATS_NKEY_SEED_FILE=$CONFIG_DIR/nats.nk; [ -f $CONFIG_DIR/nats-ca.pem ] && MICBOARD_NATS_TLS_CA=$CONFIG_DIR/nats-ca.pem; $PREFIX/bin/micboard-agent check --config $CONFIG_DIR/agent.toml'"
say "then start it with: sudo systemctl enable --now micboard-agent"
