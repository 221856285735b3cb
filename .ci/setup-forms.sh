#!/usr/bin/env bash
# Web forms browser test (tests/web/test_browser.py): Debian's headless Chromium, driven by
# Playwright through `executable_path` (no Playwright browser download). Idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y chromium
