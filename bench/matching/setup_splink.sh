#!/usr/bin/env bash
# Splink gets its own venv: it must never be installed next to crmhub (and its `dedupe`).
# Usage: bench/matching/setup_splink.sh [VENV]   (default /tmp/splink-venv)
set -euo pipefail
venv="${1:-/tmp/splink-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet 'splink>=5,<6' 'duckdb>=1.1'
"$venv/bin/python" -c "import splink, duckdb; print('splink', splink.__version__, 'duckdb', duckdb.__version__)"
