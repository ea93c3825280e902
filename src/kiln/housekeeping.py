"""Two things a long run does beside its steps: Python's garbage collection at fixed steps,
and a profile of a few steps when asked.

* Garbage collection (trainer.gc_interval): Python's automatic collector runs whenever enough
  objects were allocated, at a moment no rank agrees on; with several ranks one rank's pause
  stalls every other one at the next collective. During training it is off, and every
  gc_interval steps each rank collects the young generations (gc.collect(1)), at the same step
  on every rank; the time it takes is logged as gc_time. A full collection runs before the
  first step and the automatic collector is back on when training ends.
* The profiler (log.profile N): torch.profiler records N steps after two warmup steps and
  writes RUN_DIR/profile/trace-stepA-B.json (open it in https://ui.perfetto.dev or
  chrome://tracing) and top-ops-stepA-B.txt, the operators that took the most time.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch


class GarbageCollector:
    def __init__(self, interval: int):
        self.interval = interval
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> GarbageCollector:
        if self.interval:
            gc.collect()
            gc.disable()
        return self

    def __exit__(self, *exc) -> None:
        if self.interval and self._was_enabled:
            gc.enable()

    def step(self, step: int) -> float:
        """Collect at every gc_interval-th step; the seconds it took (0.0 otherwise)."""
        if not self.interval or step % self.interval:
            return 0.0
        t0 = time.perf_counter()
        gc.collect(1)
        return time.perf_counter() - t0


class Profiler:
    WAIT, WARMUP = 1, 1

    def __init__(self, steps: int, run_dir: Path, device: torch.device, first_step: int,
                 is_main: bool):
        self.steps, self.device, self.is_main = steps, device, is_main
        self.out = Path(run_dir) / "profile"
        begin = first_step + self.WAIT + self.WARMUP + 1
        self.span = (begin, begin + steps - 1)
        self._prof = None

    def __enter__(self) -> Profiler:
        if not self.steps:
            return self
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities, record_shapes=True,
                             schedule=schedule(wait=self.WAIT, warmup=self.WARMUP,
                                               active=self.steps, repeat=1),
                             on_trace_ready=self._write)
        self._prof.__enter__()
        return self

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def __exit__(self, *exc) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
            self._prof = None

    def _write(self, prof) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        name = f"step{self.span[0]}-{self.span[1]}"
        prof.export_chrome_trace(str(self.out / f"trace-{name}.json"))
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30)
        (self.out / f"top-ops-{name}.txt").write_text(table + "\n")
