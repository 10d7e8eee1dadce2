#!/usr/bin/env bash
# Set up (once), build the default workspace from data/bundled (once; reused afterwards), start the studio.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/python -m crs_core init
exec .venv/bin/python -m streamlit run app.py --server.headless true "$@"
