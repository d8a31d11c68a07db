#!/usr/bin/env bash
# Screenshots of a retrain run in the Prefect UI, taken by the browser test (tests/test_ui.py):
# a real `prefect server` on 127.0.0.1, `retrain run` against it, Debian's headless Chromium.
#
#   bash benchmarks/ui_screenshots.sh [OUT_DIR]      # default benchmarks/results/ui (not committed)
#
# Writes retrain-run-artifacts.png (the flow-run page, Artifacts tab) and retrain-run-plots.png
# (the plots artifact: montage, training progress, confusion chart). Needs Chromium
# (apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/ui}"
mkdir -p "$out"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
RETRAIN_UI_SCREENSHOTS="$(cd "$out" && pwd)" .venv/bin/python -m pytest -q -s -rs tests/test_ui.py
ls -l "$out"/*.png
