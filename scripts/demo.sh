#!/usr/bin/env bash
# The README's first command: a whole round trip on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
cargo run --quiet --release -- demo
