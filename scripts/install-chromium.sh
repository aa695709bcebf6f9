#!/usr/bin/env bash
# Headless Chromium for the browser tests: Debian's package, installed once.
set -euo pipefail
if command -v chromium >/dev/null; then
    exit 0
fi
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
$SUDO apt-get install -y -q chromium >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
command -v chromium
