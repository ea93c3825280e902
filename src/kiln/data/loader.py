"""Fixed-length windows over token files, in a deterministic and resumable order.

An instance is a window of ``seq_len + 1`` tokens (inputs are the first seq_len, targets the
last seq_len); windows start every ``stride`` tokens inside each file (stride = seq_len by
default, so no token is a target twice in an epoch). The order of an epoch is a permutation
drawn from ``(seed, epoch)``; the position is ``(epoch, tokens consumed in that epoch)``, so a
resume with another global batch size or world size continues exactly where the last run
stopped.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from kiln.data.tokens import TokenFile
from kiln.errors import KilnError


class WindowDataset:
    """Windows of seq_len + 1 tokens over a list of token files (windows never cross files)."""

    def __init__(self, files: list[TokenFile], seq_len: int, stride: int | None = None,
                 window_range: tuple[int, int] | None = None, vocab_size: int | None = None):
        self.files = files
        self.seq_len = seq_len
        self.stride = stride or seq_len
        self.vocab_size = vocab_size
        """When set, every batch is checked to hold only ids in [0, vocab_size)."""
        counts = [
            max(0, (len(f) - (seq_len + 1)) // self.stride + 1) if len(f) > seq_len else 0
            for f in files
        ]
        self._starts = np.cumsum([0] + counts)  # first global window index of each file
        total = int(self._starts[-1])
        lo, hi = window_range if window_range is not None else (0, total)
        self.lo, self.hi = lo, min(hi, total)

    def __len__(self) -> int:
        return max(0, self.hi - self.lo)

    def split_tail(self, fraction: float) -> tuple[WindowDataset, WindowDataset]:
        """(head, tail) with the last `fraction` of windows held out in the tail."""
        n_tail = math.ceil(len(self) * fraction) if fraction > 0 else 0
        cut = self.hi - n_tail
        head = WindowDataset(self.files, self.seq_len, self.stride, (self.lo, cut),
                             self.vocab_size)
        tail = WindowDataset(self.files, self.seq_len, self.stride, (cut, self.hi),
                             self.vocab_size)
        return head, tail

    def _locate(self, i: int) -> tuple[TokenFile, int]:
        """(file, first token position) of window i."""
        g = self.lo + i
        f = int(np.searchsorted(self._starts, g, side="right") - 1)
        return self.files[f], (g - int(self._starts[f])) * self.stride

    def window(self, i: int) -> np.ndarray:
        f, start = self._locate(i)
        return f.tokens[start : start + self.seq_len + 1]

    def batch(self, indices) -> torch.Tensor:
        """A LongTensor [len(indices), seq_len + 1]; with vocab_size set, ids outside the
        vocabulary stop here (no sidecar is trusted for that) instead of reaching the
        embedding, where they crash a CPU run and corrupt or assert on a GPU."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = self.window(int(i))  # (a uint64 id past int64 turns negative here)
        if self.vocab_size is not None and out.size:
            if int(out.min()) < 0 or int(out.max()) >= self.vocab_size:
                self._refuse(indices, out)
        return torch.from_numpy(out)

    def _refuse(self, indices, out: np.ndarray) -> None:
        bad = (out < 0) | (out >= self.vocab_size)
        row, col = np.unravel_index(int(np.argmax(bad)), bad.shape)
        f, start = self._locate(int(indices[row]))
        said = f.meta.get("max_token_id")
        sidecar = f"; its sidecar claims the largest id is {said}" if said is not None else ""
        raise KilnError(
            f"token file '{f.path}' holds id {int(out[row, col])} at position "
            f"{start + int(col):,}, outside the model's vocabulary (model.vocab_size="
            f"{self.vocab_size}){sidecar}; the file is damaged or was made with another "
            "tokenizer: re-run kiln prepare with the model's tokenizer"
        )


@dataclass
class LoaderState:
    epoch: int = 0
    tokens_in_epoch: int = 0
    """Tokens of this epoch's permutation consumed by completed steps (all ranks together)."""

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "tokens_in_epoch": self.tokens_in_epoch}


class BatchLoader:
    """Global batches in the (seed, epoch) order; each rank gets its contiguous slice.

    Batches are produced ``prefetch`` ahead on a background thread. ``state_dict()`` describes
    what the training loop has taken, not what the thread has prepared.
    """

    def __init__(self, dataset: WindowDataset, global_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, prefetch: int = 4,
                 pin_memory: bool = False):
        if len(dataset) < global_batch_size:
            raise KilnError(
                f"the training data holds {len(dataset)} windows of {dataset.seq_len + 1} tokens,"
                f" fewer than one global batch of {global_batch_size}; add data or lower "
                "trainer.global_batch_size / data.seq_len"
            )
        if global_batch_size % world_size:
            raise KilnError(f"global batch {global_batch_size} does not split over "
                            f"{world_size} ranks")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.prefetch = prefetch
        self.pin_memory = pin_memory  # for CUDA: the copy to the device can then be async
        self.state = LoaderState()
        self.last_sources: list[int] | None = None
        """For a mixture: the source of each row of the batch next_batch returned last."""
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._perm_cache: tuple[int, np.ndarray] | None = None

    # -- order -------------------------------------------------------------------------------

    def permutation(self, epoch: int) -> np.ndarray:
        if getattr(self.dataset, "ordered", False):  # a mixture: its order is its own
            return np.arange(len(self.dataset))
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = (epoch, rng.permutation(len(self.dataset)))
        return self._perm_cache[1]

    def _advance(self, state: LoaderState) -> tuple[np.ndarray, LoaderState]:
        """Global-batch window indices at `state`, and the state after taking them."""
        seq = self.dataset.seq_len
        pos = state.tokens_in_epoch // seq
        epoch = state.epoch
        if pos + self.global_batch_size > len(self.dataset):  # drop the epoch's ragged tail
            epoch, pos = epoch + 1, 0
        indices = self.permutation(epoch)[pos : pos + self.global_batch_size]
        return indices, LoaderState(epoch, (pos + self.global_batch_size) * seq)

    def _local(self, indices: np.ndarray, epoch: int) -> torch.Tensor:
        n = self.global_batch_size // self.world_size
        mine = indices[self.rank * n : (self.rank + 1) * n]
        batch = (self.dataset.batch(mine, epoch=epoch) if getattr(self.dataset, "ordered", False)
                 else self.dataset.batch(mine))
        return batch.pin_memory() if self.pin_memory else batch

    # -- iteration ---------------------------------------------------------------------------

    def _produce(self, state: LoaderState) -> None:
        assert self._queue is not None
        try:
            while not self._stop.is_set():
                indices, state = self._advance(state)
                item = (self._local(indices, state.epoch), state, self._sources(indices, state))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surface loader errors in the training thread
            self._queue.put(e)

    def next_batch(self) -> torch.Tensor:
        """This rank's share of the next global batch: LongTensor [local_batch, seq_len + 1]."""
        if self.prefetch <= 0:
            indices, self.state = self._advance(self.state)
            self.last_sources = self._sources(indices, self.state)
            return self._local(indices, self.state.epoch)
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._stop.clear()
            self._thread = threading.Thread(target=self._produce, args=(self.state,), daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self.state, self.last_sources = item
        return batch

    def _sources(self, indices: np.ndarray, state: LoaderState) -> list[int] | None:
        """A mixture's source of each row of this rank's batch (None for plain data)."""
        if not hasattr(self.dataset, "sources_of"):
            return None
        n = self.global_batch_size // self.world_size
        return self.dataset.sources_of(indices[self.rank * n : (self.rank + 1) * n],
                                       state.epoch)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            self._queue = None

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        out = {**self.state.as_dict(), "seq_len": self.dataset.seq_len, "seed": self.seed,
               "num_windows": len(self.dataset)}
        if hasattr(self.dataset, "counts"):  # a mixture: its windows per source and epoch
            out["mixture"] = dict(zip(self.dataset.names, map(int, self.dataset.counts)))
        return out

    def load_state_dict(self, state: dict) -> None:
        self.close()
        if state.get("seq_len", self.dataset.seq_len) != self.dataset.seq_len:
            raise KilnError(
                f"the checkpoint's data position was counted with seq_len {state['seq_len']}, "
                f"this run uses {self.dataset.seq_len}; keep data.seq_len when resuming"
            )
        mine = self.state_dict().get("mixture")
        if state.get("mixture") != mine:
            raise KilnError(
                f"the checkpoint's data position was counted in another data mixture "
                f"({state.get('mixture') or 'data.paths'} windows per epoch, this run "
                f"{mine or 'data.paths'}); a run keeps its mixture: to switch to a new one, "
                "start a new run with init.from and init.load_data_position=false")
        self.state = LoaderState(int(state["epoch"]), int(state["tokens_in_epoch"]))


def eval_indices(dataset: WindowDataset, count: int) -> np.ndarray:
    """A fixed, evenly spread set of windows for validation (the same at every evaluation)."""
    n = len(dataset)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    count = min(count, n)
    return np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))
