#!/usr/bin/env bash
# Set up everything (idempotent) and run every check: ruff, then the whole pytest suite
# (boft_core against LyCORIS/PEFT, the nodes in a real ComfyUI, end-to-end over HTTP,
# the front end in headless Chromium). This is the README's test command; .ci/run runs it.
# The host is ComfyUI 0.3.75 unless BOFT_COMFYUI_DIR names another (a checkout or a
# .tar.gz of one; see scripts/setup.sh). Arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
paths="$(bash scripts/setup.sh)"   # the host's ComfyUI directory, then its venv's python
COMFY="$(sed -n 1p <<<"$paths")" PY="$(sed -n 2p <<<"$paths")"
export BOFT_COMFYUI_DIR="$COMFY" BOFT_PYTHON="$PY"
"$(dirname "$PY")/ruff" check .
"$PY" -m pytest "$@"
