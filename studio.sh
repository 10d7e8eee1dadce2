#!/usr/bin/env bash
# Set up (once), then start the studio at once; on first start it builds the default workspace from
# data/bundled in the background (about a minute with the shipped review vectors; reused afterwards),
# with progress on Home. `python -m crs_core init` does the same build headless.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh --teacher
CRS_BUILD_DEFAULT=1 exec .venv/bin/python -m streamlit run app.py --server.headless true "$@"
