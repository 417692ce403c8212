#!/usr/bin/env bash
# The demo on a fresh machine: set everything up (idempotent; see scripts/setup.sh), then make
# a tiny demo checkpoint and BOFT locally, boot a real ComfyUI with this pack, run
# example_workflows/boft_demo.json over HTTP at BOFT strength 0 and 1, write
# .demo/out/before.png and after.png, print their paths and the UI's URL, and keep the server
# running until Ctrl-C. Options go to scripts/demo.py (--no-wait, --rebuild, --dir, --listen).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh >/dev/null
exec .venv/bin/python scripts/demo.py "$@"
