"""The training loop, readable top to bottom.

``Trainer(cfg).fit()`` builds the data, the model and the optimizer from a Config, resumes
from the run directory's latest checkpoint when there is one, and trains to the end of the
run (or its hard stop). Everything that must survive a restart (model, optimizer, LR
schedule, data position, RNG, counters) goes into the checkpoint, so on CPU a resumed run is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln import checkpoint as ckpt
from kiln.callbacks import Callback, ConsoleCallback, MetricsFileCallback
from kiln.config import Config, Duration, RunNumbers, run_numbers
from kiln.data.loader import BatchLoader, WindowDataset, eval_indices
from kiln.data.tokens import TokenFile, check_vocab, open_token_files
from kiln.errors import KilnError
from kiln.model import Transformer, flops_per_token
from kiln.optim import apply_hyperparameters, build_optimizer
from kiln.schedule import LRSchedule
from kiln.start import StartPlan, plan_start


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KilnError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return torch.device(name)


def build_datasets(cfg: Config) -> tuple[WindowDataset, WindowDataset | None, list[TokenFile]]:
    """Training windows, validation windows (own paths or a held-out tail), the train files."""
    d = cfg.data
    if not d.paths:
        raise KilnError("data.paths is empty; list token files made by `kiln prepare`")
    files = open_token_files(d.paths, dtype=d.dtype, eos_token_id=d.eos_token_id)
    check_vocab(files, cfg.model.vocab_size)
    train = WindowDataset(files, d.seq_len, d.stride)
    val = None
    if d.val_paths:
        val_files = open_token_files(d.val_paths, dtype=d.dtype, eos_token_id=d.eos_token_id)
        check_vocab(val_files, cfg.model.vocab_size)
        train_set = {f.path.resolve() for f in files}
        if any(f.path.resolve() in train_set for f in val_files):
            raise KilnError("data.val_paths shares files with data.paths; validation data must "
                            "be held out from training")
        val = WindowDataset(val_files, d.seq_len, d.seq_len)
    elif d.val_fraction > 0:
        if d.stride is not None and d.stride < d.seq_len:
            raise KilnError("data.val_fraction needs non-overlapping windows (data.stride >= "
                            "data.seq_len); use data.val_paths instead")
        train, val = train.split_tail(d.val_fraction)
    if len(train) == 0:
        raise KilnError(f"data.paths hold no window of {d.seq_len + 1} tokens; add data or "
                        "lower data.seq_len")
    return train, val, files


def find_tokenizer(cfg: Config, files: list[TokenFile]) -> Path | None:
    if cfg.data.tokenizer:
        p = Path(cfg.data.tokenizer)
        if not p.is_file():
            raise KilnError(f"data.tokenizer {str(p)!r} does not exist")
        return p
    for f in files:
        if f.tokenizer_path is not None and f.tokenizer_path.is_file():
            return f.tokenizer_path
    return None


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = True,
                 callbacks: list[Callback] | None = None, extend_to: Duration | None = None,
                 extend_shape: str = "cosine"):
        self.cfg = cfg
        t = cfg.trainer
        self.run_dir = Path(t.run_dir)
        if not resume and self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise KilnError(f"run directory {str(self.run_dir)!r} is not empty and --no-resume "
                            "was given; choose an empty trainer.run_dir")
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = pick_device(t.device)
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if use_bf16 else nullcontext())
        self.precision = "bf16" if use_bf16 else "fp32"

        # Data, then how the run starts (new / resume / from a checkpoint)
        self.train_data, self.val_data, files = build_datasets(cfg)
        self.train_files = files
        self.plan: StartPlan = plan_start(cfg, extend_to, extend_shape)
        n = run_numbers(cfg)
        stop = self.plan.total_steps
        if t.hard_stop is not None:
            stop = min(stop, t.hard_stop.to_steps(n.tokens_per_step))
        self.numbers: RunNumbers = replace(n, total_steps=self.plan.total_steps, stop_step=stop)
        self.tokenizer_path = find_tokenizer(cfg, files)
        entropies = [f.meta.get("unigram_entropy") for f in files]
        self.unigram_entropy = entropies[0] if len(files) == 1 else None
        self.loader = BatchLoader(self.train_data, t.global_batch_size, cfg.data.seed,
                                  prefetch=cfg.data.prefetch)

        # Model and optimizer
        torch.manual_seed(t.seed)
        self.model = Transformer(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule: LRSchedule = self.plan.schedule
        self.step = self.plan.step
        self.tokens_seen = self.plan.tokens_seen
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.resumed_from: Path | None = None
        if self.plan.source is not None:
            self._load_source(self.plan)
        self.stop_requested: str | None = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(cfg.to_yaml())

        self.callbacks: list[Callback] = [MetricsFileCallback(self.run_dir / "metrics.jsonl",
                                                              truncate_after=self.step)]
        if cfg.log.console:
            self.callbacks.append(ConsoleCallback())
        self.callbacks.extend(callbacks or [])

    # -- state -------------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data": self.loader.state_dict(),
            "schedule": self.schedule.state_dict(),
            "total_steps": self.numbers.total_steps,
            "tokens_per_step": self.numbers.tokens_per_step,
            "data_files": [str(f.path) for f in self.train_files],
        }

    def _load_source(self, plan: StartPlan) -> None:
        """Load what the plan carries over from its source checkpoint."""
        c = ckpt.load(plan.source, with_optim=plan.load_optimizer)
        ckpt.load_model_state(self.model, c.model, plan.source)
        if plan.load_optimizer:
            if c.optim is None:
                raise KilnError(f"{plan.source} holds no optimizer state; set "
                                "init.load_optimizer=false")
            try:
                self.optimizer.load_state_dict(c.optim)
            except (ValueError, KeyError) as e:
                raise KilnError(f"optimizer state in {plan.source} does not fit this model: "
                                f"{e}") from e
            apply_hyperparameters(self.optimizer, self.cfg.optim)
        if plan.load_data_position and plan.data_state is not None:
            self.loader.load_state_dict(plan.data_state)
        if plan.kind == "resume":
            if c.rng is not None:
                torch.set_rng_state(c.rng["cpu"])
                if torch.cuda.is_available() and "cuda" in c.rng:
                    torch.cuda.set_rng_state(c.rng["cuda"])
            self.resumed_from = plan.source

    def save_checkpoint(self) -> Path:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        return ckpt.save(
            self.run_dir, self.step, model=self.model.state_dict(),
            optim=self.optimizer.state_dict(), rng=rng, trainer=self.trainer_state(),
            config_yaml=self.cfg.to_yaml(), tokenizer=self.tokenizer_path,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    # -- one step ----------------------------------------------------------------------------

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, cross entropy for logging) of one micro-batch."""
        logits = logits.float().view(-1, logits.size(-1))
        ce = F.cross_entropy(logits, targets.reshape(-1))
        loss = ce
        if self.cfg.optim.z_loss > 0:
            z = torch.logsumexp(logits, dim=-1)
            loss = ce + self.cfg.optim.z_loss * (z * z).mean()
        return loss, ce

    def train_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over micro-batches, clip, optimizer step. Returns (loss, grad norm)."""
        self.model.train()
        lr = self.schedule.lr(self.step + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device, non_blocking=True)
        micro = self.cfg.trainer.micro_batch_size
        n_micro = batch.size(0) // micro
        loss_sum = torch.zeros((), device=self.device)
        for i in range(n_micro):
            mb = batch[i * micro : (i + 1) * micro]
            with self.autocast:
                logits = self.model(mb[:, :-1])
            loss, ce = self.loss_fn(logits, mb[:, 1:])
            (loss / n_micro).backward()
            loss_sum += ce.detach()
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / n_micro, grad_norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if self.val_data is None or len(self.val_data) == 0:
            return None
        self.model.eval()
        micro = self.cfg.trainer.micro_batch_size
        idx = eval_indices(self.val_data, self.cfg.trainer.eval_batches * micro)
        total, count = 0.0, 0
        for i in range(0, len(idx), micro):
            mb = self.val_data.batch(idx[i : i + micro]).to(self.device)
            with self.autocast:
                logits = self.model(mb[:, :-1])
            _, ce = self.loss_fn(logits, mb[:, 1:])
            total += ce.item() * mb.size(0)
            count += mb.size(0)
        loss = total / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # -- the loop ----------------------------------------------------------------------------

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    @contextmanager
    def _preemption_signals(self):
        """SIGTERM/SIGINT/SIGUSR1: finish the step, checkpoint, stop. A second one aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_requested is not None:
                sys.stderr.write(f"kiln: second signal ({name}): aborting now; existing "
                                 "checkpoints are untouched\n")
                sys.stderr.flush()
                os._exit(128 + signum)
            self.stop_requested = name
            sys.stderr.write(f"kiln: {name} received: finishing this step, then saving a "
                             "checkpoint (send it again to abort at once)\n")
            sys.stderr.flush()

        sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
        previous = {s: signal.signal(s, handler) for s in sigs}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def fit(self) -> dict:
        with self._preemption_signals():
            return self._fit()

    def _fit(self) -> dict:
        cfg, n = self.cfg, self.numbers
        stop = n.stop_step
        self._emit("on_fit_start")
        last: dict = {}
        start_step = self.step
        t_log, tokens_at_log, step_at_log = time.perf_counter(), self.tokens_seen, self.step
        try:
            while self.step < stop:
                batch = self.loader.next_batch()
                loss, grad_norm = self.train_step(batch)
                self.step += 1
                self.tokens_seen += n.tokens_per_step

                if self.step % cfg.log.interval == 0 or self.step == stop:
                    now = time.perf_counter()
                    dt = max(now - t_log, 1e-9)
                    tps = (self.tokens_seen - tokens_at_log) / dt
                    loss_v = loss.item()
                    if not math.isfinite(loss_v):
                        raise KilnError(
                            f"loss became {loss_v} at step {self.step}; the last checkpoint is "
                            "untouched: lower optim.lr or raise schedule.warmup and resume")
                    last = {
                        "step": self.step,
                        "tokens": self.tokens_seen,
                        "loss": loss_v,
                        "lr": self.schedule.lr(self.step),
                        "grad_norm": float(grad_norm),
                        "tokens_per_sec": tps,
                        "mfu_flops_per_sec": tps * self.flops_per_token,
                        "step_time": dt / max(self.step - step_at_log, 1),
                    }
                    self._emit("on_log", last)
                    t_log, tokens_at_log, step_at_log = now, self.tokens_seen, self.step

                if cfg.trainer.eval_interval and self.step % cfg.trainer.eval_interval == 0:
                    self._log_eval()
                interval = cfg.checkpoint.interval
                if interval and self.step % interval == 0 and self.step != stop:
                    self._emit("on_checkpoint", self.save_checkpoint())
                if self.stop_requested is not None:
                    break
        finally:
            self.loader.close()
        if self.stop_requested is not None:
            path = ckpt.latest_checkpoint(self.run_dir)
            if path is None or path.name != f"step{self.step}":
                path = self.save_checkpoint()
            result = {**last, "preempted": self.stop_requested, "checkpoint": str(path)}
            self._emit("on_preempt", result)
            return result
        if self.step == start_step:  # nothing trained: the run was already complete
            self._emit("on_fit_end", last)
            return last
        if self.val_data is not None and not (
            cfg.trainer.eval_interval and self.step % cfg.trainer.eval_interval == 0
        ):
            self._log_eval()
        if cfg.checkpoint.save_final:
            self._emit("on_checkpoint", self.save_checkpoint())
        self._emit("on_fit_end", last)
        return last

    def _log_eval(self) -> None:
        metrics = self.evaluate()
        if metrics is not None:
            self._emit("on_eval", {"step": self.step, "tokens": self.tokens_seen, **metrics})
