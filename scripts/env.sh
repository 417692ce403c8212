# Source me from the repo (bash, zsh or sh): `. scripts/env.sh`
# Puts the project venv first on PATH and sets BOFT_COMFYUI_DIR (unless already set)
# to the ComfyUI that scripts/setup.sh made.
if [ -n "${BASH_VERSION:-}" ]; then
    _boft_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
else
    _boft_root="$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
fi
export BOFT_COMFYUI_DIR="${BOFT_COMFYUI_DIR:-$_boft_root/.comfyui/ComfyUI}"
export PATH="$_boft_root/.venv/bin:$PATH"
unset _boft_root
