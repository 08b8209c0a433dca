#!/usr/bin/env bash
# Make sure `redis-server` is installed (Debian's package when missing).
# Stargazer's demo and tests start private servers of their own on free
# ports; nothing here starts or uses a shared server.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 || [ -n "${STARGAZER_REDIS_SERVER:-}" ]; then
  exit 0
fi
echo "redis-server not found: installing Debian's package" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
# The package may start a system service on 6379; Stargazer's tests never use it.
command -v redis-server >/dev/null
