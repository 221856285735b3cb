#!/usr/bin/env bash
# Debian's Chromium for the steward UI browser tests (Playwright drives it by executable_path;
# `playwright install` is never run: it would download a browser build of its own).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium fonts-dejavu-core
