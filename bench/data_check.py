"""How fast `kiln data check` reads a token file: MB/s of file for all checks, and per check.

Writes a uint16 token file of random ids (vocab 50,280) with an EOS about every 1,000 tokens
and a kiln sidecar, in a temp folder, then times check_files on it (best of --reps, after one
warm-up pass so the file is in the page cache: this measures the checks, not the disk).

    python bench/data_check.py [--mb 300] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.data.check import ALL, CHEAP, check_files  # noqa: E402
from kiln.data.tokens import FORMAT  # noqa: E402

VOCAB, EOS = 50_280, 0


def make_file(path: Path, n_tokens: int, seed: int = 0) -> int:
    """Random ids in [1, VOCAB) with an EOS after each document of 1..~2,000 tokens (a clean
    file: every check passes); returns the number of documents."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, n_tokens, dtype=np.uint16)
    ends = np.cumsum(rng.integers(2, 2000, n_tokens // 1000 + 2))
    ends = ends[ends < n_tokens - 1]
    ids[ends] = EOS
    ids[-1] = EOS
    ids.tofile(path)
    docs = len(ends) + 1
    path.with_suffix(".json").write_text(json.dumps({
        "format": FORMAT, "dtype": "uint16", "eos_token_id": EOS, "vocab_size": VOCAB,
        "documents": docs, "tokens": n_tokens}))
    return docs


def time_checks(path: Path, checks: tuple[str, ...], reps: int) -> tuple[float, object]:
    best, report = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        report = check_files([path], checks=checks)
        best = min(best, time.perf_counter() - t0)
    return best, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=300, help="file size in MB (default 300)")
    ap.add_argument("--reps", type=int, default=2, help="timed passes per row, best kept")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.bin"
        n = int(args.mb * 1e6) // 2
        docs = make_file(path, n)
        mb = path.stat().st_size / 1e6
        print(f"{path.name}: {mb:,.0f} MB, {n:,} uint16 tokens, {docs:,} documents")
        check_files([path], checks=CHEAP)  # warm the page cache
        rows = [("cheap (vocab, documents, separators, empty)", CHEAP),
                ("cheap + lengths", (*CHEAP, "lengths")),
                ("cheap + duplicates", (*CHEAP, "duplicates")),
                ("cheap + repeats", (*CHEAP, "repeats")),
                ("all checks", ALL)]
        report = None
        for name, checks in rows:
            seconds, report = time_checks(path, checks, args.reps)
            print(f"  {name:<46} {seconds:6.2f} s  {mb / seconds:7,.0f} MB/s")
        print("\n".join(report.lines()))  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
