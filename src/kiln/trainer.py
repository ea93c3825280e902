"""The training loop, readable top to bottom.

``Trainer(cfg).fit()`` builds the data, the model and the optimizer from a Config, resumes
from the run directory's latest checkpoint when there is one, and trains to the end of the
run (or its hard stop). Everything that must survive a restart (model, optimizer, LR
schedule, data position, RNG, counters, the spike history) goes into the checkpoint, so on
CPU a resumed run is bit-identical to an uninterrupted one.

The trainer keeps the build, the step, the loop and the state. Each side concern is a
component with one job, called at a fixed place of the loop, in the same order on every rank
(their collectives included): :class:`~kiln.saver.Saver` (checkpoints),
:class:`~kiln.stability.StabilityWatch` (NaN/inf and spikes),
:class:`~kiln.evals.in_loop.InLoopEval` (validation loss and tasks),
:class:`~kiln.meter.Meter` (throughput, MFU, costs), :class:`~kiln.preemption.Preemption`
(signals, stopping together), :class:`~kiln.housekeeping.GarbageCollector` and
:class:`~kiln.housekeeping.Profiler`. Callbacks (kiln.callbacks) observe: metrics file,
console, trackers, and any of your own, with a hook after every step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln import checkpoint as ckpt
from kiln import faults, hardware, runlock
from kiln.callbacks import Callback, ConsoleCallback, MetricsFileCallback
from kiln.config import Config, Duration, RunNumbers, run_numbers
from kiln.data.build import build_datasets, document_eos, find_tokenizer
from kiln.data.loader import BatchLoader
from kiln.data.remote import source_names
from kiln.data.tokens import fingerprint
from kiln.errors import KilnError, warn
from kiln.evals.in_loop import InLoopEval
from kiln.files import write_atomic
from kiln.housekeeping import GarbageCollector, Profiler
from kiln.meter import Meter
from kiln.model import (
    ContextShard,
    Transformer,
    document_ids,
    document_positions,
    flops_per_token,
)
from kiln.optim import apply_hyperparameters, build_optimizer
from kiln.parallel import (
    CompileWatch,
    DistInfo,
    all_reduce_mean,
    check_device_settings,
    init_distributed,
    parallelize,
    pick_device,
    resolve_dp,
    unwrap,
    wants_compile,
)
from kiln.preemption import Preemption
from kiln.rundir import CONFIG_HEADER, absolute, check_run_dir, check_run_dir_writable
from kiln.saver import Saver
from kiln.schedule import LRSchedule
from kiln.stability import StabilityWatch
from kiln.start import StartPlan, plan_start


class Trainer:
    @runlock.released_on_error
    def __init__(self, cfg: Config, *, resume: bool = True,
                 callbacks: list[Callback] | None = None, extend_to: Duration | None = None,
                 extend_shape: str = "cosine", resume_from: str | None = None):
        self.cfg = cfg
        t = cfg.trainer
        self.run_dir = Path(t.run_dir)
        check_run_dir(self.run_dir)  # a file, or a folder of the user's that is not a run
        if not resume and self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise KilnError(f"run directory {str(self.run_dir)!r} is not empty and --no-resume "
                            "was given; choose an empty trainer.run_dir")
        if t.threads:
            if (many := hardware.threads_warning(t.threads)) is not None:
                warn(many)
            torch.set_num_threads(t.threads)
        self.device = pick_device(t.device)
        self.dist: DistInfo = init_distributed(cfg, self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        check_device_settings(cfg, self.device)
        check_run_dir_writable(self.run_dir)  # before the data and the model are built
        # one writer per run directory: refused here if another process trains in it
        self.run_lock = runlock.hold(self.run_dir, self.dist, self.device)  # until fit() ends
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if use_bf16 else nullcontext())
        self.precision = "bf16" if use_bf16 else "fp32"

        # Data, then how the run starts (new / resume / from a checkpoint)
        self.train_data, self.val_data, files = build_datasets(cfg)
        from kiln.data.check import check_edges  # first and last MiB of each file: ids
        check_edges(files, cfg.model.vocab_size)  # refused, doubled separators warned
        self.train_files = files
        self.data_files = source_names(files)  # URLs as given, not their cached copies
        self.doc_eos = document_eos(
            cfg, files + (self.val_data.files if self.val_data is not None else []))
        self.plan: StartPlan = plan_start(cfg, extend_to, extend_shape, resume_from)
        if self.plan.source is not None and self.plan.source_format == "kiln":
            # hashed while the model is built; checked when the load takes the digests
            ckpt.hash_ahead(self.plan.source, ckpt.WEIGHT_PARTS + ["optim.pt"] * (
                self.plan.load_optimizer), cfg.checkpoint.verify_on_load)
        # the batch is split over the data-parallel ranks (a tensor-parallel group shares one)
        self.numbers: RunNumbers = run_numbers(cfg, self.dist.dp_size, self.plan.total_steps)
        self.tokenizer_path = find_tokenizer(cfg, files)
        self.data_fingerprint = [fingerprint(f.path) for f in files]
        entropies = [f.meta.get("unigram_entropy") for f in files]
        self.unigram_entropy = entropies[0] if len(files) == 1 else None
        self.loader = BatchLoader(self.train_data, t.global_batch_size, cfg.data.seed,
                                  rank=self.dist.dp_rank, world_size=self.dist.dp_size,
                                  prefetch=cfg.data.prefetch,
                                  pin_memory=self.device.type == "cuda")

        # Model: built on the meta device and initialised in place (after sharding, for the
        # sharded modes), so a large model never materialises whole on one rank. The init
        # draws one tensor at a time from the CPU RNG, so every mode and world size starts
        # from exactly the same weights for the same trainer.seed.
        self.dp = resolve_dp(cfg.parallel, self.dist)
        with torch.device("meta"):
            model = Transformer(cfg.model)
        torch.manual_seed(t.seed)
        if self.dp in ("fsdp", "hsdp"):
            self.model, _ = parallelize(model, cfg, self.dist, self.device, self.precision)
            self.model.to_empty(device=self.device)
            self.model.init_weights()
        else:
            model.to_empty(device=self.device)
            model.init_weights()
            self.model, _ = parallelize(model, cfg, self.dist, self.device, self.precision)
        self.module: Transformer = unwrap(self.model)
        # context parallelism: this rank's tokens of every window
        self.context = (ContextShard.of(self.module.cp_mesh.get_group(), self.dist.cp_rank,
                                        self.dist.cp, cfg.data.seq_len, self.device)
                        if self.dist.cp > 1 else None)
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.schedule: LRSchedule = self.plan.schedule
        self.step = self.plan.step
        self.tokens_seen = self.plan.tokens_seen

        # The components, each with one job (see the module docstring)
        self.callbacks: list[Callback] = []
        self.preemption = Preemption(self.dist, self.device, cfg.log.interval)
        self.watch = StabilityWatch(cfg, self.device, self.dist, self.run_dir,
                                    note=lambda text: self.emit("on_note", text),
                                    stop=self.preemption.request)
        self.meter = Meter(self.device, self.dist, flops_per_token(cfg.model, cfg.data.seq_len),
                           hardware.peak_flops(self.device, self.precision),
                           list(getattr(self.train_data, "names", [])), self.tokens_seen,
                           self.step)
        self.evals = InLoopEval(self)  # tasks refused before any step
        self.saver = Saver(self)
        self.gc = GarbageCollector(t.gc_interval)
        self.profiler = Profiler(cfg.log.profile, self.run_dir, self.device, self.step,
                                 self.dist.is_main)
        self.compile_watch = CompileWatch(wants_compile(cfg.parallel, self.device), self.step,
                                          note=lambda text: self.emit("on_note", text))
        self.loss_fault = faults.loss_factor()  # drills: KILN_FAULT_LOSS, KILN_FAULT_INJECT
        self.failing_step = faults.failing_step(self.dist.rank)
        if self.plan.source is not None:
            self._load_source(self.plan)

        # rank hygiene: only rank 0 writes files and talks to the console
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # checked now: a metrics file that cannot take a record is refused before
            # anything is written or trained
            self.callbacks.append(MetricsFileCallback(self.run_dir / "metrics.jsonl",
                                                      truncate_after=self.step))
            if resume_from is not None and self.plan.kind == "resume":
                ckpt.rewind_to(self.run_dir, self.plan.source)
            # atomically: a kill mid-write must not leave a torn config.yaml that
            # `kiln train RUN_DIR` would then read
            write_atomic(self.run_dir / "config.yaml", self.saved_config_yaml())
            if cfg.log.console:
                self.callbacks.append(ConsoleCallback())
            from kiln.trackers import build_trackers  # log.tensorboard / log.wandb

            self.callbacks.extend(build_trackers(cfg, self.run_dir))
            self.callbacks.extend(callbacks or [])

    # -- state -------------------------------------------------------------------------------

    def saved_config_yaml(self) -> str:
        """The config saved with the run: a hard stop and a profile belong to one invocation,
        so they are not saved (a plain `kiln train RUN_DIR` trains on to the end); local data
        paths given relative to the working directory are saved absolute, so `kiln train
        RUN_DIR` resumes from any working directory."""
        d = self.cfg.data
        data = replace(d, paths=absolute(d.paths), val_paths=absolute(d.val_paths),
                       sources=[replace(s, paths=absolute(s.paths)) for s in d.sources],
                       tokenizer=absolute([d.tokenizer])[0] if d.tokenizer else None,
                       cache_dir=absolute([d.cache_dir])[0] if d.cache_dir else None)
        saved = replace(self.cfg, data=data,
                        eval=replace(self.cfg.eval, tasks=absolute(self.cfg.eval.tasks)),
                        trainer=replace(self.cfg.trainer, hard_stop=None),
                        log=replace(self.cfg.log, profile=0))
        return CONFIG_HEADER + saved.to_yaml()

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data": self.loader.state_dict(),
            "schedule": self.schedule.state_dict(),
            "total_steps": self.numbers.total_steps,
            "tokens_per_step": self.numbers.tokens_per_step,
            "data_files": self.data_files,
            "data_fingerprint": self.data_fingerprint,
            "stability": self.watch.state_dict(),
        }

    def _load_source(self, plan: StartPlan) -> None:
        """Load what the plan carries over from its source checkpoint (either format, any
        world size)."""
        if plan.source_format == "hf":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            from kiln.interop.hf import load_hf

            _, state = load_hf(plan.source)
            if self.cfg.model.tie_embeddings:
                state.setdefault("lm_head.weight", state["embed.weight"])
            set_model_state_dict(self.module, state,
                                 options=StateDictOptions(full_state_dict=True))
            return
        rng, verify = None, self.cfg.checkpoint.verify_on_load
        if plan.kind == "resume":
            # an exact resume needs every part; never continue without a word when one is gone
            ckpt.check_resumable(plan.source, self.run_dir, verify)
            rng = ckpt.read_rng(plan.source / "rng.pt", self.device, verify)
        ckpt.load_into(plan.source, self.module,
                       self.optimizer if plan.load_optimizer else None,
                       tied=self.cfg.model.tie_embeddings, verify=verify)
        if plan.load_optimizer:
            apply_hyperparameters(self.optimizer, self.cfg.optim)
        if plan.load_data_position and plan.data_state is not None:
            self.loader.load_state_dict(plan.data_state)
        if plan.kind == "resume":
            self.watch.load_state_dict(plan.stability)
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"])

    def save_checkpoint(self) -> Path:
        """Save the current step now (every rank calls); see kiln.saver."""
        return self.saver.save_now()

    # -- one step ----------------------------------------------------------------------------

    def document_kwargs(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's doc_ids (and positions) for input windows under data.document_mask
        (data.document_positions); {} when it is off."""
        if self.doc_eos is None:
            return {}
        doc = document_ids(inputs, self.doc_eos)
        if self.cfg.data.document_positions:
            return {"doc_ids": doc, "positions": document_positions(doc)}
        return {"doc_ids": doc}

    def micro_loss(self, mb: torch.Tensor, per_window: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(loss to backpropagate, cross entropy for logging, and with `per_window` each
        window's cross entropy) of one micro-batch of windows."""
        inputs, targets = mb[:, :-1], mb[:, 1:]
        seq = targets.size(-1)
        z_loss = self.cfg.optim.z_loss
        docs = self.document_kwargs(inputs)  # {} unless data.document_mask
        if self.context is not None:  # this rank's tokens; attention sees the whole window
            cp = self.context
            inputs, targets = inputs[:, cp.index], targets[:, cp.index]
            if "positions" in docs:
                docs["positions"] = docs["positions"][:, cp.index]
            docs["cp"] = cp
        if self.cfg.trainer.fused_loss:  # inside forward: DDP / FSDP hooks see the head
            with self.autocast:
                loss, ce, *tok = self.model(inputs, targets=targets, z_loss=z_loss,
                                            per_token=per_window, **docs)
        else:
            with self.autocast:
                logits = self.model(inputs, **docs)
            logits = logits.float().view(-1, logits.size(-1))
            ce = F.cross_entropy(logits, targets.reshape(-1))
            tok = [F.cross_entropy(logits.detach(), targets.reshape(-1), reduction="none")
                   ] if per_window else []
            loss = ce
            if z_loss > 0:
                z = torch.logsumexp(logits, dim=-1)
                loss = ce + z_loss * (z * z).mean()
        if self.cfg.optim.loss_norm == "window":  # sum over predictions / window tokens
            loss = loss * (seq / (seq + 1))
        return loss, ce, (tok[0].view(mb.size(0), -1).mean(1) if tok else None)

    def train_step(self, batch: torch.Tensor, sources: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over micro-batches, clip, optimizer step. Returns (loss, grad norm).
        `sources` (a mixture's source of each row) adds each window's loss to its source's
        running sums in the meter."""
        self.model.train()
        t_start = time.perf_counter()
        lr = self.schedule.lr(self.step + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device, non_blocking=True)
        micro = self.cfg.trainer.micro_batch_size
        n_micro = batch.size(0) // micro
        fault = self.loss_fault if self.loss_fault and self.loss_fault[0] == self.step + 1 else None
        loss_sum = torch.zeros((), device=self.device)
        rows = (torch.tensor(sources, device=self.device) if sources is not None
                else None)  # each window's mixture source, sent once per step
        for i in range(n_micro):
            mb = batch[i * micro : (i + 1) * micro]
            with self._grad_sync(i == n_micro - 1):
                loss, ce, per_window = self.micro_loss(mb, per_window=sources is not None)
                if fault is not None:  # a drill (KILN_FAULT_LOSS)
                    loss, ce = loss * fault[1], ce * fault[1]
                (loss / n_micro).backward()
            loss_sum += ce.detach()
            if per_window is not None:
                self.meter.add_sources(rows[i * micro : (i + 1) * micro], per_window)
        self.meter.add("fwd_bwd", time.perf_counter() - t_start)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   clip if clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # sharded grads: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
        loss = loss_sum / n_micro
        t_optim = time.perf_counter()
        skip = self.watch.observe(self.step + 1, loss, grad_norm.to(loss.device))
        if skip is None:
            self.optimizer.step()
        elif getattr(self.optimizer, "defaults", {}).get("fused"):
            # the fused kernel leaves weights and Adam state alone where found_inf is 1,
            # decided on the device: no host sync
            self.optimizer.found_inf = skip.float()
            self.optimizer.step()
            self.optimizer.found_inf = None
        elif not bool(skip):  # foreach AdamW has no found_inf: ask the host
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.add("optim", time.perf_counter() - t_optim)
        return loss, grad_norm

    @contextmanager
    def _grad_sync(self, sync: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
        if sync or not self.dist.enabled:
            yield
        elif self.dp == "ddp":
            with self.model.no_sync():
                yield
        elif self.dp in ("fsdp", "hsdp"):
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            yield

    # -- the loop ----------------------------------------------------------------------------

    def emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def fit(self) -> dict:
        try:
            with self.preemption.signals(), self.gc, self.profiler:
                return self._fit()
        except RuntimeError as e:  # a collective broken by a peer that died: one line
            lost = self.preemption.lost_peer(e, self.step)
            if lost is None:
                raise
            raise lost from None
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _fit(self) -> dict:
        stop, last = self.numbers.stop_step, {}
        start_step = self.step
        self.saver.check_at_start(stop)
        try:
            self.emit("on_fit_start")  # (inside: a tracker that cannot start closes the loader)
            self.meter.start(self.tokens_seen, self.step)  # (a tracker's start-up is not in it)
            while self.step < stop:
                t_data = time.perf_counter()
                batch = self.loader.next_batch()
                self.meter.add("data_wait", time.perf_counter() - t_data)
                if self.failing_step == self.step + 1:
                    raise RuntimeError(f"injected fault on rank {self.dist.rank} at step "
                                       f"{self.step + 1} (KILN_FAULT_INJECT)")
                with self.compile_watch.around(self.step):
                    loss, grad_norm = self.train_step(batch, self.loader.last_sources)
                self.step += 1
                self.tokens_seen += self.numbers.tokens_per_step
                self.profiler.step()
                self.meter.add("gc", self.gc.step(self.step))
                if self.step % self.cfg.log.interval == 0 or self.step == stop:
                    last = self._log(loss, grad_norm)
                self.evals.after_step(self.step)
                self.emit("on_step")
                self.saver.poll()  # a failed background save stops the run here
                self.saver.maybe_save(stop)
                if self.preemption.should_stop(self.step, stop):
                    break
        except BaseException:
            self.saver.poll(wait=True, raise_error=False)  # keep its progress
            raise
        finally:
            self.loader.close()
        self.saver.poll(wait=True)
        return self._finish(last, start_step)

    def _log(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> dict:
        """The metrics line of a logging step (every rank: the checks and sums are shared)."""
        speed = self.meter.record(self.step, self.tokens_seen)
        self.watch.check_finite(self.step)
        record = {"step": self.step, "tokens": self.tokens_seen,
                  "loss": all_reduce_mean(loss, self.dist).item(),
                  "lr": self.schedule.lr(self.step), "grad_norm": float(grad_norm),
                  **speed, **self.watch.report()}
        self.emit("on_log", record)
        return record

    def _finish(self, last: dict, start_step: int) -> dict:
        """After the last step: a preempted run saves and says how to resume; a finished one
        evaluates a last time and saves its final checkpoint."""
        if self.preemption.requested is not None:
            path = ckpt.checkpoints_dir(self.run_dir) / f"step{self.step}"
            if not ckpt.is_complete(path):
                self.saver.save(wait=True)
            result = {**last, "preempted": self.preemption.requested, "checkpoint": str(path)}
            self.emit("on_preempt", result)
            return result
        if self.step > start_step:  # (nothing trained: the run was already complete)
            self.evals.at_end(self.step)
            if self.cfg.checkpoint.save_final:
                self.saver.save(wait=True)
        self.emit("on_fit_end", last)
        return last
