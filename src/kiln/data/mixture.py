"""Data mixtures: windows drawn from several corpora in fixed shares.

``data.sources: [{name: web, paths: [...], weight: 0.7}, {name: code, paths: [...], weight:
0.3}]``. Each source is a :class:`WindowDataset` of its own. A *mixture epoch* holds as many
windows as all sources together; source s contributes ``round(weight_s x that)`` of them
(largest remainders, so the counts add up), spread evenly through the epoch: the k-th window
of the epoch comes from the source whose evenly spaced slots ``(j + 1/2) / count_s`` come
next. Within a source the windows are taken in a permutation drawn from ``(seed, source,
source epoch)``; a source with a larger share than its size repeats (a new permutation each
time round), a smaller one is subsampled.

The loader keeps this order (it does not shuffle a mixture), so every prefix of the run holds
each source's share to within a window or two, and the position stays what it is for plain
data, ``(epoch, tokens into the epoch)``: resuming, at another global batch size or world
size too, neither repeats nor skips a window.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kiln.data.loader import WindowDataset
from kiln.errors import KilnError


def shares(weights: list[float], total: int) -> np.ndarray:
    """Integer counts proportional to `weights` that add up to `total` (largest remainders),
    at least one each."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return np.maximum(counts, 1)


class MixtureDataset:
    """Windows of several sources in fixed shares (see the module docstring)."""

    ordered = True  # BatchLoader keeps this order instead of drawing a permutation

    def __init__(self, parts: list[WindowDataset], weights: list[float], names: list[str],
                 seed: int):
        if any(len(p) == 0 for p in parts):
            empty = names[next(i for i, p in enumerate(parts) if len(p) == 0)]
            raise KilnError(f"data source {empty!r} holds no window of {parts[0].seq_len + 1} "
                            "tokens; add data to it or remove it from data.sources")
        self.parts, self.names, self.seed = parts, names, seed
        self.weights = [w / sum(weights) for w in weights]
        self.seq_len = parts[0].seq_len
        self.sizes = np.array([len(p) for p in parts], dtype=np.int64)
        self.counts = shares(weights, int(self.sizes.sum()))
        slots = np.concatenate([(np.arange(n) + 0.5) / n for n in self.counts])
        labels = np.concatenate([np.full(n, s, dtype=np.int32)
                                 for s, n in enumerate(self.counts)])
        ordinals = np.concatenate([np.arange(n, dtype=np.int64) for n in self.counts])
        order = np.argsort(slots, kind="stable")
        self.source, self.ordinal = labels[order], ordinals[order]
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.counts.sum())

    @property
    def files(self):
        return [f for p in self.parts for f in p.files]

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(s)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, s + 1, epoch])
            cached = self._perms[s] = (epoch, rng.permutation(int(self.sizes[s])))
        return cached[1]

    def locate(self, k: int, epoch: int) -> tuple[int, int]:
        """(source, window of that source) of window k of mixture epoch `epoch`."""
        s = int(self.source[k])
        drawn = epoch * int(self.counts[s]) + int(self.ordinal[k])  # the source's n-th draw
        round_, i = divmod(drawn, int(self.sizes[s]))
        return s, int(self._perm(s, round_)[i])

    def batch(self, indices, epoch: int = 0) -> torch.Tensor:
        out = torch.empty((len(indices), self.seq_len + 1), dtype=torch.int64)
        picks = [self.locate(int(k), epoch) for k in indices]
        for s in {s for s, _ in picks}:
            rows = [r for r, (t, _) in enumerate(picks) if t == s]
            out[rows] = self.parts[s].batch([picks[r][1] for r in rows])
        return out

    def sources_of(self, indices, epoch: int = 0) -> list[int]:
        return [self.locate(int(k), epoch)[0] for k in indices]

    def plan(self, windows: int) -> list[dict]:
        """Per source over a run of `windows` windows: windows and tokens drawn, and how many
        times its data is gone through (the repetition factor)."""
        out = []
        for s, name in enumerate(self.names):
            drawn = windows * int(self.counts[s]) / len(self)
            out.append({"name": name, "weight": self.weights[s], "windows": int(self.sizes[s]),
                        "drawn": math.ceil(drawn), "tokens": math.ceil(drawn) * self.seq_len,
                        "epochs": drawn / int(self.sizes[s])})
        return out


class ConcatWindows:
    """Several WindowDatasets end to end (the validation tails of a mixture's sources)."""

    def __init__(self, parts: list[WindowDataset]):
        self.parts = [p for p in parts if len(p)]
        self.seq_len = parts[0].seq_len
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def files(self):
        return [f for p in self.parts for f in p.files]

    def batch(self, indices) -> torch.Tensor:
        rows = []
        for k in indices:
            i = int(np.searchsorted(self._starts, int(k), side="right") - 1)
            rows.append(self.parts[i].batch([int(k) - int(self._starts[i])]))
        return torch.cat(rows) if rows else torch.empty((0, self.seq_len + 1),
                                                        dtype=torch.int64)


def build_mixture(cfg) -> tuple[MixtureDataset, ConcatWindows | None, list]:
    """Training windows of data.sources, validation windows (data.val_paths, or each
    source's held-out tail) and the training files."""
    from kiln.data.remote import open_files
    from kiln.data.tokens import check_vocab

    d = cfg.data
    vocab = cfg.model.vocab_size
    parts, tails, files = [], [], []
    for src in d.sources:
        mine = open_files(src.paths, d)  # URLs are fetched into data.cache_dir first
        check_vocab(mine, vocab)
        part = WindowDataset(mine, d.seq_len, d.stride, vocab_size=vocab)
        if not d.val_paths and d.val_fraction > 0:
            part, tail = part.split_tail(d.val_fraction)
            tails.append(tail)
        parts.append(part)
        files += mine
    train = MixtureDataset(parts, [s.weight for s in d.sources],
                           [s.name for s in d.sources], d.seed)
    val = None
    if d.val_paths:
        val_files = open_files(d.val_paths, d)
        check_vocab(val_files, vocab)
        val = ConcatWindows([WindowDataset(val_files, d.seq_len, d.seq_len, vocab_size=vocab)])
    elif tails:
        val = ConcatWindows(tails)
    return train, val, files
