#!/usr/bin/env bash
# Set up (once, including headless Chromium for the browser test) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh --browser
exec .venv/bin/python -m pytest "$@"
