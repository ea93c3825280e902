"""The stability watch: every step's loss and gradient norm checked on the device for NaN/inf
and for spikes (trainer.on_nonfinite, trainer.on_spike; docs/stability.md).

Observing costs no host sync: the flags, counts and the spike history live on the device, and
the host reads them at logging steps (:meth:`StabilityWatch.report`), before evaluations and
before saves (:meth:`StabilityWatch.check_finite`). The history is saved with each checkpoint
(:meth:`state_dict`), so a spike right after a resume is judged against the steps before it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kiln import checkpoint as ckpt
from kiln.config import Config
from kiln.errors import KilnError
from kiln.parallel import DistInfo


class StabilityWatch:
    def __init__(self, cfg: Config, device: torch.device, dist_info: DistInfo, run_dir: Path,
                 note: Callable[[str], None], stop: Callable[[str], None]):
        t = cfg.trainer
        self.cfg, self.device, self.dist, self.run_dir = cfg, device, dist_info, run_dir
        self.note, self.stop = note, stop  # say something on the console; end the run
        self.window, self.zscore = t.spike_window, t.spike_zscore
        self.skip_bad = t.on_nonfinite == "skip"
        self.skip_spike = t.on_spike in ("skip", "stop")
        # the first step whose loss or gradient norm was not finite under on_nonfinite=stop
        # (0: none), read by check_finite
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)
        # skipped updates, the first; non-finite steps let through (warn), the first; spikes,
        # the first
        self.events = torch.zeros(6, dtype=torch.long, device=device)
        self.history = torch.zeros(2, self.window, device=device)  # loss, grad norm
        self.history_len = 0

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor
                ) -> torch.Tensor | None:
        """Record step `step` (on the device) and return the flag of an update to skip (None:
        no policy skips anything)."""
        t = self.cfg.trainer
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        x = torch.stack([loss.float(), grad_norm.float()])
        spike = bad & False  # (a device bool without a new allocation per step)
        if self.history_len >= self.window:
            std, mean = torch.std_mean(self.history, dim=1)
            spike = ((x - mean) > self.zscore * std.clamp_min(1e-6)).any() & ~bad
        ok = ~bad & ~spike  # only ordinary steps join the history
        col = self.history_len % self.window
        self.history[:, col] = torch.where(ok, x, self.history[:, col])
        self.history_len += 1  # (a step in the history's place keeps the old value)
        ev = self.events
        skip = (bad & self.skip_bad) | (spike & self.skip_spike)
        if t.on_nonfinite == "stop":
            self.bad_step = torch.where((self.bad_step == 0) & bad, step, self.bad_step)
        elif t.on_nonfinite == "warn":
            ev[2] += bad.long()
            ev[3] = torch.where((ev[3] == 0) & bad, step, ev[3])
        ev[0] += skip.long()
        ev[1] = torch.where((ev[1] == 0) & skip, step, ev[1])
        ev[4] += spike.long()
        ev[5] = torch.where((ev[5] == 0) & spike, step, ev[5])
        if t.on_spike == "stop" and bool(spike):  # (a host sync per step: stop is opt-in)
            self.stop(f"a loss spike at step {step}")
        return skip if (self.skip_bad or self.skip_spike) else None

    def report(self) -> dict[str, float]:
        """At a logging step (the host reads anyway): skipped updates, non-finite steps and
        spikes since the last report, each also said on the console once. All ranks call."""
        if not self.events.any() and not self.dist.enabled:
            return {}
        ev = self.events.clone()
        if self.dist.enabled:  # the same verdict on every rank
            dist.all_reduce(ev, op=dist.ReduceOp.MAX)
        if not ev.any():
            return {}
        skipped, first_skip, nonfinite, first_bad, spikes, first_spike = ev.tolist()
        self.events.zero_()
        out: dict[str, float] = {}
        t = self.cfg.trainer
        if spikes:
            out["spikes"] = spikes
            self.note(f"kiln: {spikes} loss / gradient-norm spike(s) since the last log line, "
                      f"the first at step {first_spike} (z-score > {t.spike_zscore:g} over "
                      f"{t.spike_window} steps; trainer.on_spike={t.on_spike})")
        if nonfinite:
            out["nonfinite_steps"] = nonfinite
            self.note(f"kiln: {nonfinite} step(s) with a non-finite loss or gradient norm, the "
                      f"first at step {first_bad}, applied (trainer.on_nonfinite=warn); a "
                      "checkpoint of non-finite weights is never written")
        if skipped:
            out["skipped_updates"] = skipped
            self.note(f"kiln: skipped the update of {skipped} batch(es), the first at step "
                      f"{first_skip} (trainer.on_nonfinite={t.on_nonfinite}, trainer.on_spike="
                      f"{t.on_spike})")
        return out

    def check_finite(self, step: int, module: torch.nn.Module | None = None) -> None:
        """Stop with a one-line error if any step so far had a non-finite loss or gradient
        (or, given `module`, if any weight is non-finite), before anything is saved or logged
        from them. All ranks must call (one tiny all-reduce when distributed)."""
        first = self.bad_step.clone()
        if module is not None:
            first = torch.where((first == 0) & ~all_finite(module.parameters()), step, first)
        if self.dist.enabled:
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        bad_step = int(first.item())
        if bad_step == 0:
            return
        latest = ckpt.latest_checkpoint(self.run_dir)
        lr = self.cfg.optim.lr
        if latest is not None:  # a tenth of the lower of now's and the good checkpoint's LR
            lr = min(lr, float(ckpt.read_config_dict(latest).get("optim", {}).get("lr", lr)))
        lower = f"{lr / 10:.3g}"
        what = f"the loss or gradients became non-finite (NaN or inf) at step {bad_step}"
        if latest is None:
            raise KilnError(f"{what}; no checkpoint was written, none holds non-finite weights; "
                            f"start again with a lower peak LR (--optim.lr={lower}) or a longer "
                            "schedule.warmup")
        raise KilnError(f"{what}; no checkpoint with non-finite weights was written: "
                        f"{latest} is the last good one; resume from it with a lower peak LR "
                        f"(the schedule is scaled to it): kiln train {self.run_dir} "
                        f"--optim.lr={lower}")

    # -- saved with each checkpoint (trainer.json), so the window survives a resume --------

    def state_dict(self) -> dict[str, Any]:
        """The ring of ordinary steps the spike z-score compares with, as it is on the device
        (so that a resumed run judges exactly as the uninterrupted one would)."""
        return {"history": self.history.tolist(), "filled": self.history_len}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """The history a checkpoint saved (a checkpoint of an earlier kiln has none: the
        detector then waits for spike_window steps). Under another spike_window the latest
        steps are kept, oldest first."""
        if not state or not isinstance(state.get("history"), list):
            return
        try:
            ring = torch.tensor(state["history"], dtype=torch.float32)
            filled = int(state["filled"])
        except (TypeError, ValueError, KeyError):
            return
        if ring.dim() != 2 or ring.size(0) != 2 or filled < 0 or not ring.isfinite().all():
            return
        width = ring.size(1)
        if width == self.window:
            self.history.copy_(ring)
            self.history_len = filled
            return
        n = min(filled, width, self.window)
        order = [(filled - n + i) % width for i in range(n)]  # the latest n, oldest first
        self.history.zero_()
        self.history[:, :n] = ring[:, order].to(self.device)
        self.history_len = n


def all_finite(tensors) -> torch.Tensor:
    """A bool tensor (no host sync): every value of every tensor (or local shard) is finite.
    The largest magnitude is inf or NaN exactly when a value is, and never overflows."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    local = [t.detach() for t in local if t.numel()]
    if not local:
        return torch.tensor(True)
    return torch.stack(torch._foreach_norm(local, float("inf"))).isfinite().all()
