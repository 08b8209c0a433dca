#!/usr/bin/env bash
# Make sure `redis-server`, `redis-cli` (for the cluster tests' `--cluster
# create`) and `openssl` (the TLS tests' certificates) are installed, from
# Debian's packages when missing. Stargazer's demo and tests start private
# servers of their own on free ports; nothing here starts or uses a shared server.
set -euo pipefail
missing=()
if ! command -v redis-server >/dev/null 2>&1 && [ -z "${STARGAZER_REDIS_SERVER:-}" ]; then
  missing+=(redis-server)
fi
if ! command -v redis-cli >/dev/null 2>&1 && [ -z "${STARGAZER_REDIS_CLI:-}" ]; then
  missing+=(redis-tools)
fi
if ! command -v openssl >/dev/null 2>&1; then
  missing+=(openssl)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "not found: installing Debian's ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
# The package may start a system service on 6379; Stargazer's tests never use it.
command -v redis-server >/dev/null || [ -n "${STARGAZER_REDIS_SERVER:-}" ]
