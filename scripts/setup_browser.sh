#!/usr/bin/env bash
# Browser-test tools, idempotent: Debian's chromium (apt) and the pinned Python Playwright
# (requirements-browser.txt) in .venv. Nothing here downloads a browser build: Playwright only
# drives /usr/bin/chromium (tests/test_frontend.py passes executable_path).
#
# Use: `bash scripts/setup_browser.sh [PYTHON]`, or source it and call `setup_browser [PYTHON]`
# (scripts/setup.sh passes the host venv's python; default: .venv/bin/python).
# Env: BOFT_CHROMIUM  another Chromium binary to use instead of installing Debian's.

setup_browser() {
    local root py venv stamp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    py="${1:-$root/.venv/bin/python}"
    venv="$(dirname "$(dirname "$py")")"
    if [[ -n "${BOFT_CHROMIUM:-}" ]]; then
        [[ -x "$BOFT_CHROMIUM" ]] || { echo "[setup] BOFT_CHROMIUM=$BOFT_CHROMIUM is not executable" >&2; return 1; }
    elif ! command -v chromium >/dev/null 2>&1; then
        if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
            echo "[setup] chromium is missing: install Debian's 'chromium' package (as root)" >&2
            return 1
        fi
        echo "[setup] installing Debian chromium" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium fonts-dejavu-core >&2
    else
        echo "[setup] chromium present: $(command -v chromium)" >&2
    fi
    [[ -x "$py" ]] || { echo "[setup] no $py: run scripts/setup.sh first" >&2; return 1; }
    stamp="$venv/.boft-browser-$(sha256sum "$root/requirements-browser.txt" | cut -c1-16)"
    if [[ ! -f "$stamp" ]]; then
        echo "[setup] installing requirements-browser.txt" >&2
        PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$py" -m pip install --disable-pip-version-check --quiet \
            -r "$root/requirements-browser.txt" >&2
        rm -f "$venv"/.boft-browser-*
        touch "$stamp"
    else
        echo "[setup] browser requirements up to date" >&2
    fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    setup_browser "$@"
fi
