#!/usr/bin/env bash
# The README's second command: every test, against private redis-servers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi
