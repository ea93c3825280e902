"""The learning-rate schedule as data: segments over an absolute step axis.

The LR of the optimizer step that brings the step counter from ``s - 1`` to ``s`` is
``schedule.lr(s)``: the first step of a run uses ``lr(1)`` (never 0 during warmup) and the
last step of an N-step cosine run uses exactly ``final_lr_fraction * peak``.

Segments are ordered by start; step ``s`` follows the last segment that starts before it, so
a later segment overrides the tail of an earlier one. That makes the continued-training
operations edits of data rather than new lambdas:

* :meth:`LRSchedule.relay` keeps everything up to a step and lays a new tail from the LR at
  that step (no jump): finish any warmup, then decay to a new end (``--extend-to``);
* :meth:`LRSchedule.shifted` moves the whole axis (a new run whose step counter restarts at 0
  carries the remaining warmup over automatically);
* :meth:`LRSchedule.build` starts a fresh warmup + decay anywhere (``schedule.restart``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kiln.config import ScheduleConfig


@dataclass
class Segment:
    """LR moves from lr_start at step `start` to lr_end at step `end` with the given shape."""

    shape: str  # "linear" | "cosine" | "constant" | "inv_sqrt"
    start: int
    end: int
    lr_start: float
    lr_end: float
    begin: int | None = None
    """The step after which this segment takes over (default `start`): a segment can take
    over part-way along its own curve, which is how an LR change scales an unfinished one."""
    timescale: float | None = None
    """inv_sqrt: lr_start * sqrt(T / (T + step - start)) with T = timescale (OLMo's
    inverse_sqrt_with_warmup is T = its warmup steps, from the end of warmup); lr_end is the
    LR at `end`, after which it holds."""

    @property
    def takes_over(self) -> int:
        return self.start if self.begin is None else self.begin

    def lr(self, step: float) -> float:
        if self.shape == "constant":
            return self.lr_start
        if self.shape == "inv_sqrt":
            t = float(self.timescale or 0.0)
            elapsed = min(max(step, self.start), max(self.end, self.start)) - self.start
            return self.lr_start * math.sqrt(t / (t + elapsed)) if t + elapsed > 0 else 0.0
        if self.end <= self.start:
            return self.lr_end
        frac = min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)
        if self.shape == "linear":
            return self.lr_start + (self.lr_end - self.lr_start) * frac
        if self.shape == "cosine":
            cos = 0.5 * (1 + math.cos(math.pi * frac))
            return self.lr_end + (self.lr_start - self.lr_end) * cos
        raise ValueError(f"unknown segment shape {self.shape!r}")

    def shifted(self, by: int) -> Segment:
        return Segment(self.shape, self.start + by, self.end + by, self.lr_start, self.lr_end,
                       None if self.begin is None else self.begin + by, self.timescale)

    def scaled(self, factor: float, begin: int | None = None) -> Segment:
        return Segment(self.shape, self.start, self.end, self.lr_start * factor,
                       self.lr_end * factor, self.begin if begin is None else begin,
                       self.timescale)


class LRSchedule:
    """A piecewise schedule over absolute steps; past the last segment's end the LR stays put."""

    def __init__(self, segments: list[Segment], warmup_end: int = 0):
        self.segments = sorted(segments, key=lambda s: s.takes_over)
        self.warmup_end = warmup_end
        """Step at which warmup reaches the peak LR (<= the first step when there is none)."""

    def lr(self, step: int) -> float:
        """LR for the optimizer step that ends at `step` (1-based)."""
        if not self.segments:
            raise ValueError("empty schedule")
        seg = self.segments[0]
        for s in self.segments[1:]:
            if s.takes_over < step:
                seg = s
            else:
                break
        return seg.lr(step)

    @property
    def end(self) -> int:
        return self.segments[-1].end if self.segments else 0

    # -- operations --------------------------------------------------------------------------

    def relay(self, step: int, *, end: int, peak: float, final: float, cfg: ScheduleConfig,
              shape: str | None = None) -> LRSchedule:
        """Keep the schedule up to `step`; from there, finish any warmup (to `peak`), then
        follow `cfg`'s shape (or `shape`) from the LR of that moment to `final` at `end`.
        The LR is continuous at the join."""
        segs = [s for s in self.segments if s.takes_over < step]
        lr_now = self.lr(step) if self.segments else peak
        at = step
        if self.warmup_end > step:
            segs.append(Segment("linear", step, self.warmup_end, lr_now, peak))
            at, lr_now = self.warmup_end, peak
        segs += tail_segments(shape or cfg.name, cfg, at, end, lr_now, final)
        return LRSchedule(segs, warmup_end=self.warmup_end)

    def scaled_after(self, step: int, factor: float) -> LRSchedule:
        """The same plan with every LR after `step` multiplied by `factor` (the past kept):
        what changing the peak LR of a run on resume means."""
        past = [s for s in self.segments if s.takes_over < step]
        future = [s.scaled(factor) for s in self.segments if s.takes_over >= step]
        current = [s.scaled(factor, begin=step) for s in past[-1:]]
        return LRSchedule(past + current + future, self.warmup_end)

    def shifted(self, by: int) -> LRSchedule:
        """The same curve on an axis moved by `by` steps (history may become negative)."""
        return LRSchedule([s.shifted(by) for s in self.segments], self.warmup_end + by)

    # -- persistence and display --------------------------------------------------------------

    def state_dict(self) -> dict:
        segs = [{k: v for k, v in asdict(s).items()
                 if k not in ("begin", "timescale") or v is not None} for s in self.segments]
        return {"segments": segs, "warmup_end": self.warmup_end}

    def load_state_dict(self, state: dict) -> None:
        self.segments = sorted((Segment(**s) for s in state["segments"]),
                               key=lambda s: s.takes_over)
        self.warmup_end = int(state.get("warmup_end", 0))

    @classmethod
    def from_state(cls, state: dict) -> LRSchedule:
        s = cls([])
        s.load_state_dict(state)
        return s

    def key_steps(self, current: int | None = None) -> list[int]:
        """Steps worth printing: 1, segment boundaries, the current step, the end."""
        steps = {1, self.end}
        for s in self.segments:
            steps |= {max(s.takes_over, 1), max(s.end, 1)}
        if current is not None:
            steps |= {current, current + 1}
        return sorted(x for x in steps if 1 <= x <= max(self.end, 1))

    @classmethod
    def build(cls, cfg: ScheduleConfig, peak_lr: float, total_steps: int, warmup_steps: int,
              start: int = 0) -> LRSchedule:
        """A fresh warmup + decay from `start` to `start + total_steps`."""
        final = peak_lr * cfg.final_lr_fraction
        w_end = start + warmup_steps
        segs = []
        if warmup_steps > 0:
            segs.append(Segment("linear", start, w_end, 0.0, peak_lr))
        segs += tail_segments(cfg.name, cfg, w_end, start + total_steps, peak_lr, final)
        return cls(segs, warmup_end=w_end)


def tail_segments(name: str, cfg: ScheduleConfig, start: int, end: int, lr_from: float,
                  final: float) -> list[Segment]:
    """The post-warmup part of schedule `name` from `lr_from` at `start` to `end`."""
    if name == "constant":
        return [Segment("constant", start, end, lr_from, lr_from)]
    if name in ("linear", "cosine"):
        return [Segment(name, start, end, lr_from, final)]
    if name == "wsd":
        decay_start = end - round((end - start) * cfg.decay_fraction)
        return [Segment("constant", start, decay_start, lr_from, lr_from),
                Segment("linear", decay_start, end, lr_from, final)]
    raise ValueError(f"unknown schedule {name!r}")
