"""What checking every batch's token ids against the vocabulary costs the loader.

Builds batches from a memory-mapped token file with and without the check (interleaved
repetitions, medians) and prints the time per batch and the overhead. The check runs on the
loader's prefetch thread, off the training step; this measures it anyway.

    python bench/id_check.py [--batch 16] [--seq 4096] [--reps 200]
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

from kiln.data.loader import WindowDataset  # noqa: E402
from kiln.data.tokens import TokenFile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=50280)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.npy"
        n = args.batch * (args.seq + 1) * 64
        np.save(path, rng.integers(0, args.vocab, n, dtype=np.uint32))
        f = TokenFile.open(path)
        plain = WindowDataset([f], args.seq)
        checked = WindowDataset([f], args.seq, vocab_size=args.vocab)
        times: dict[str, list[float]] = {"plain": [], "checked": []}
        for r in range(args.reps):
            idx = rng.permutation(len(plain))[: args.batch]
            for name, ds in (("plain", plain), ("checked", checked))[:: 1 if r % 2 else -1]:
                t0 = time.perf_counter()
                ds.batch(idx)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"batch {args.batch} x {args.seq + 1} ids (uint32 file, vocab {args.vocab}), "
          f"{args.reps} interleaved repetitions, medians:")
    print(f"  build batch            {med['plain']:.3f} ms")
    print(f"  build + check ids      {med['checked']:.3f} ms")
    print(f"  check overhead         {med['checked'] - med['plain']:.3f} ms per batch "
          f"({(med['checked'] / med['plain'] - 1) * 100:.0f}% of building it)")


if __name__ == "__main__":
    main()
