"""How long a checkpoint save stops training: synchronous vs checkpoint.async.

    python bench/async_save.py [--saves 3] [--device cpu|cuda]

Builds kiln's Trainer at the peer-benchmark shape (vocab 50304, d_model 256, 4 layers,
SwiGLU 1024, fp32, AdamW: about 33M parameters, a ~400 MB checkpoint with its Adam state) on
random tokens in a temporary folder, then times, in the training thread, `--saves` synchronous
saves and `--saves` background saves (the pause until training can go on, and the time the
background write took). Prints medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.config import config_from_dict  # noqa: E402
from kiln.data.tokens import TokenWriter  # noqa: E402
from kiln.trainer import Trainer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokens = root / "tokens.bin"
        rng = np.random.default_rng(0)
        with TokenWriter(tokens, vocab_size=50304, eos_token_id=0, dtype="uint16") as w:
            for _ in range(64):  # documents of 256 tokens (no EOS inside)
                w.write(rng.integers(1, 50304, 256, dtype=np.int64))
        cfg = {
            "model": {"d_model": 256, "n_layers": 4, "n_heads": 4, "mlp_hidden_size": 1024,
                      "vocab_size": 50304, "max_seq_len": 256},
            "data": {"paths": [str(tokens)], "seq_len": 256},
            "trainer": {"run_dir": str(root / "run"), "global_batch_size": 8,
                        "micro_batch_size": 8, "max_duration": 100, "device": args.device,
                        "threads": 2},
            "checkpoint": {"keep_last": 2},
            "log": {"console": False},
        }
        trainer = Trainer(config_from_dict(cfg))
        batch = trainer.loader.next_batch()
        trainer.train_step(batch)  # Adam state exists
        sync, stall, written, step_plain, step_during = [], [], [], [], []
        for i in range(args.saves):
            trainer.step = 10 + i
            t = time.perf_counter()
            trainer.train_step(batch)
            step_plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            trainer.save_checkpoint()
            sync.append(time.perf_counter() - t)
        trainer.cfg.checkpoint.async_ = True  # (read at each save)
        for i in range(args.saves):
            trainer.step = 20 + i
            t = time.perf_counter()
            trainer.saver._start_background()
            started = time.perf_counter() - t
            t = time.perf_counter()
            trainer.train_step(batch)  # overlaps the copy; its optimizer step waits for it
            step_during.append(time.perf_counter() - t)
            stall.append(started + trainer.saver._copy_wait)
            trainer.saver.poll(wait=True)
            written.append(trainer.saver._result[3])
        trainer.loader.close()
        last = root / "run" / "checkpoints" / f"step{trainer.step}"
        size = sum(f.stat().st_size for f in last.iterdir())
    print(f"checkpoint size              {size / 2**20:,.0f} MiB")
    print(f"synchronous save             {statistics.median(sync):.3f} s (median of {len(sync)})")
    print(f"async: training paused       {statistics.median(stall):.3f} s (start + the "
          "optimizer step's wait for the copy)")
    print(f"train step alone             {statistics.median(step_plain):.3f} s")
    print(f"train step during the save   {statistics.median(step_during):.3f} s")
    print(f"async: background write      {statistics.median(written):.3f} s")
    print(f"pause, async vs sync         {statistics.median(stall) / statistics.median(sync):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
