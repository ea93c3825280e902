"""What checking a checkpoint against its manifest costs when a run resumes.

    python bench/verify_load.py [--reps 3] [--gb 1.0]

Trains one step of a model sized so that its checkpoint (weights + Adam state) is about
`--gb` GB, in a temporary folder, then measures on that checkpoint:

* SHA-256 in one thread (MB/s) and ``checkpoint.verify_parts`` over every file (the threads
  ``kiln checkpoint verify`` uses);
* a resume's start-up, ``Trainer(cfg)`` from the config to a model and optimizer loaded and
  ready for the next step, with ``checkpoint.verify_on_load`` full, size and off, in
  interleaved repetitions (medians). The page cache is warm after the first read, as it is for
  a resume right after a save; a cold read from disk costs the same for every mode and adds
  to each.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln import checkpoint as ckpt  # noqa: E402
from kiln.config import config_from_dict  # noqa: E402
from kiln.data.tokens import TokenWriter  # noqa: E402
from kiln.trainer import Trainer  # noqa: E402


def config(root: Path, tokens: Path, d_model: int, verify: str) -> dict:
    return {
        "model": {"d_model": d_model, "n_layers": 4, "n_heads": 8, "vocab_size": 16384,
                  "max_seq_len": 64},
        "data": {"paths": [str(tokens)], "seq_len": 64},
        "trainer": {"run_dir": str(root / "run"), "global_batch_size": 2,
                    "micro_batch_size": 2, "max_duration": 2, "eval_interval": 0},
        "checkpoint": {"interval": 1, "verify_on_load": verify},
        "log": {"console": False},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gb", type=float, default=1.0, help="checkpoint size to aim at")
    args = ap.parse_args()
    # parameters: 2 * 16384 * d + 4 layers * 16 d^2 (MLP ratio 4); 12 checkpoint bytes each
    target = args.gb * 1e9 / 12
    d_model = min(range(128, 8192, 128), key=lambda d: abs(32768 * d + 64 * d * d - target))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokens = root / "tokens.bin"
        rng = np.random.default_rng(0)
        with TokenWriter(tokens, vocab_size=16384, eos_token_id=0, dtype="uint16") as w:
            for _ in range(16):
                w.write(rng.integers(1, 16384, 256, dtype=np.int64))
        cfg = config(root, tokens, d_model, "full")
        cfg["trainer"]["hard_stop"] = 1
        t = time.perf_counter()
        Trainer(config_from_dict(cfg)).fit()
        print(f"built a checkpoint of d_model {d_model} in {time.perf_counter() - t:.1f} s")
        step = ckpt.latest_checkpoint(root / "run")
        files = sorted(f for f in step.rglob("*") if f.is_file())
        size = sum(f.stat().st_size for f in files)
        print(f"checkpoint {step.name}: {size / 1e9:.3f} GB in {len(files)} files")

        biggest = max(files, key=lambda f: f.stat().st_size)
        data = biggest.read_bytes()
        t = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        dt = time.perf_counter() - t
        print(f"SHA-256, one thread, in memory: {len(data) / dt / 1e6:,.0f} MB/s")
        del data
        t = time.perf_counter()
        assert not ckpt.verify_parts(step, None, "full")
        dt = time.perf_counter() - t
        print(f"verify_parts (all files, page cache warm): {dt:.2f} s, {size / dt / 1e6:,.0f} "
              f"MB/s; {dt / size * 1e9:.2f} s per GB")

        times: dict[str, list[float]] = {"full": [], "size": [], "off": []}
        for _ in range(args.reps):
            for mode in times:
                t = time.perf_counter()
                trainer = Trainer(config_from_dict(config(root, tokens, d_model, mode)))
                times[mode].append(time.perf_counter() - t)
                trainer.run_lock.release()
                trainer.loader.close()
                del trainer
        med = {m: statistics.median(v) for m, v in times.items()}
        for m, v in times.items():
            print(f"resume start-up, verify_on_load={m:<4}: median {med[m]:.2f} s "
                  f"(min {min(v):.2f}, max {max(v):.2f})")
        extra = med["full"] - med["off"]
        print(f"verification's share of a resume's start-up: {extra:.2f} s of {med['full']:.2f} s "
              f"({100 * extra / med['full']:.0f}%); {extra / size * 1e9:.2f} s per GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
