#!/usr/bin/env bash
# The Python worker package (python/): install it with its test extras into a
# venv (.venv-python/, reused), `mypy --strict` it, and run its pytest suite
# against a private redis-server. The cross-language tests use
# target/debug/stargazer (or $STARGAZER_BIN) when it is built, else they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
VENV="${STARGAZER_PYTHON_VENV:-.venv-python}"
PY="${STARGAZER_PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  if ! command -v "$PY" >/dev/null 2>&1 || ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    # A fresh Debian has no python3-venv: take Debian's packages.
    echo "python3 with venv not found: installing Debian's python3-venv" >&2
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >&2
    PY=python3
  fi
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "./python[test]"
echo "== mypy --strict (python/)"
(cd python && "../$VENV/bin/python" -m mypy --strict)
echo "== pytest (python/)"
cd python
exec "../$VENV/bin/python" -m pytest -q -rs "$@"
