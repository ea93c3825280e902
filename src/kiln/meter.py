"""What a step costs and yields, measured between logging steps: tokens/s, model FLOPs and MFU,
the wait for data, forward+backward and optimizer time (CPU), peak memory, each mixture
source's loss, and the last checkpoint's save time and size (docs/stability.md).

The step adds host timers and device sums to the meter; :meth:`Meter.record` turns them into
one metrics line and starts the next interval. Peak memory is per interval: on CUDA the peak
statistics are reset after each line.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from kiln.parallel import DistInfo


class Meter:
    def __init__(self, device: torch.device, dist_info: DistInfo, flops_per_token: float,
                 peak_flops: float | None, source_names: list[str], tokens: int, step: int):
        self.device, self.dist = device, dist_info
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        """Dense peak FLOP/s of one device (kiln.hardware); None: no MFU is reported."""
        self.source_names = source_names
        self.source_sums = torch.zeros(2, len(source_names), device=device)  # loss, windows
        self.costs = {"data_wait": 0.0, "fwd_bwd": 0.0, "optim": 0.0, "gc": 0.0}
        self.extra: dict[str, float] = {}  # the last checkpoint's figures, until the next line
        self.start(tokens, step)

    def start(self, tokens: int, step: int) -> None:
        """Begin an interval (at the start of training; a tracker's start-up is not in it)."""
        self.t0, self.tokens0, self.step0 = time.perf_counter(), tokens, step

    def add(self, name: str, seconds: float) -> None:
        self.costs[name] += seconds

    def add_sources(self, sources: torch.Tensor, per_window: torch.Tensor) -> None:
        """Each window's loss to its mixture source's running sums (on the device)."""
        self.source_sums[0].index_add_(0, sources, per_window.float())
        self.source_sums[1].index_add_(0, sources, torch.ones_like(per_window).float())

    def source_losses(self) -> dict[str, float]:
        """Mean training loss of each mixture source since the last line (all ranks call;
        empty for plain data)."""
        if not self.source_names:
            return {}
        sums = self.source_sums.clone()
        if self.dist.enabled:
            dist.all_reduce(sums)
        self.source_sums.zero_()
        totals, counts = sums.tolist()
        return {f"loss_{name}": t / c for name, t, c in zip(self.source_names, totals, counts)
                if c}

    def record(self, step: int, tokens: int) -> dict[str, Any]:
        """The interval that ends at `step` as metrics: throughput, MFU, costs per step, peak
        memory, per-source losses and the last checkpoint's figures. All ranks call."""
        now = time.perf_counter()
        seconds = max(now - self.t0, 1e-9)
        steps = max(step - self.step0, 1)
        tps = (tokens - self.tokens0) / seconds
        out: dict[str, Any] = {"tokens_per_sec": tps,
                               "model_flops_per_sec": tps * self.flops_per_token,
                               "step_time": seconds / steps}
        if self.peak_flops:  # per-device model FLOPs over the device's dense peak
            out["mfu"] = tps * self.flops_per_token / (self.peak_flops * self.dist.world_size)
        out.update(self.source_losses())
        c = self.costs
        out["data_wait"] = c["data_wait"] / steps
        out["data_wait_share"] = c["data_wait"] / seconds
        if c["gc"]:
            out["gc_time"] = c["gc"] / steps
        if self.device.type == "cpu":  # on CUDA host timers would measure kernel launches
            out["fwd_bwd_time"] = c["fwd_bwd"] / steps
            out["optim_time"] = c["optim"] / steps
            import resource

            out["peak_mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        elif self.device.type == "cuda":
            out["peak_mem_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)  # the next line: its own peak
        out.update(self.extra)
        self.extra = {}
        self.costs = dict.fromkeys(c, 0.0)
        self.t0, self.tokens0, self.step0 = now, tokens, step
        return out
