"""AdamW with sensible parameter groups, and the learning-rate schedule as data.

An :class:`LRSchedule` is a list of segments over an absolute step axis. The LR of the
optimizer step that brings the step counter from ``s - 1`` to ``s`` is ``schedule.lr(s)``,
so the first step of a run uses ``lr(1)`` (never 0 during warmup) and the last step of an
``N``-step cosine run uses exactly ``final_lr_fraction * peak``. Because the schedule is
data, it is saved with the run and can be extended or restarted later without re-deriving
it from a config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from kiln.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters into decayed and non-decayed groups.

    By default only the weight matrices of Linear layers decay; norms, biases and the
    embedding do not (decaying an embedding row pulls rarely seen tokens towards zero).
    """
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embed_ids:
            (decay if cfg.decay_embeddings else no_decay).append(p)
        elif p.ndim < 2:
            (decay if cfg.decay_norms_and_biases else no_decay).append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW, fused on CUDA (one kernel for all tensors), foreach elsewhere."""
    on_cuda = any(p.is_cuda for p in model.parameters())
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs
    )


# --------------------------------------------------------------------------------------------
# The schedule


@dataclass
class Segment:
    """LR moves from lr_start at step `start` to lr_end at step `end` with the given shape."""

    shape: str  # "linear" | "cosine" | "constant"
    start: int
    end: int
    lr_start: float
    lr_end: float

    def lr(self, step: float) -> float:
        if self.shape == "constant" or self.end <= self.start:
            return self.lr_end if self.shape != "constant" else self.lr_start
        frac = min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)
        if self.shape == "linear":
            return self.lr_start + (self.lr_end - self.lr_start) * frac
        if self.shape == "cosine":
            cos = 0.5 * (1 + math.cos(math.pi * frac))
            return self.lr_end + (self.lr_start - self.lr_end) * cos
        raise ValueError(f"unknown segment shape {self.shape!r}")


class LRSchedule:
    """A piecewise schedule over absolute steps; after the last segment the LR stays put."""

    def __init__(self, segments: list[Segment]):
        self.segments = list(segments)

    def lr(self, step: int) -> float:
        """LR for the optimizer step that ends at `step` (1-based)."""
        for seg in self.segments:
            if step <= seg.end:
                return seg.lr(step)
        last = self.segments[-1]
        return last.lr_end if last.shape != "constant" else last.lr_start

    @property
    def end(self) -> int:
        return self.segments[-1].end if self.segments else 0

    def state_dict(self) -> dict:
        return {"segments": [asdict(s) for s in self.segments]}

    def load_state_dict(self, state: dict) -> None:
        self.segments = [Segment(**s) for s in state["segments"]]

    def describe(self) -> list[str]:
        return [
            f"steps {s.start:>7,} -> {s.end:>7,}: {s.shape:<8} {s.lr_start:.3g} -> {s.lr_end:.3g}"
            for s in self.segments
        ]

    @classmethod
    def build(cls, cfg: ScheduleConfig, peak_lr: float, total_steps: int, warmup_steps: int,
              start: int = 0) -> LRSchedule:
        """The schedule a config describes, for steps start .. start + total_steps."""
        final = peak_lr * cfg.final_lr_fraction
        w_end = start + warmup_steps
        end = start + total_steps
        segs = []
        if warmup_steps > 0:
            segs.append(Segment("linear", start, w_end, 0.0, peak_lr))
        if cfg.name == "constant":
            segs.append(Segment("constant", w_end, end, peak_lr, peak_lr))
        elif cfg.name in ("linear", "cosine"):
            segs.append(Segment(cfg.name, w_end, end, peak_lr, final))
        elif cfg.name == "wsd":
            decay_start = end - round((end - w_end) * cfg.decay_fraction)
            segs.append(Segment("constant", w_end, decay_start, peak_lr, peak_lr))
            segs.append(Segment("linear", decay_start, end, peak_lr, final))
        else:
            raise ValueError(f"unknown schedule {cfg.name!r}")
        return cls(segs)
