#!/usr/bin/env bash
# Create .venv with the project and its pinned dependencies; a no-op when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
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
