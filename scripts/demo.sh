#!/usr/bin/env bash
# The demo on a fresh machine: set everything up (idempotent; see scripts/setup.sh), then make
# a tiny demo checkpoint and BOFT locally, boot a real ComfyUI with this pack, run
# example_workflows/boft_demo.json over HTTP at BOFT strength 0 and 1, write
# .demo/out/before.png and after.png, print their paths and the UI's URL, and keep the server
# running until Ctrl-C. Options go to scripts/demo.py (--no-wait, --rebuild, --dir, --listen).
# The host is ComfyUI 0.3.75 unless BOFT_COMFYUI_DIR names another (see scripts/setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
paths="$(bash scripts/setup.sh)"   # the host's ComfyUI directory, then its venv's python
COMFY="$(sed -n 1p <<<"$paths")" PY="$(sed -n 2p <<<"$paths")"
export BOFT_COMFYUI_DIR="$COMFY" BOFT_PYTHON="$PY"
exec "$PY" scripts/demo.py "$@"
