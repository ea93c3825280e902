#!/usr/bin/env bash
# Install kiln into ./.venv. Uses a torch that is already importable (a GPU build, say)
# and installs the CPU build of torch 2.13.0 only where none is present.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    "$py" -m pip install -q torch==2.13.0
fi
if [ -n "$extras" ]; then
    "$py" -m pip install -q -e ".[$extras]"
else
    "$py" -m pip install -q -e .
fi
