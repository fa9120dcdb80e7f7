#!/usr/bin/env bash
# Installs Debian's chromium for the chat-page browser test (tests/test_serving_browser.py), once.
# Idempotent: does nothing when /usr/bin/chromium is already there. Never downloads a browser build
# of its own (Playwright drives this binary via executable_path), since only Debian/PyPI/npm are reachable.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi
echo "installing Debian's chromium for the browser test (one-time, ~1 min)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
