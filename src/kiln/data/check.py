"""``kiln data check``: audit token files before (and while) training on them.

Every check reads the file once, in chunks of a few million tokens taken from its memory map,
so a file of any size is audited in bounded memory; state that matters across chunk borders
(the previous tokens, an open run, the last EOS) is carried from one chunk to the next.

Checks, each giving one verdict line (``ok``, ``WARNING`` or ``FATAL``):

* ``vocab``: every id is below the vocabulary (``--vocab-size``, else the sidecar's
  ``vocab_size``, else the tokenizer.json beside the file). FATAL when one is not.
* ``documents``: the number of EOS ids equals the sidecar's ``documents`` (FATAL if not).
* ``separators``: EOS EOS pairs, BOS right after EOS (with ``bos_id``: a loader or tokenizer
  that adds BOS itself then doubles it), BOS BOS, and a file not ending in EOS (WARNING).
* ``empty``: empty documents, i.e. an EOS right after an EOS or at position 0 (WARNING).
* ``lengths``: the document length distribution (min, median, p99, max and power-of-two
  buckets); informational, always ``ok``.
* ``duplicates``: non-overlapping windows of ``seq_len`` tokens that repeat an earlier
  window of this file or an earlier file (a 64-bit multilinear hash per window; equal hashes
  are confirmed by comparing the tokens). WARNING above 1 % of the windows.
* ``repeats``: runs where ``ids[i] == ids[i + p]`` (p = 1..4) holds at more than ``min_run``
  consecutive positions: one token or a short n-gram repeated over and over. WARNING.

The first four are :data:`CHEAP` (a few GB/s); ``kiln prepare`` runs them on its output and
``kiln train`` runs them on the first and last MiB of each training file (:func:`check_edges`).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.data.tokens import TokenFile, resolve_paths, sidecar_path
from kiln.errors import KilnError, warn

OK, WARNING, FATAL = "ok", "WARNING", "FATAL"
CHEAP = ("vocab", "documents", "separators", "empty")
"""Checks that cost a compare or two per token: run by kiln prepare and (on the edges of each
file) by kiln train."""
ALL = (*CHEAP, "lengths", "duplicates", "repeats")
CHUNK_TOKENS = 1 << 22
"""Tokens per chunk (4 Mi: a chunk and its temporaries stay in the CPU caches' reach)."""
DUPLICATE_WARN = 0.01
"""Share of duplicate windows above which the duplicates check warns."""
PERIODS = (1, 2, 3, 4)
_CARRY = max(PERIODS)  # tokens of the previous chunk kept in front of each chunk
_LEN_CAP = 1 << 20  # document lengths below this are counted in an exact histogram
_VERIFY = 1000  # duplicate windows confirmed token by token, per file (the rest by hash)
_ONES = np.uint64(0x0101010101010101)  # eight True bytes seen as one uint64
_TOKENIZER_FILE = "tokenizer.json"


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Check:
    """The verdict of one check on one file."""

    name: str
    level: str  # OK, WARNING or FATAL
    message: str
    count: int = 0
    positions: list[int] = dataclasses.field(default_factory=list)
    detail: str | None = None  # a second line (the length buckets)

    def lines(self) -> list[str]:
        out = [f"  {self.name:<11} {self.level}: {self.message}"]
        if self.detail:
            out.append(f"  {'':<11} {self.detail}")
        return out


@dataclasses.dataclass
class FileReport:
    """Every check run on one token file."""

    path: Path
    tokens: int
    dtype: str
    eos_token_id: int
    vocab_size: int | None
    checks: list[Check] = dataclasses.field(default_factory=list)

    def __getitem__(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    @property
    def fatal(self) -> list[Check]:
        return [c for c in self.checks if c.level == FATAL]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.level == WARNING]

    def header(self) -> str:
        return (f"{self.path}: {self.tokens:,} tokens ({self.dtype}), eos id {self.eos_token_id}"
                + (f", vocab {self.vocab_size:,}" if self.vocab_size else ""))

    def lines(self) -> list[str]:
        return [self.header()] + [line for c in self.checks for line in c.lines()]


@dataclasses.dataclass
class Report:
    """The result of :func:`check_files`: one :class:`FileReport` per file."""

    files: list[FileReport] = dataclasses.field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)

    @property
    def fatal(self) -> list[tuple[FileReport, Check]]:
        return [(f, c) for f in self.files for c in f.fatal]

    @property
    def warnings(self) -> list[tuple[FileReport, Check]]:
        return [(f, c) for f in self.files for c in f.warnings]

    @property
    def exit_code(self) -> int:
        return 1 if self.fatal else 0

    def verdict(self) -> str:
        """``kiln data check: N file(s), M tokens: ok`` / ``... FATAL (vocab in a.bin, ...)``."""
        head = f"kiln data check: {len(self.files)} file(s), {self.tokens:,} tokens: "
        if self.fatal:
            return head + "FATAL (" + ", ".join(f"{c.name} in {f.path.name}"
                                                for f, c in self.fatal) + ")"
        n = len(self.warnings)
        return head + "ok" + (f" ({n} warning{'s' if n > 1 else ''})" if n else "")

    def lines(self) -> list[str]:
        return [line for f in self.files for line in f.lines()] + [self.verdict()]


def _positions(ps: Iterable[int], count: int) -> str:
    ps = list(ps)
    if not ps:
        return "(positions not listed)"
    more = ", ..." if count > len(ps) else ""
    return ("at " if len(ps) == 1 and not more else "first at ") + ", ".join(
        f"{p:,}" for p in ps) + more


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------------------------
# Repeated runs


class _Runs:
    """Maximal runs of True longer than ``min_run`` in a stream of bool segments.

    A run longer than ``2 * block - 1`` holds an aligned block of ``block`` True values, so
    only blocks that are all True (eight bools compared at once as a uint64) are expanded
    exactly; runs that reach a segment's end stay open until a later segment ends them.
    """

    def __init__(self, min_run: int):
        self.min_run = min_run
        self.block = max(8, (min_run + 2) // 2 // 8 * 8)
        assert 2 * self.block - 1 <= min_run + 1, "min_run must be at least 14"
        self.open_start: int | None = None

    def feed(self, g0: int, eq: np.ndarray) -> np.ndarray:
        """Closed runs [[start, end), ...] in the stream's indices; ``eq`` starts at ``g0``."""
        out: list[tuple[int, int]] = []
        n, k = len(eq), 0
        if n == 0:
            return _runs_array(out)
        if self.open_start is not None:
            k = int(eq.argmin())  # the first False
            if eq[k]:  # all True: the run goes on
                return _runs_array(out)
            if g0 + k - self.open_start > self.min_run:
                out.append((self.open_start, g0 + k))
            self.open_start = None
        B = self.block
        nb = n // B
        if nb:
            w = eq[: nb * B].view(np.uint64).reshape(nb, B // 8)
            full = np.flatnonzero(np.bitwise_and.reduce(w, axis=1) == _ONES)
            full = full[full * B >= k]
            if full.size > 64:  # many runs (a degenerate file): find them all at once
                return np.concatenate([_runs_array(out), self._all_runs(g0 + k, eq[k:])])
            if full.size:
                cut = np.flatnonzero(np.diff(full) != 1)
                for b0, b1 in zip(np.r_[full[0], full[cut + 1]], np.r_[full[cut], full[-1]]):
                    lo = int(b0) * B
                    before = eq[max(0, lo - B) : lo]
                    falses = np.flatnonzero(~before)
                    left = lo - len(before) + (int(falses[-1]) + 1 if falses.size else 0)
                    hi = (int(b1) + 1) * B
                    after = eq[hi : hi + B]
                    j = int(after.argmin()) if after.size else 0
                    if after.size == 0 or after[j]:  # reaches the segment's end
                        self.open_start = g0 + left
                        return _runs_array(out)
                    if hi + j - left > self.min_run:
                        out.append((g0 + left, g0 + hi + j))
        if eq[-1]:  # a short run at the end may go on in the next segment
            tail = eq[max(k, n - 2 * B) :]
            falses = np.flatnonzero(~tail)
            self.open_start = g0 + n - len(tail) + (int(falses[-1]) + 1 if falses.size else 0)
        return _runs_array(out)

    def _all_runs(self, g0: int, eq: np.ndarray) -> np.ndarray:
        edges = np.diff(eq.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if ends.size and ends[-1] == len(eq):  # reaches the segment's end: stays open
            self.open_start = g0 + int(starts[-1])
            starts, ends = starts[:-1], ends[:-1]
        long = ends - starts > self.min_run
        return np.stack([starts[long], ends[long]], axis=1).astype(np.int64) + g0

    def finish(self, end: int) -> np.ndarray:
        start, self.open_start = self.open_start, None
        return _runs_array([(start, end)] if start is not None and end - start > self.min_run
                           else [])


def _runs_array(runs: list[tuple[int, int]]) -> np.ndarray:
    return np.array(runs, dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# One pass over one file


class _Scan:
    """The state of the checks over one file (or, for check_edges, over separate ranges)."""

    def __init__(self, f: TokenFile, eos: int | None, bos: int | None, vocab: int | None,
                 checks: Sequence[str], seq_len: int, max_report: int, min_run: int,
                 hash_keys: np.ndarray):
        self.f, self.eos, self.bos, self.vocab = f, eos, bos, vocab
        self.checks = set(checks)
        self.seq_len, self.max_report = seq_len, max_report
        self.n = len(f)
        self.bad_ids = 0
        self.bad_max = -1
        self.bad_at: list[int] = []
        self.eos_count = 0
        self.eos_eos = 0
        self.eos_eos_at: list[int] = []
        self.eos_bos = 0
        self.eos_bos_at: list[int] = []
        self.bos_bos = 0
        self.bos_bos_at: list[int] = []
        self.leading_eos = False
        self.last_token: int | None = None
        # lengths
        self.last_eos = -1
        self.hist = np.zeros(0, dtype=np.int64)
        self.long_lengths: list[int] = []
        # duplicates
        self.hash_keys = hash_keys
        self.hashes: list[np.ndarray] = []
        # repeats
        self.runs = {p: _Runs(min_run) for p in PERIODS}
        self.pending = np.zeros((0, 3), np.int64)  # runs not final yet: start, end, period
        self.run_count = 0
        self.run_at: list[int] = []
        self.longest: tuple[int, int, int] = (0, 0, 0)  # (tokens, start, period)

    # -- feeding

    def feed(self, s: int, ext: np.ndarray, c: int) -> None:
        """Tokens ``ext[c:]`` are positions ``s..``; ``ext[:c]`` are the ``c`` before them."""
        chunk = ext[c:]
        n = len(chunk)
        if n == 0:
            return
        want = self.checks
        if "vocab" in want and self.vocab is not None and int(chunk.max()) >= self.vocab:
            bad = chunk >= self.vocab
            self.bad_ids += int(np.count_nonzero(bad))
            self.bad_max = max(self.bad_max, int(chunk.max()))
            if len(self.bad_at) < self.max_report:
                self.bad_at += [s + int(i) for i in
                                np.flatnonzero(bad)[: self.max_report - len(self.bad_at)]]
        self.last_token = int(chunk[-1])
        if self.eos is None:
            return
        is_eos = ext == self.eos
        m = is_eos[c:]
        self.eos_count += int(np.count_nonzero(m))
        if s == 0 and m[0]:
            self.leading_eos = True
        # pairs (ext[i-1], ext[i]) whose second token lies in this chunk
        first = max(c, 1)
        if len(ext) > first:
            self._pairs(is_eos, is_eos, ext, first, s - c, "eos_eos")
            if self.bos is not None and self.bos != self.eos:
                is_bos = ext == self.bos
                self._pairs(is_eos, is_bos, ext, first, s - c, "eos_bos")
                self._pairs(is_bos, is_bos, ext, first, s - c, "bos_bos")
                if s == 0 and is_bos[c]:  # the first document starts with BOS as well
                    self._count("eos_bos", [s])
        if "lengths" in want:
            self._lengths(s, m)
        if "duplicates" in want:
            self._hash(chunk)
        if "repeats" in want:
            self._repeats(s, ext, c)

    def _count(self, what: str, at: Sequence[int], n: int | None = None) -> None:
        setattr(self, what, getattr(self, what) + (len(at) if n is None else n))
        lst = getattr(self, what + "_at")
        lst += list(at)[: self.max_report - len(lst)]

    def _pairs(self, a: np.ndarray, b: np.ndarray, ext: np.ndarray, first: int, base: int,
               what: str) -> None:
        both = a[first - 1 : -1] & b[first:]
        n = int(np.count_nonzero(both))
        if n:
            at = np.flatnonzero(both)[: self.max_report] + base + first
            self._count(what, [int(x) for x in at], n)

    def _lengths(self, s: int, m: np.ndarray) -> None:
        at = np.flatnonzero(m) + s
        if at.size == 0:
            return
        lengths = np.diff(at, prepend=self.last_eos) - 1
        self.last_eos = int(at[-1])
        self._add_lengths(lengths)

    def _add_lengths(self, lengths: np.ndarray) -> None:
        big = lengths >= _LEN_CAP
        if big.any():
            self.long_lengths += [int(x) for x in lengths[big]]
            lengths = lengths[~big]
        counts = np.bincount(lengths)
        if len(counts) > len(self.hist):
            self.hist = np.concatenate([self.hist, np.zeros(len(counts) - len(self.hist),
                                                            np.int64)])
        self.hist[: len(counts)] += counts

    def _hash(self, chunk: np.ndarray) -> None:
        L = self.seq_len
        k = len(chunk) // L
        if k == 0:
            return
        w = chunk[: k * L].reshape(k, L)
        if w.dtype.itemsize in (4, 8) or (w.dtype.itemsize == 2 and L % 2 == 0):
            w = w.view(np.uint32)  # two uint16 ids (or one uint32) per term: fewer terms
        self.hashes.append(w.astype(np.uint64) @ self.hash_keys[: w.shape[1]])

    def _repeats(self, s: int, ext: np.ndarray, c: int) -> None:
        closed = []
        for p in PERIODS:
            if len(ext) <= p:
                continue
            lo = max(c - p, 0)  # eq[i] = ids[i] == ids[i + p] for i in [s - c + lo, ...)
            eq = ext[lo : len(ext) - p] == ext[lo + p :]
            closed.append(_spans(self.runs[p].feed(s - c + lo, eq), p))
        # Runs of different periods over the same tokens are one run (all aaaa is also
        # abab-periodic); a run is final once nothing later can overlap it.
        opens = [r.open_start for r in self.runs.values() if r.open_start is not None]
        frontier = min([s + len(ext) - c - _CARRY, *opens])
        self._merge(closed, frontier)

    def _merge(self, closed: list[np.ndarray], frontier: int) -> None:
        runs = np.concatenate([self.pending, *closed])
        if not len(runs):
            return
        a, b, p = runs[np.argsort(runs[:, 0], kind="stable")].T
        reach = np.maximum.accumulate(b)
        first = np.flatnonzero(np.r_[True, a[1:] >= reach[:-1]])  # each merged run's first
        a, b, p = a[first], np.maximum.reduceat(b, first), np.minimum.reduceat(p, first)
        done = b <= frontier
        self.pending = np.stack([a[~done], b[~done], p[~done]], axis=1)
        a, b, p = a[done], b[done], p[done]
        if a.size:
            self.run_count += int(a.size)
            self.run_at += [int(x) for x in a[: self.max_report - len(self.run_at)]]
            i = int(np.argmax(b - a))
            if b[i] - a[i] > self.longest[0]:
                self.longest = (int(b[i] - a[i]), int(a[i]), int(p[i]))

    def finish(self) -> None:
        if "lengths" in self.checks and self.n - 1 > self.last_eos:  # an unterminated tail
            self._add_lengths(np.array([self.n - 1 - self.last_eos], dtype=np.int64))
        if "repeats" in self.checks:
            closed = [_spans(r.finish(self.n - p), p) for p, r in self.runs.items()]
            self._merge(closed, self.n)

    # -- verdicts

    def results(self, seen: _Seen | None) -> list[Check]:
        out = []
        want = self.checks
        if "vocab" in want:
            out.append(self._vocab_check())
        if "documents" in want:
            docs = self.f.meta.get("documents")
            if docs is None:
                out.append(Check("documents", OK, f"{self.eos_count:,} EOS "
                                 "(no sidecar document count to compare with)"))
            elif int(docs) != self.eos_count:
                out.append(Check("documents", FATAL, f"{self.eos_count:,} EOS but "
                                 f"the sidecar says {int(docs):,} documents: the file was "
                                 "changed after kiln prepare wrote it; re-run kiln prepare",
                                 count=abs(int(docs) - self.eos_count)))
            else:
                out.append(Check("documents", OK, f"{self.eos_count:,} EOS = {int(docs):,} "
                                 "documents in the sidecar"))
        if "separators" in want:
            out.append(self._separators_check())
        if "empty" in want:
            n = self.eos_eos + int(self.leading_eos)
            if n:
                at = sorted(([0] if self.leading_eos else []) + self.eos_eos_at)
                out.append(Check("empty", WARNING, f"{_plural(n, 'empty document')} (an EOS "
                                 f"{'at the start or ' if self.leading_eos else ''}right after "
                                 f"an EOS), {_positions(at[: self.max_report], n)}",
                                 count=n, positions=at[: self.max_report]))
            else:
                out.append(Check("empty", OK, "no empty documents"))
        if "lengths" in want:
            out.append(self._lengths_check())
        if "duplicates" in want:
            out.append(self._duplicates_check(seen))
        if "repeats" in want:
            out.append(self._repeats_check())
        return out

    def _vocab_check(self) -> Check:
        if self.vocab is None:
            return Check("vocab", WARNING, "vocabulary unknown (no --vocab-size, sidecar "
                         "vocab_size or tokenizer.json beside the file): ids not checked; pass "
                         "--vocab-size N")
        if self.f.dtype.itemsize == 2 and self.vocab > 1 << 16:
            return Check("vocab", FATAL, f"the file is {self.f.dtype.name}, which cannot hold "
                         f"the ids of a vocabulary of {self.vocab:,}: ids were wrapped when it "
                         "was written; re-run kiln prepare (it writes uint32)")
        if self.bad_ids:
            return Check("vocab", FATAL, f"{_plural(self.bad_ids, 'id')} >= vocab "
                         f"{self.vocab:,} (largest {self.bad_max:,}), "
                         f"{_positions(self.bad_at, self.bad_ids)}: the file is damaged or was "
                         "made with another tokenizer", count=self.bad_ids,
                         positions=list(self.bad_at))
        return Check("vocab", OK, f"every id below {self.vocab:,}")

    def _separators_check(self) -> Check:
        problems, at = [], []
        if self.eos_eos:
            problems.append(f"{_plural(self.eos_eos, 'EOS EOS pair')} "
                            f"{_positions(self.eos_eos_at, self.eos_eos)}")
            at += self.eos_eos_at
        if self.eos_bos:
            problems.append(f"{self.eos_bos:,} BOS ({self.bos}) right after EOS or at the start "
                            f"{_positions(self.eos_bos_at, self.eos_bos)} (a tokenizer or "
                            "loader that adds BOS itself doubles it)")
            at += self.eos_bos_at
        if self.bos_bos:
            problems.append(f"{_plural(self.bos_bos, 'BOS BOS pair')} "
                            f"{_positions(self.bos_bos_at, self.bos_bos)}")
            at += self.bos_bos_at
        if self.last_token is not None and self.last_token != self.eos:
            problems.append(f"the file does not end in EOS (last id {self.last_token}, "
                            f"position {self.n - 1:,})")
            at.append(self.n - 1)
        count = self.eos_eos + self.eos_bos + self.bos_bos + int(bool(at) and
                                                                 self.last_token != self.eos)
        if problems:
            return Check("separators", WARNING, "; ".join(problems), count=count,
                         positions=sorted(at)[: self.max_report])
        return Check("separators", OK, "no EOS EOS" + (", no BOS after EOS" if self.bos is not
                                                       None else "") + ", ends in EOS")

    def _lengths_check(self) -> Check:
        hist, long = self.hist, sorted(self.long_lengths)
        total = int(hist.sum()) + len(long)
        if total == 0:
            return Check("lengths", OK, "no documents")
        cum = np.cumsum(hist)
        short = int(cum[-1]) if cum.size else 0

        def kth(k: int) -> int:  # the k-th smallest length, 1-based
            return int(np.searchsorted(cum, k)) if k <= short else long[k - short - 1]

        q = {name: kth(max(1, -(-total * num // 100))) for name, num in
             (("median", 50), ("p99", 99))}
        lo = kth(1)
        hi = long[-1] if long else int(np.flatnonzero(hist)[-1])
        # power-of-two buckets: 0, [1, 2), [2, 4), ... up to the longest
        buckets: dict[int, int] = {}
        if len(hist):
            buckets[-1] = int(hist[0])
            top = len(hist)
            for k in range(top.bit_length()):
                n = int(hist[1 << k : min(1 << (k + 1), top)].sum())
                if n:
                    buckets[k] = n
        for x in long:
            k = x.bit_length() - 1
            buckets[k] = buckets.get(k, 0) + 1
        parts = [("0" if k < 0 else f"2^{k}") + f":{n:,}" for k, n in sorted(buckets.items())
                 if n]
        return Check("lengths", OK, f"{_plural(total, 'document')}: min {lo:,}, median "
                     f"{q['median']:,}, p99 {q['p99']:,}, max {hi:,} tokens",
                     detail="by length (2^k = 2^k..2^(k+1)-1 tokens): " + " ".join(parts),
                     count=total)

    def _duplicates_check(self, seen: _Seen | None) -> Check:
        L = self.seq_len
        h = np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.uint64)
        if h.size == 0:
            return Check("duplicates", OK, f"no full window of {L:,} tokens")
        dup, at, earlier = _duplicates(self.f, h, L, seen, self.max_report)
        share = dup / h.size
        level = WARNING if share > DUPLICATE_WARN else OK
        msg = (f"{dup:,} of {_plural(h.size, 'window')} of {L:,} tokens ({share:.1%}) repeat "
               "an earlier window")
        if earlier:
            msg += f" ({earlier:,} of an earlier file's)"
        if dup:
            msg += ", " + _positions(at, dup)
        if level == WARNING:
            msg += "; deduplicate the corpus"
        if seen is not None:
            seen.hashes.append(h)
            seen.paths.append(self.f.path)
        return Check("duplicates", level, msg, count=dup, positions=at)

    def _repeats_check(self) -> Check:
        n = self.run_count
        min_run = self.runs[1].min_run
        if not n:
            return Check("repeats", OK, f"no run of period 1-{max(PERIODS)} over {min_run} "
                         "positions")
        tokens, start, p = self.longest
        what = "one token" if p == 1 else f"a {p}-token pattern"
        return Check("repeats", WARNING, f"{_plural(n, 'run')} of a token or 2-"
                     f"{max(PERIODS)}-token pattern repeated over more than {min_run} positions"
                     f", {_positions(self.run_at, n)}; longest {tokens:,} tokens ({what}) at "
                     f"{start:,}", count=n, positions=list(self.run_at))


def _spans(runs: np.ndarray, p: int) -> np.ndarray:
    """Runs of ids[i] == ids[i + p] as the tokens they cover: [[start, end, p], ...]."""
    return np.stack([runs[:, 0], runs[:, 1] + p, np.full(len(runs), p, np.int64)], axis=1)


class _Seen:
    """Window hashes of the files checked so far, for duplicates across files."""

    def __init__(self, dtype: str | None) -> None:
        self.dtype = dtype  # how to open the earlier files again (raw ones need it)
        self.paths: list[Path] = []
        self.hashes: list[np.ndarray] = []


def _duplicates(f: TokenFile, h: np.ndarray, L: int, seen: _Seen | None,
                max_report: int) -> tuple[int, list[int], int]:
    """(windows that repeat an earlier one, first positions, how many of an earlier file's)."""
    toks = f.tokens
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = np.flatnonzero(hs[1:] == hs[:-1]) + 1  # indices into order: not a group's first
    group_first = np.maximum.accumulate(np.where(np.r_[True, hs[1:] != hs[:-1]],
                                                 np.arange(len(hs)), 0))
    later = order[same]
    first = order[group_first[same]]
    same_tokens = np.ones(len(later), dtype=bool)
    for t, (j, i) in enumerate(zip(later[:_VERIFY], first[:_VERIFY])):  # confirm the hash
        same_tokens[t] = np.array_equal(toks[j * L : (j + 1) * L], toks[i * L : (i + 1) * L])
    dup_mask = np.zeros(len(h), dtype=bool)
    dup_mask[later[same_tokens]] = True
    earlier = 0
    if seen is not None and seen.hashes:
        prev = np.concatenate(seen.hashes)
        cross = np.isin(h, prev) & ~dup_mask
        if cross.any():
            # confirm a few against the earlier files' tokens; trust the hash for the rest
            owner = np.concatenate([np.full(len(x), k) for k, x in enumerate(seen.hashes)])
            pos = np.concatenate([np.arange(len(x)) for x in seen.hashes])
            sort = np.argsort(prev, kind="stable")
            opened: dict[int, TokenFile] = {}
            for j in np.flatnonzero(cross)[:_VERIFY]:
                at = sort[np.searchsorted(prev[sort], h[j])]
                k = int(owner[at])
                if k not in opened:
                    opened[k] = TokenFile.open(seen.paths[k], dtype=seen.dtype)
                w = int(pos[at])
                if not np.array_equal(opened[k].tokens[w * L : (w + 1) * L],
                                      toks[j * L : (j + 1) * L]):
                    cross[j] = False
            earlier = int(np.count_nonzero(cross))
            dup_mask |= cross
    idx = np.flatnonzero(dup_mask)
    return int(idx.size), [int(j) * L for j in idx[:max_report]], earlier


# --------------------------------------------------------------------------------------------
# Opening files and resolving the EOS id and vocabulary


def _tokenizer_beside(f: TokenFile) -> Path | None:
    p = f.tokenizer_path or f.path.parent / _TOKENIZER_FILE
    return p if p.is_file() else None


def _load_tokenizer(path: Path) -> Any:
    from kiln.data.prepare import _load_tokenizer as load

    return load(path)


def _resolve_eos(f: TokenFile) -> int:
    if f.eos_token_id is not None:
        return int(f.eos_token_id)
    tok_path = _tokenizer_beside(f)
    if tok_path is not None:
        from kiln.data.prepare import find_eos

        found = find_eos(_load_tokenizer(tok_path))
        if found is not None:
            return found[1]
    raise KilnError(f"token file '{f.path}' has no kiln sidecar or tokenizer.json that gives "
                    "its EOS id; pass --eos-id N (e.g. --eos-id 50279 for OLMo's GPT-NeoX "
                    "tokenizer)")


def _resolve_vocab(f: TokenFile, vocab_size: int | None) -> tuple[int | None, str | None]:
    if vocab_size is not None:
        return vocab_size, "--vocab-size"
    if f.meta.get("vocab_size"):
        return int(f.meta["vocab_size"]), "sidecar"
    tok_path = _tokenizer_beside(f)
    if tok_path is not None:
        return _id_space(tok_path), str(tok_path.name)
    return None, None


def _id_space(tok_path: Path) -> int:
    """Ids a tokenizer can give: its size, or its largest id + 1 when added ids are sparse."""
    tok = _load_tokenizer(tok_path)
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(tok.get_vocab_size(), max(ids, default=-1) + 1)


def _hash_keys(n: int) -> np.ndarray:
    """Random odd 64-bit multipliers (fixed seed: the same window always hashes the same)."""
    rng = np.random.default_rng(0x6B696C6E)
    return rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _chunks(tokens: np.ndarray, lo: int, hi: int,
            chunk: int) -> Iterable[tuple[int, np.ndarray, int]]:
    """(start, buffer, carry): tokens[start - carry : start + n] copied into one buffer."""
    buf = np.empty(chunk + _CARRY, dtype=tokens.dtype)
    for s in range(lo, hi, chunk):
        e = min(s + chunk, hi)
        c = min(_CARRY, s - lo)
        buf[: c + e - s] = tokens[s - c : e]
        yield s, buf[: c + e - s], c


def _check_one(f: TokenFile, *, vocab_size: int | None, bos_id: int | None, checks: Sequence[str],
               seq_len: int, max_report: int, min_run: int, chunk_tokens: int,
               seen: _Seen | None) -> FileReport:
    eos = _resolve_eos(f)
    vocab, source = (_resolve_vocab(f, vocab_size) if "vocab" in checks else (None, None))
    chunk = max(seq_len, -(-chunk_tokens // seq_len) * seq_len)  # windows never cross chunks
    scan = _Scan(f, eos, bos_id, vocab, checks, seq_len, max_report, min_run,
                 _hash_keys(2 * seq_len) if "duplicates" in checks else np.zeros(0, np.uint64))
    for s, ext, c in _chunks(f.tokens, 0, len(f), chunk):
        scan.feed(s, ext, c)
    scan.finish()
    if scan.bad_ids and source == "sidecar":
        tok_path = _tokenizer_beside(f)  # ids may be sparse: the tokenizer's id space decides
        if tok_path is not None and scan.bad_max < _id_space(tok_path):
            scan.bad_ids, scan.bad_at = 0, []
    report = FileReport(f.path, len(f), f.dtype.name, eos, vocab)
    report.checks = scan.results(seen)
    if source and report.checks and report.checks[0].name == "vocab":
        report.checks[0].message += f" (vocab from {source})"
    return report


def check_files(
    paths: Sequence[str | Path] | str | Path,
    *,
    vocab_size: int | None = None,
    dtype: str | None = None,
    eos_id: int | None = None,
    bos_id: int | None = None,
    seq_len: int = 2048,
    max_report: int = 5,
    checks: Sequence[str] = ALL,
    min_run: int = 256,
    chunk_tokens: int = CHUNK_TOKENS,
    on_file: Callable[[FileReport], None] | None = None,
) -> Report:
    """Audit token files (kiln .bin + sidecar, .npy, raw headerless files with ``dtype``).

    ``paths`` are files, folders or globs (as data.paths). Each file is read once, chunk by
    chunk; ``on_file`` is called with each file's report as soon as it is done. Raises
    KilnError when a file cannot be opened or its EOS id is unknown.
    """
    unknown = [c for c in checks if c not in ALL]
    if unknown:
        raise KilnError(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    for name, value, low in (("--seq-len", seq_len, 1), ("--max-report", max_report, 0),
                             ("--vocab-size", vocab_size, 1), ("--eos-id", eos_id, 0),
                             ("--bos-id", bos_id, 0), ("min_run", min_run, 14)):
        if value is not None and value < low:
            raise KilnError(f"{name} must be at least {low}, got {value}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths:
        text = os.path.expanduser(str(p))
        if not any(ch in text for ch in "*?[") and not Path(text).exists():
            raise KilnError(f"'{p}' does not exist; name token files, folders or globs")
        if any(ch in text for ch in "*?[") and not glob.glob(text, recursive=True):
            raise KilnError(f"'{p}' matches no files")
    files = resolve_paths(list(paths))
    report = Report()
    seen = _Seen(dtype) if "duplicates" in checks else None
    for path in files:
        if dtype is None and not sidecar_path(path).is_file():
            with open(path, "rb") as fh:
                if fh.read(6) != b"\x93NUMPY":
                    raise KilnError(f"token file '{path}' has no NumPy header and no kiln "
                                    "sidecar, so its element type is unknown; pass --dtype "
                                    "uint16 or --dtype uint32")
        f = TokenFile.open(path, dtype=dtype, eos_token_id=eos_id)
        fr = _check_one(f, vocab_size=vocab_size, bos_id=bos_id, checks=checks,
                        seq_len=seq_len, max_report=max_report, min_run=min_run,
                        chunk_tokens=chunk_tokens, seen=seen)
        report.files.append(fr)
        if on_file is not None:
            on_file(fr)
    return report


def check_edges(files: Sequence[TokenFile], vocab_size: int | None,
                edge_bytes: int = 1 << 20) -> None:
    """The cheap checks on the first and last ``edge_bytes`` of each file, for kiln train.

    An id outside the vocabulary is a KilnError naming the file and position; doubled
    separators and empty documents are one warning per file. Files without a known EOS id are
    checked for ids only. About a millisecond per file.
    """
    for f in files:
        n = len(f)
        edge = max(1, edge_bytes // f.dtype.itemsize)
        ranges = [(0, min(n, edge))] + ([(max(edge, n - edge), n)] if n > edge else [])
        eos = f.eos_token_id
        checks = ("vocab", "separators", "empty") if eos is not None else ("vocab",)
        scan = _Scan(f, eos, None, vocab_size, checks, 1, 3, 256, np.zeros(0, np.uint64))
        for lo, hi in ranges:
            # the token before a range pairs with its first token (EOS EOS across the cut)
            start = max(lo - 1, 0)
            ext = np.asarray(f.tokens[start:hi])
            scan.feed(lo, ext, lo - start)
        if scan.bad_ids:
            raise KilnError(
                f"token file '{f.path}' holds id {scan.bad_max} (first bad id at position "
                f"{scan.bad_at[0]:,}), outside the model's vocabulary (model.vocab_size="
                f"{vocab_size}); the file is damaged or was made with another tokenizer: run "
                f"kiln data check {f.path}")
        if eos is None:
            continue
        problems = []
        if scan.eos_eos or scan.leading_eos:
            n_empty = scan.eos_eos + int(scan.leading_eos)
            at = sorted(([0] if scan.leading_eos else []) + scan.eos_eos_at)
            problems.append(f"{_plural(n_empty, 'empty document')} (EOS EOS or a leading "
                            f"EOS) {_positions(at[:3], n_empty)}")
        if scan.last_token != eos:
            problems.append("it does not end in EOS")
        if problems:
            where = "in its first and last MiB" if n > edge else "in the whole file"
            warn(f"token file '{f.path}': {'; '.join(problems)} ({where}); documents "
                 f"should be separated by exactly one EOS: run kiln data check {f.path}")


# --------------------------------------------------------------------------------------------
# CLI glue


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``kiln data check``."""
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="token files (.bin with sidecar, .npy, raw headerless), folders "
                             "or globs")
    parser.add_argument("--vocab-size", type=int, metavar="N",
                        help="ids must be below N (default: the sidecar's vocab_size or the "
                             "tokenizer.json beside the data)")
    parser.add_argument("--dtype", choices=["uint16", "uint32"], default=None,
                        help="element type of raw headerless files (OLMo's .npy)")
    parser.add_argument("--eos-id", type=int, metavar="N",
                        help="EOS id (needed when no sidecar or tokenizer.json gives it)")
    parser.add_argument("--bos-id", type=int, metavar="N",
                        help="BOS id: report BOS right after EOS (doubled with a tokenizer "
                             "that adds BOS) and BOS BOS")
    parser.add_argument("--seq-len", type=int, default=2048, metavar="N",
                        help="window size for the duplicate check (default 2048)")
    parser.add_argument("--max-report", type=int, default=5, metavar="N",
                        help="positions listed per finding (default 5)")
    parser.add_argument("--cheap", action="store_true",
                        help="only the cheap checks (vocab, documents, separators, empty)")


def run_check(args: argparse.Namespace) -> int:
    """Run ``kiln data check``: verdict lines per file, a final verdict; exit 1 on FATAL."""

    def show(fr: FileReport) -> None:
        print("\n".join(fr.lines()), flush=True)

    report = check_files(args.paths, vocab_size=args.vocab_size, dtype=args.dtype,
                         eos_id=args.eos_id, bos_id=args.bos_id, seq_len=args.seq_len,
                         max_report=args.max_report,
                         checks=CHEAP if getattr(args, "cheap", False) else ALL, on_file=show)
    print(report.verdict())
    return report.exit_code


def prepare_summary(bin_path: Path) -> tuple[list[str], int]:
    """The cheap checks on a file kiln prepare just wrote: (lines to print, exit code)."""
    report = check_files([bin_path], checks=CHEAP)
    fr = report.files[0]
    if not fr.fatal and not fr.warnings:
        return [f"data check: ok (ids below vocab {fr.vocab_size or 0:,}, EOS count = "
                "documents, no doubled separators or empty documents)"], 0
    return ["data check:"] + [line for c in fr.checks for line in c.lines()], report.exit_code
