#!/usr/bin/env bash
# Set up everything (idempotent) and run every check: ruff, then the whole pytest suite
# (boft_core against LyCORIS/PEFT, the nodes in a real ComfyUI, end-to-end over HTTP,
# the front end in headless Chromium). This is the README's test command; .ci/run runs it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh >/dev/null
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
