#!/usr/bin/env sh
# Installs what the browser test (tests/browser.rs) needs: Debian's Chromium and its
# chromedriver. Idempotent: does nothing when both are already there.
set -eu
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "chromium and chromedriver are installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update
$SUDO apt-get install -y chromium chromium-driver
