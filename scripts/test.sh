#!/usr/bin/env bash
# The README's second command: every test, against private redis-servers
# (and, for tests/matrix.rs, private Synapse homeservers from a cached venv;
# for tests/ui_browser.rs, Debian's headless Chromium and chromedriver).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
scripts/ensure-chromium.sh   # the dashboard's browser tests (tests/ui_browser.rs)
STARGAZER_SYNAPSE_VENV="$(scripts/ensure-synapse.sh)"
export STARGAZER_SYNAPSE_VENV
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi
scripts/test-python.sh
