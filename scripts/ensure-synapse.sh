#!/usr/bin/env bash
# Make sure a Synapse (Matrix homeserver) is installed for tests/matrix.rs.
# It lives in a cached venv, `$STARGAZER_SYNAPSE_VENV` or
# `$HOME/.cache/stargazer/synapse-venv`, created with `pip install matrix-synapse`
# when missing and reused afterwards. Prints the venv path on stdout; nothing here
# starts a homeserver (each test binary starts private ones on free ports).
set -euo pipefail
VENV="${STARGAZER_SYNAPSE_VENV:-$HOME/.cache/stargazer/synapse-venv}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import synapse' >/dev/null 2>&1 \
  && [ -x "$VENV/bin/register_new_matrix_user" ]; then
  echo "$VENV"
  exit 0
fi
PY="${STARGAZER_PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1 || ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  # A fresh Debian has no python3-venv: take Debian's packages.
  echo "python3 with venv not found: installing Debian's python3-venv" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >&2
  PY=python3
fi
echo "synapse not found in $VENV: installing matrix-synapse (about a minute)" >&2
start=$(date +%s)
mkdir -p "$(dirname "$VENV")"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check matrix-synapse >&2
"$VENV/bin/python" -c 'import synapse' >&2
echo "synapse installed in $(( $(date +%s) - start )) s" >&2
echo "$VENV"
