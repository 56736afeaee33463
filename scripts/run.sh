#!/usr/bin/env bash
# Install (into .venv) and launch the workbench on the bundled model: `bash scripts/run.sh`.
# Extra arguments go to app.py (e.g. --port 7861 --open-browser).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -r requirements.txt
exec python app.py "$@"
