#!/usr/bin/env bash
# The fault-injection suite, bounded for CI: builds the binaries, then runs
# `stargazer-faults` for a few minutes against a private redis-server and
# three real gateways with the shipped defaults (see docs/faults.md).
#
#   scripts/faults.sh                      # 150 s of faults, a random seed (printed)
#   SEED=1234 scripts/faults.sh            # replay a seed
#   scripts/faults.sh --duration 30m       # the long run; any flag is passed on
#
# Exit code: 0 when no guarantee was violated, 1 when one was, 2 when the
# suite could not run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
cargo build --bins
seed="${SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"
echo "stargazer-faults seed: $seed"
exec ./target/debug/stargazer-faults --seed "$seed" --duration 150s "$@"
