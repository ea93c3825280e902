"""Saving a run's checkpoints: when (checkpoint.interval, the final save), how (now, or in the
background with checkpoint.async), one retry policy for every way (checkpoint.on_save_error),
and the free-space check before each save.

Three ways to save, one promise: a checkpoint folder appears whole (kiln.checkpoint writes it
under a temporary name and renames it) or not at all, and a save that fails after its retries
stops the run in one line with the earlier checkpoints untouched.

* now: every rank takes part (unsharded: the state is gathered to rank 0, which writes;
  sharded: every rank writes its shards, rank 0 adds the small files and renames);
* in the background, unsharded: training pauses only for rank 0 to gather the state; a thread
  copies and writes it (on CPU the copy is taken while the next forward and backward run, and
  the next optimizer step waits for it);
* in the background, sharded: every rank copies its shards to host memory, then a thread per
  rank writes them with torch.distributed.checkpoint, its collectives on a gloo group of its
  own, and rank 0's thread adds the small files and renames.

Each attempt ends in a verdict every rank that took part shares, so a retry is tried by all of
them together (waiting 2, 4, 8, ... s, at most 60 s).
"""

from __future__ import annotations

import shutil
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from kiln import checkpoint as ckpt
from kiln.errors import KilnError, warn
from kiln.parallel import barrier
from kiln.safeload import dcp_root_cause

if TYPE_CHECKING:
    from kiln.trainer import Trainer


class Saver:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        c = self.cfg = trainer.cfg.checkpoint
        self.sharded = (trainer.dp in ("fsdp", "hsdp") if c.sharded == "auto"
                        else bool(c.sharded))
        self.retries = int(c.on_save_error.split()[1]) if c.on_save_error != "stop" else 0
        # background sharded saves run their collectives on a group of their own
        self.group = (dist.new_group(backend="gloo") if c.async_ and self.sharded
                      and trainer.dist.enabled else None)
        self.stalls: list[float] = []  # seconds each background save paused training
        self._thread: threading.Thread | None = None
        self._result: tuple[Path | None, str | None, float, float] | None = None
        self._copied: threading.Event | None = None  # set when a background copy is done
        self._copy_wait = 0.0
        # an optimizer step waits for a background save that still copies what it changes
        trainer.optimizer.register_step_pre_hook(self._wait_for_copy)

    # -- when -------------------------------------------------------------------------------

    def maybe_save(self, stop_step: int) -> None:
        """Save at every checkpoint.interval steps (the last step saves at the end)."""
        step, interval = self.trainer.step, self.cfg.interval
        if interval and step % interval == 0 and step != stop_step:
            self.save()

    def check_at_start(self, stop_step: int) -> None:
        """Before the first step: a run that cannot save never starts; and what a kill after
        the last save left for retention is pruned."""
        t, c = self.trainer, self.cfg
        if c.check_free_space and (c.interval > 0 or c.save_final) and t.step < stop_step:
            self.check_free_space(start=t.step)
        if t.dist.is_main and c.keep_last > 0:
            ckpt.prune(t.run_dir, c.keep_last)

    # -- how --------------------------------------------------------------------------------

    def save(self, wait: bool = False) -> None:
        """Save a checkpoint of the current step: now, or (checkpoint.async) by starting a
        background write, which `wait` waits for. Every rank calls."""
        t = self.trainer
        if not self.cfg.async_:
            t0 = time.perf_counter()
            path = self.save_now()
            t.meter.extra = {"ckpt_save_time": time.perf_counter() - t0}
            if t.dist.is_main:
                t.meter.extra["ckpt_mib"] = ckpt.checkpoint_bytes(path) / 2**20
            t.emit("on_checkpoint", path)
            return
        self._start_background()
        if wait:
            self.poll(wait=True)

    def save_now(self) -> Path:
        """Save the current step before returning (every rank). Refuses (KilnError) to save
        non-finite weights; a failed save stops the run after checkpoint.on_save_error's
        retries."""
        t = self.trainer
        t.watch.check_finite(t.step, t.module)
        error = self._retry(self._save_once, before=self._check_space_if_asked)
        if error is not None:
            raise KilnError(error)
        return ckpt.checkpoints_dir(t.run_dir) / f"step{t.step}"

    def _save_once(self) -> str | None:
        """One attempt: None when every rank succeeded, else the error (rank 0's own, or a
        note that another rank failed), the same verdict on every rank."""
        t = self.trainer
        parts = self._parts()
        try:
            if self.sharded:
                tmp = ckpt.temp_dir(t.run_dir, t.step, clean=t.dist.is_main)
                if t.dist.is_main:
                    tmp.mkdir()
                barrier(t.dist)
                ckpt.save_sharded_state(ckpt.sharded_state(t.module, t.optimizer), tmp)
                barrier(t.dist)
                if t.dist.is_main:
                    ckpt.save(t.run_dir, t.step, model=None, tmp=tmp, **parts)
            else:
                msd, osd = ckpt.gather_full_state(t.module, t.optimizer)
                if t.dist.is_main:
                    ckpt.save(t.run_dir, t.step, model=msd, optim=osd, **parts)
            error = None
        except KilnError as e:
            error = str(e)
        except OSError as e:  # outside the save proper (its temporary folder)
            error = (f"could not write checkpoint step{t.step} "
                     f"({ckpt.save_failure(e, t.run_dir)}); earlier checkpoints are untouched")
        return self._verdict(error, t.step)

    def _parts(self) -> dict[str, Any]:
        """What ckpt.save writes besides the tensors of the model and optimizer."""
        t = self.trainer
        rng = {"cpu": torch.get_rng_state()}
        if t.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        return dict(trainer=t.trainer_state(), config_yaml=t.saved_config_yaml(), rng=rng,
                    tokenizer=t.tokenizer_path, keep_last=self.cfg.keep_last)

    # -- one retry policy -------------------------------------------------------------------

    def _retry(self, attempt: Callable[[], str | None],
               before: Callable[[], None] | None = None) -> str | None:
        """Run `attempt` (None: saved; else the error, a verdict shared by every rank that
        takes part) until it succeeds or checkpoint.on_save_error's retries are spent; the
        last error, or None."""
        error = None
        for n in range(self.retries + 1):
            if before is not None:
                before()
            error = attempt()
            if error is None:
                return None
            if n < self.retries:
                wait = min(60, 2 ** (n + 1))
                warn(f"{error}; trying again in {wait} s (attempt {n + 2} of "
                     f"{self.retries + 1}, checkpoint.on_save_error={self.cfg.on_save_error})")
                time.sleep(wait)
        return error

    def _verdict(self, error: str | None, step: int, group=None) -> str | None:
        """This rank's error, or another rank's failure, agreed by every rank of `group`."""
        t = self.trainer
        if not t.dist.enabled:
            return error
        failed = torch.tensor(float(error is not None),
                              device="cpu" if group is not None else t.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
        if failed.item() and error is None:
            return (f"another rank could not write checkpoint step{step} (see its error); "
                    "earlier checkpoints are untouched")
        return error

    # -- in the background (checkpoint.async) -------------------------------------------------

    def _start_background(self) -> None:
        """Every rank calls this; training pauses only for the copy of the state."""
        t = self.trainer
        self.poll(wait=True)  # never two saves in flight
        t.watch.check_finite(t.step, t.module)
        self._check_space_if_asked()
        t0 = time.perf_counter()
        if self.sharded:
            self._start_sharded_background(t0)
            return
        msd, osd = ckpt.gather_full_state(t.module, t.optimizer)
        if not t.dist.is_main:
            return
        parts, step, stall = self._parts(), t.step, time.perf_counter() - t0
        # On CPU the gathered tensors are the live ones: the thread copies them first, while
        # the next forward and backward run (they change no weight and no Adam moment); the
        # next optimizer step waits for the copy (_wait_for_copy).
        copy = (lambda x: x.clone()) if t.device.type == "cpu" else (lambda x: x)
        self._copied, self._copy_wait = threading.Event(), 0.0

        def write() -> None:
            nonlocal msd, osd
            began = time.perf_counter()
            try:
                msd = {k: copy(v) for k, v in ckpt.dedupe_tied(msd).items()}  # tied head once
                osd = tree_map(lambda x: copy(x) if isinstance(x, torch.Tensor) else x, osd)
            finally:
                self._copied.set()
            saved: list[Path] = []

            def once() -> str | None:
                try:
                    saved.append(ckpt.save(t.run_dir, step, model=msd, optim=osd, **parts))
                    return None
                except KilnError as e:
                    return str(e)

            error = self._retry(once)
            self._result = (saved[-1] if saved else None, error, stall,
                            time.perf_counter() - began)

        self._run(write, step)

    def _start_sharded_background(self, t0: float) -> None:
        """Every rank: copy this rank's shards to host memory (the pause), then write them
        from a thread with torch.distributed.checkpoint on the save group; rank 0's thread
        adds the small files and renames the folder into place."""
        import torch.distributed.checkpoint as dcp

        t = self.trainer
        staged = _to_host(ckpt.sharded_state(t.module, t.optimizer))
        tmp = ckpt.temp_dir(t.run_dir, t.step, clean=t.dist.is_main)
        if t.dist.is_main:
            tmp.mkdir()
        barrier(t.dist)
        parts = self._parts() if t.dist.is_main else {}
        step, stall = t.step, time.perf_counter() - t0
        self._copy_wait = 0.0

        def write() -> None:
            began = time.perf_counter()
            saved: list[Path] = []

            def once() -> str | None:
                error = None
                try:
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=".*assuming the intent is")
                        dcp.save(staged, checkpoint_id=str(tmp / ckpt.SHARDED),
                                 process_group=self.group, no_dist=not t.dist.enabled)
                except Exception as e:  # noqa: BLE001 - the write's own error, in one line
                    error = (f"could not write sharded checkpoint step{step} "
                             f"({ckpt.save_failure(dcp_root_cause(e), tmp.parent)}); earlier "
                             "checkpoints are untouched and the partial one was removed")
                    if t.dist.is_main:
                        shutil.rmtree(tmp, ignore_errors=True)
                if error is None and t.dist.is_main:
                    try:
                        saved.append(ckpt.save(t.run_dir, step, model=None, tmp=tmp, **parts))
                    except KilnError as e:
                        error = str(e)
                return self._verdict(error, step, group=self.group)

            error = self._retry(once)
            if error is not None and t.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self._result = (saved[-1] if saved else None, error, stall,
                            time.perf_counter() - began)

        self._run(write, step)

    def _run(self, write: Callable[[], None], step: int) -> None:
        self._result = None
        self._thread = threading.Thread(target=write, name=f"kiln-save-step{step}")
        self._thread.start()

    def _wait_for_copy(self, optimizer, args, kwargs) -> None:
        """(An optimizer step pre-hook) Wait until a background save has copied the weights
        and Adam moments that this step is about to change."""
        if self._copied is not None:
            t0 = time.perf_counter()
            self._copied.wait()
            self._copied = None
            self._copy_wait += time.perf_counter() - t0

    def poll(self, wait: bool = False, raise_error: bool = True) -> None:
        """Report a background save that has ended (or, with `wait`, wait for it): its path
        to the callbacks with the pause it cost, or its error (the run stops)."""
        t = self.trainer
        if self._thread is None or (self._thread.is_alive() and not wait):
            return
        self._thread.join()
        self._thread = None
        path, error, stall, took = self._result
        stall += self._copy_wait  # and the optimizer step that waited for the copy
        if error is not None:
            if raise_error:
                raise KilnError(f"background save failed: {error}")
            return
        self.stalls.append(stall)
        t.meter.extra = {"ckpt_stall_time": stall, "ckpt_save_time": took}
        if path is None:  # another rank's part of a sharded save
            return
        t.meter.extra["ckpt_mib"] = ckpt.checkpoint_bytes(path) / 2**20
        t.emit("on_note", f"checkpoint {path.name}: training paused {stall:.3f} s to copy the "
               f"state; written in the background in {took:.2f} s")
        t.emit("on_checkpoint", path)

    # -- free space ---------------------------------------------------------------------------

    def _check_space_if_asked(self) -> None:
        if self.cfg.check_free_space:
            self.check_free_space()

    def size_estimate(self) -> int:
        """Bytes the next checkpoint takes: the previous one's size, else weights (their
        dtype) + two fp32 Adam moments per parameter + 1 MiB of small files."""
        t = self.trainer
        latest = ckpt.latest_checkpoint(t.run_dir) if t.dist.is_main else None
        if latest is not None:
            return ckpt.checkpoint_bytes(latest)
        params = {id(p): p for p in t.module.parameters()}.values()
        weights = sum(p.numel() * p.element_size() for p in params)
        return weights + sum(p.numel() * 8 for p in params if p.requires_grad) + 2**20

    def check_free_space(self, start: int = -1) -> None:
        """Stop (every rank) before a save that cannot fit; warn when fewer than 3 more fit.
        Called before each save and at the start of a run that will save (`start`: its
        step)."""
        t = self.trainer
        short = torch.zeros((), device=t.device)
        message = ""
        if t.dist.is_main:
            need = int(self.size_estimate() * 1.05) + 2**20
            free, where = ckpt.free_bytes(t.run_dir)
            mib = 2**20
            if free < need:
                short += 1
                what = f"checkpoint step{t.step}" if t.step > start else "a checkpoint"
                message = (f"not enough disk space for {what}: it needs about "
                           f"{need / mib:,.0f} MiB and {where} has {free / mib:,.0f} MiB free; "
                           f"earlier checkpoints are untouched: free space (or move the run) "
                           f"and resume: kiln train {t.run_dir} (or set "
                           "checkpoint.check_free_space=false if the free-space report is "
                           "wrong)")
            elif free < 3 * need:
                warn(f"{where} has {free / mib:,.0f} MiB free: room for {free // need} more "
                     f"checkpoint(s) of about {need / mib:,.0f} MiB; a save that does not fit "
                     "stops the run")
        if t.dist.enabled:
            dist.all_reduce(short, op=dist.ReduceOp.MAX)
        if short.item():
            raise KilnError(message or "rank 0 found no disk space for the checkpoint (see "
                            "its error)")


def _to_host(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a (sharded) state dict in host memory, as torch.distributed.checkpoint's own
    async save stages it: the training thread may change the live tensors at once."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:  # an older torch: copy each tensor (or DTensor's local shard)
        return tree_map(lambda x: _host_copy(x) if isinstance(x, torch.Tensor) else x, state)
    stager = DefaultStager(StagingOptions(False, False, False, False))
    try:
        return stager.stage(state)
    finally:
        stager.close()


def _host_copy(x: torch.Tensor) -> torch.Tensor:
    if hasattr(x, "to_local"):
        from torch.distributed.tensor import DTensor

        local = x.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, x.device_mesh, x.placements, run_check=False,
                                  shape=x.shape, stride=x.stride())
    return x.detach().to("cpu", copy=True)
