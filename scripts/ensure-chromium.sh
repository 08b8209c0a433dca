#!/usr/bin/env bash
# Make sure a headless Chromium and its WebDriver (`chromedriver`) are
# installed (Debian's `chromium` and `chromium-driver` when missing), for the
# dashboard's browser tests (tests/ui_browser.rs). Idempotent; prints nothing
# when both are there. STARGAZER_CHROMEDRIVER / STARGAZER_CHROMIUM name other
# binaries instead.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
if { [ -n "${STARGAZER_CHROMEDRIVER:-}" ] || have chromedriver; } &&
   { [ -n "${STARGAZER_CHROMIUM:-}" ] || have chromium; }; then
  exit 0
fi
echo "chromium / chromedriver not found: installing Debian's packages" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
# Another installer may hold the dpkg lock for a while (shared machines, CI).
for _ in $(seq 1 60); do
  if $SUDO apt-get update -qq && \
     DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; then
    break
  fi
  echo "apt busy; retrying in 10 s" >&2
  sleep 10
done
have chromedriver && have chromium
