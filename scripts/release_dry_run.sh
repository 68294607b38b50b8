#!/usr/bin/env bash
# Release dry run: build the six artefacts (wheel and sdist of micboard-shared, micboard-agent and
# micboard-collector), check them with twine, install the wheels into a fresh virtual environment
# and run both command-line tools. Nothing is published.
#
# Usage: scripts/release_dry_run.sh [--keep]
#   --keep        keep the work directory (dist/ and the venv) and print where it is
# Environment:
#   PYTHON        interpreter that runs build and twine (default: .venv/bin/python, else python3)
#   DIST_DIR      where to put the artefacts (default: a fresh temporary directory)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

keep=0
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "release_dry_run: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/micboard-release.XXXXXX")"
cleanup() {
  if [[ "$keep" == 1 ]]; then
    echo "release_dry_run: kept $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

dist="${DIST_DIR:-$work/dist}"
mkdir -p "$dist"
venv="$work/venv"

step() { printf '\n== %s\n' "$*"; }

step "version"
version="$("$PYTHON" scripts/bump-version.py --current)"
echo "every file says $version"

step "build (python -m build) into $dist"
"$PYTHON" -m build --version >/dev/null 2>&1 || {
  echo "release_dry_run: 'build' is not installed for $PYTHON (it is in the dev dependency group)" >&2
  exit 1
}
for dist_name in shared agent collector; do
  "$PYTHON" -m build "$dist_name" --outdir "$dist"
done

step "artefacts"
ls -l "$dist"
wheels=("$dist"/*.whl)
sdists=("$dist"/*.tar.gz)
if [[ ${#wheels[@]} -ne 3 || ${#sdists[@]} -ne 3 ]]; then
  echo "release_dry_run: expected 3 wheels and 3 sdists, found ${#wheels[@]} and ${#sdists[@]}" >&2
  exit 1
fi

step "twine check"
"$PYTHON" -m twine check --strict "$dist"/*

step "install the wheels into a fresh venv ($venv)"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# The shared wheel first, so the agent's and collector's exact pin on it is met by this build.
"$venv/bin/pip" install --quiet --find-links "$dist" "$dist"/micboard_shared-*.whl
"$venv/bin/pip" install --quiet --find-links "$dist" "$dist"/micboard_agent-*.whl
"$venv/bin/pip" install --quiet --find-links "$dist" "$dist"/micboard_collector-*.whl
"$venv/bin/pip" list 2>/dev/null | grep -i '^micboard'

step "run the tools"
failed=0
for tool in micboard-agent micboard-collector; do
  if [[ ! -x "$venv/bin/$tool" ]]; then
    echo "FAIL: $tool: no such console script in the installed wheels" >&2
    failed=1
    continue
  fi
  if out="$("$venv/bin/$tool" --version 2>&1)"; then
    echo "$tool --version: $out"
    # Wheel metadata normalizes leading zeros (26.01.05 -> 26.1.5), so compare against both forms.
    normalized="$("$venv/bin/python" -c 'import sys; print(".".join(str(int(p)) for p in sys.argv[1].split(".")))' "$version")"
    if [[ "$out" != *"$version"* && "$out" != *"$normalized"* ]]; then
      echo "FAIL: $tool --version does not report $version" >&2
      failed=1
    fi
  else
    echo "FAIL: $tool --version exited non-zero: $out" >&2
    failed=1
  fi
done

if [[ "$failed" != 0 ]]; then
  echo
  echo "release dry run FAILED for $version" >&2
  exit 1
fi
echo
echo "release dry run OK: 6 artefacts for $version built, checked and installed"
