"""Chaos drill: kill real `kiln train` runs at random moments, resume them, and check that the
result is bit for bit the run that was never interrupted.

    python bench/chaos.py [--trials 20] [--seed 0] [--steps 40] [--rank-trials 2]
                          [--fsdp-trials 1] [--rank-steps 20] [--keep]

Everything runs on CPU in a temporary folder (--keep leaves it, with every run's logs); the
training data is made from Python's own documentation (pydoc_data.topics), nothing is
downloaded. Each `kiln` is a real process, `python -m kiln train CONFIG.yaml`, run from a copy
of this tree's src/ taken when the drill starts (so that edits made meanwhile cannot mix two
versions in one trial; the first line names the commit, and whether src/ had uncommitted
changes). What it does:

1. Reference: a tiny model (d_model 64, 2 layers, vocab 512, seq 32, batch 8) trained for
   --steps steps, checkpoint every 4 steps, keep_last 2, without interruption.
2. N SIGKILL trials. Each starts the same run in a fresh folder and SIGKILLs it once or twice
   (the second time, its resume), then runs the same command until it exits 0. A kill lands
   at one of these moments, drawn at random (a first kill that misses, the run having ended,
   is drawn again on a fresh run):
     anytime          uniform over the whole expected life of the process (start-up included)
     training         uniform over the expected time of its training loop
     save:PHASE@stepN in the save of checkpoint stepN (any save still ahead, the final one
                      included), as soon as the disk shows that PHASE began: tmp (its
                      .tmp-stepN folder made), model.safetensors, optim.pt, rng.pt,
                      tokenizer.json, manifest.json (the last file; fsync follows), rename
                      (stepN is in place, `latest` not yet moved), latest (`latest` moved;
                      retention next)
   After each kill every stepN folder must be complete, load (weights, optimizer, RNG,
   trainer.json, config.yaml) and match its manifest.json (every other file's size and
   SHA-256, which kiln writes before the folder's atomic rename; a folder without one, or
   that differs from it, counts as corrupt), and `latest` must name such a folder. The same
   check runs on every checkpoint left at the end of every trial below. At the end the final
   checkpoint must equal the reference's: every tensor of model.safetensors, optim.pt and
   rng.pt bit for bit, and trainer.json; metrics.jsonl must hold the reference's history
   (steps, losses, LRs, grad norms, eval losses); no .tmp-step* folder may be left.
3. Disk full, twice (only as root: it mounts a small tmpfs; otherwise skipped with the
   reason): the run's folder sits on a tmpfs with room for 4 checkpoints; once the first is
   saved the run is frozen and a filler file takes all but a random part of one checkpoint's
   size. With checkpoint.check_free_space on, kiln should refuse the next save before writing;
   with it off, the write must fail part-way. Either way: a one-line error, no traceback, no
   partial checkpoint, `latest` still at the first; after the filler is deleted a resume must
   end bit-identical to the reference.
4. SIGTERM during a save: the run is frozen (SIGSTOP) the moment a save begins, sent SIGTERM,
   and let go (SIGCONT). kiln must finish that save, print "stopped by SIGTERM at step N ...
   resume with: kiln train RUN_DIR", exit 0 with `latest` at stepN; a resume must then end
   bit-identical to the reference.
5. A rank killed mid-step under torchrun (--rank-trials DDP, --fsdp-trials FSDP2 with
   sharded checkpoints). Reference: the same tiny run, --rank-steps steps, under
   `python -m torch.distributed.run --standalone --nproc-per-node=2 -m kiln train CONFIG`
   (OMP_NUM_THREADS=1, gloo, parallel.timeout_minutes 0.5), uninterrupted. Each trial starts
   it in a fresh folder and, once its first checkpoint is saved, SIGKILLs ONE kiln worker (a
   random rank, found as a child of the torchrun launcher by the RANK= in its environment;
   never the launcher) either at a random moment of the rest of the training loop (as long
   as it lasted in the reference; a kill that comes after the console's "done:" line is
   drawn again on a fresh run) or as rank 0 begins the save of a random later checkpoint.
   torchrun must exit non-zero within 120 s (the time is printed) and leave no worker
   running; no stepN folder may be damaged, and `latest` must name a complete one that
   passes its manifest. Then the same torchrun command must resume to a final checkpoint
   equal to the 2-rank reference's (weights and optimizer state bit for bit, read from dcp/
   for FSDP; rng.pt, which rank 0 writes; trainer.json; metrics history), with no
   .tmp-step* left, and `kiln checkpoint verify RUN_DIR` must exit 0.

Prints one line per trial, then 'K/N resumed, K/N bit-identical, C corrupt; R/M rank-kill
trials resumed bit-identical (...)' (N: the SIGKILL trials; C: damaged checkpoints or
pointers seen in any trial; M: the rank-kill trials). Exits 1 if any trial did not resume,
differs from the reference, left anything corrupt, or (rank kills) torchrun did not fail
in time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
SRC = REPO / "src"  # what the kiln processes run: main() points it at a copy taken at start

from kiln import checkpoint as ckpt  # noqa: E402
from kiln.errors import KilnError  # noqa: E402

INTERVAL, KEEP_LAST = 4, 2
SAVE_PHASES = ("tmp", "model.safetensors", "optim.pt", "rng.pt", "tokenizer.json",
               "manifest.json", "rename", "latest")
# fields that measure the machine, not the training: wall-clock times, memory, and the
# checkpoint's size (its config.yaml names the run's own folder)
TIMING_KEYS = {"tokens_per_sec", "model_flops_per_sec", "step_time", "mfu", "data_wait",
               "data_wait_share", "fwd_bwd_time", "optim_time", "peak_mem_mib", "ckpt_mib",
               "ckpt_save_time"}
POLL = 0.0005  # seconds between looks at the run's folder


# --------------------------------------------------------------------------------------------
# Data, config, processes


def make_tokens(root: Path) -> Path:
    """A token file (vocab 512) of Python's documentation topics, as the tests make it."""
    from pydoc_data.topics import topics

    from kiln.data.prepare import prepare

    src = root / "pydoc.jsonl"
    src.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
    prepare([str(src)], root / "tokens", vocab_size=512, progress=False)
    return root / "tokens" / "tokens.bin"


def write_config(path: Path, tokens: Path, run_dir: Path, steps: int,
                 parallel: dict | None = None, **checkpoint) -> Path:
    cfg = {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 192,
                  "vocab_size": 512, "max_seq_len": 64},
        "data": {"paths": [str(tokens)], "seq_len": 32, "val_fraction": 0.05},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup": 2},
        "trainer": {"run_dir": str(run_dir), "global_batch_size": 8, "micro_batch_size": 4,
                    "max_duration": steps, "eval_interval": 10, "eval_batches": 2,
                    "threads": 1},  # one core trains, the other watches
        "checkpoint": {"interval": INTERVAL, "keep_last": KEEP_LAST, **checkpoint},
        "log": {"interval": 1},
    }
    if parallel:
        cfg["parallel"] = parallel
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun_argv(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}"]


class Kiln:
    """One `python -m kiln train CONFIG` process, its output in LOGS/NAME.out and .err; with
    `ranks`, the same under `python -m torch.distributed.run --nproc-per-node=RANKS` (the
    process is then the torchrun launcher, the kiln workers its children)."""

    def __init__(self, config: Path, logs: Path, name: str, ranks: int = 0):
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1"}
        for var in ("KILN_FAULT_INJECT", "KILN_FAULT_SAVE"):
            env.pop(var, None)
        argv = [sys.executable, "-m", "kiln", "train", str(config)]
        if ranks:
            env["OMP_NUM_THREADS"] = "1"
            argv = torchrun_argv(ranks) + argv[1:]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        self.t0 = time.perf_counter()

    def running(self) -> bool:
        return self.proc.poll() is None

    def started_training(self) -> bool:
        """The console's first line (on_fit_start): start-up is over, the loop begins."""
        return self.out.stat().st_size > 0 and "kiln " in self.out.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def signal(self, sig: int) -> None:
        if self.running():
            os.kill(self.proc.pid, sig)

    def last_error(self) -> str:
        lines = self.err.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"exit {self.proc.returncode}, nothing on stderr"


def wait_until(k: Kiln, cond, timeout: float = 120) -> bool:
    """Poll `cond` until it holds (True) or the process ends first (False)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if cond():
            return True
        if not k.running():
            return cond()
        time.sleep(POLL)
    return False


# --------------------------------------------------------------------------------------------
# Looking at a run's folder


def step_dirs(run: Path) -> dict[int, Path]:
    root = ckpt.checkpoints_dir(run)
    found = {}
    if root.is_dir():
        for p in root.iterdir():
            m = ckpt.STEP_DIR.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return found


def latest_name(run: Path) -> str | None:
    pointer = ckpt.checkpoints_dir(run) / "latest"
    try:
        return pointer.read_text().strip()
    except OSError:
        return None


def logged_step(run: Path) -> int:
    """The last step metrics.jsonl holds a complete record of (0: none)."""
    step = 0
    try:
        for line in (run / "metrics.jsonl").read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec:
                step = int(rec["step"])
    except OSError:
        pass
    return step


def damage(path: Path, run: Path) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from, or None if it loads in full and
    every file matches its manifest (sizes and SHA-256)."""
    if not ckpt.is_complete(path):
        return f"{path.name} is incomplete ({', '.join(ckpt.missing_parts(path))} missing)"
    try:
        if not (path / ckpt.MANIFEST).is_file():  # kiln writes it before the folder's rename
            return f"{path.name} has no {ckpt.MANIFEST}"
        problems = ckpt.verify_parts(path, None, "full")
        if problems:
            return (f"{path.name} fails its manifest: "
                    f"{problems[0].replace(str(path) + os.sep, '')[:120]}"
                    + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        ckpt.check_resumable(path, run)
        if ckpt.is_sharded(path):
            trainer, _ = ckpt.read_meta(path)
            state = ckpt.read_sharded_full(path)
            step, model, optim = int(trainer["step"]), state.get("model"), state.get("optim")
            rng = torch.load(path / "rng.pt", weights_only=True)
            del state
        else:
            c = ckpt.load(path, with_optim=True, with_rng=True)
            step, model, optim, rng = c.step, c.model, c.optim, c.rng
            del c
        if step != int(path.name[len("step"):]):
            return f"{path.name}/trainer.json says step {step}"
        if not model or optim is None or rng is None:
            return f"{path.name} lacks weights, optimizer or RNG state"
        del model, optim, rng
    except (KilnError, OSError, RuntimeError, ValueError) as e:
        return f"{path.name} does not load: {str(e)[:120]}"
    finally:
        gc.collect()  # drop memory mappings (a tmpfs must unmount afterwards)
    return None


def audit(run: Path, final: bool) -> tuple[list[str], list[str]]:
    """(corrupt things, leftovers) in the run's checkpoints folder. Corrupt: a stepN folder
    that is not a complete, loadable checkpoint or does not match its manifest.json (sizes
    and SHA-256 of every file), a `latest` naming no such checkpoint, and (when `final`) any
    .tmp-step* folder. Leftovers: other hidden scratch files."""
    corrupt, litter = [], []
    root = ckpt.checkpoints_dir(run)
    if not root.is_dir():
        return corrupt, litter
    bad = set()
    for p in step_dirs(run).values():
        why = damage(p, run)
        if why:
            corrupt.append(why)
            bad.add(p.name)
    name = latest_name(run)
    if name is not None and not ckpt.is_complete(root / name):
        corrupt.append(f"latest names {name!r}, not a complete checkpoint")
    elif name in bad:
        corrupt.append(f"latest names {name!r}, which fails the checks above")
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp-step") and final:
            corrupt.append(f"{p.name} left after the run finished")
        elif (p.name.startswith(".") and not p.name.startswith(".tmp-step")
              or "-damaged-" in p.name):
            litter.append(p.name)
    return corrupt, litter


def left_by_kill(run: Path, step: int) -> str:
    """What a kill left in the checkpoints folder, in a few words."""
    root = ckpt.checkpoints_dir(run)
    bits = [f"latest {latest_name(run) or '-'}"]
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".tmp-step"):
                inside = sorted(f.name for f in p.iterdir() if f.name != STALE)
                stale = " (the earlier kill's)" if (p / STALE).exists() else ""
                bits.append(f"{p.name}[{','.join(inside) or 'empty'}]{stale}")
            elif p.name.startswith("."):  # .del-step*, .old-step*, .latest.tmp
                bits.append(p.name)
    return f"logged step {step}; " + " ".join(bits)


# --------------------------------------------------------------------------------------------
# Comparing with the reference


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [t.detach().reshape(-1).contiguous().view(torch.uint8) for t in (a, b)]
    return torch.equal(*as_bytes)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and same_tensor(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def differences(want: Path, got: Path) -> list[str]:
    """What differs between two checkpoint folders (in a function, so that the memory-mapped
    weights are released when it returns: an open mapping keeps a tmpfs busy)."""
    out = []
    try:
        if ckpt.is_sharded(want):  # dcp/: full weights and optimizer state, read in one process
            sa, sb = ckpt.read_sharded_full(want), ckpt.read_sharded_full(got)
            a, b = sa["model"], sb["model"]
            if not same(sa.get("optim"), sb.get("optim")):
                out.append("optimizer state (dcp)")
            del sa, sb
            names = ("rng.pt",)
        else:
            a = load_file(str(want / "model.safetensors"))
            b = load_file(str(got / "model.safetensors"))
            names = ("optim.pt", "rng.pt")
        if a.keys() != b.keys():
            out.append("model tensor names")
        out += [f"model {k}" for k in sorted(a.keys() & b.keys()) if not same_tensor(a[k], b[k])]
        del a, b
        for name in names:
            if not same(torch.load(want / name, weights_only=True),
                        torch.load(got / name, weights_only=True)):
                out.append(name)
        if (json.loads((want / "trainer.json").read_text())
                != json.loads((got / "trainer.json").read_text())):
            out.append("trainer.json")
    except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be read differs
        out.append(f"unreadable: {type(e).__name__}: {str(e)[:100]}")
    gc.collect()
    return out


def history(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields (which differ from run to run)."""
    recs = []
    for line in (run / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rec = {"torn": line}
        recs.append({k: v for k, v in rec.items() if k not in TIMING_KEYS})
    return recs


# --------------------------------------------------------------------------------------------
# The trials


@dataclass
class Reference:
    run: Path
    final: Path
    steps: int
    life: float  # seconds from spawn to exit
    startup: float  # seconds from spawn to the first console line
    history: list[dict] = field(default_factory=list)
    loop: float = 0.0  # seconds from `latest` first appearing to "done:" (torchrun references)

    @property
    def training(self) -> float:
        return self.life - self.startup


@dataclass
class Result:
    resumed: bool = False
    identical: bool = False
    corrupt: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each fails the trial
    notes: list[str] = field(default_factory=list)  # for information

    @property
    def ok(self) -> bool:
        return self.resumed and self.identical and not self.corrupt and not self.problems


def reference_run(root: Path, tokens: Path, steps: int, ranks: int = 0,
                  parallel: dict | None = None) -> Reference:
    run = root / "run"
    k = Kiln(write_config(root / "c.yaml", tokens, run, steps, parallel), root, "kiln", ranks)
    wait_until(k, k.started_training)
    startup = time.perf_counter() - k.t0
    loop = 0.0
    if ranks:  # how long the loop runs on after its first checkpoint (looked at every 10 ms)
        if wait_until(k, lambda: latest_name(run) is not None):
            t_first = time.perf_counter()
            while k.running() and not training_done(k):
                time.sleep(0.01)
            loop = time.perf_counter() - t_first
    if k.wait() != 0:
        sys.exit(f"the reference run in {root} failed: {k.last_error()} (see {k.err})")
    life = time.perf_counter() - k.t0
    final = run / "checkpoints" / f"step{steps}"
    if not ckpt.is_complete(final):
        sys.exit(f"the reference run left no {final}")
    return Reference(run, final, steps, life, startup, history(run), loop)


def training_done(k: Kiln) -> bool:
    """The console's "done:" line (on_fit_end): the training loop and its final save are
    over."""
    return "\ndone: step" in k.out.read_text(errors="replace")


STALE = ".chaos-stale"  # marks a .tmp-stepN folder an earlier kill left behind


def save_phase_reached(run: Path, step: int, phase: str):
    """A check that the save of `step` has reached `phase` (or gone past it). A .tmp-stepN
    that an earlier kill left is marked first (kiln deletes it whole before it saves again),
    so that only the folder of this save counts."""
    root = ckpt.checkpoints_dir(run)
    tmp, final = root / f".tmp-step{step}", root / f"step{step}"
    if tmp.is_dir():
        (tmp / STALE).touch()

    def moved() -> bool:
        return latest_name(run) == final.name

    def renamed() -> bool:
        return final.is_dir() or moved()

    def fresh(part: str) -> bool:
        return (tmp / part).exists() and not (tmp / STALE).exists()

    if phase == "latest":
        return moved
    if phase == "rename":
        return renamed
    return lambda: fresh("." if phase == "tmp" else phase) or renamed()


def kill_once(config: Path, run: Path, ref: Reference, rng: random.Random, logs: Path,
              name: str) -> tuple[bool, str]:
    """Start the run (or its resume), SIGKILL it at a random moment. (killed, description)"""
    done = max(step_dirs(run), default=0)  # no save target at or below a step already saved
    saves = [s for s in range(INTERVAL, ref.steps + 1, INTERVAL) if s > done]
    if ref.steps not in saves and ref.steps > done:
        saves.append(ref.steps)  # the final save
    at = re.fullmatch(r"step(\d+)", latest_name(run) or "")  # where a resume starts
    remaining = (ref.steps - (int(at.group(1)) if at else 0)) / ref.steps
    kind = rng.choices(["anytime", "training", "save"], weights=[2, 3, 5])[0]
    if kind == "save" and not saves:
        kind = "training"
    k = Kiln(config, logs, name)
    if kind == "save":
        step, phase = rng.choice(saves), rng.choice(SAVE_PHASES)
        what = f"save:{phase}@step{step}"
        hit = wait_until(k, save_phase_reached(run, step, phase))
        if hit:
            k.signal(signal.SIGKILL)
    else:
        if kind == "anytime":
            delay = rng.uniform(0, ref.startup + ref.training * remaining)
            start = k.t0
        else:
            delay = rng.uniform(0, ref.training * remaining)
            wait_until(k, k.started_training)
            start = time.perf_counter()
        what = f"{kind}@{delay:.2f}s"
        while k.running() and time.perf_counter() < start + delay:
            time.sleep(POLL)
        hit = k.running()
        k.signal(signal.SIGKILL)
    rc = k.wait()
    if rc == -signal.SIGKILL:
        return True, f"{what} [{left_by_kill(run, logged_step(run))}]"
    status = "finished" if rc == 0 else f"failed: {k.last_error()}"
    return False, f"{what} missed ({'not reached, ' if not hit else ''}run {status})"


def finish(config: Path, run: Path, logs: Path, name: str, tries: int = 4, ranks: int = 0
           ) -> tuple[int, str]:
    """Run the same command until it exits 0: (runs it took, '' or the last error)."""
    for i in range(1, tries + 1):
        k = Kiln(config, logs, f"{name}-finish{i}", ranks)
        if k.wait() == 0:
            return i, ""
        err = k.last_error()
    return tries, err


def check_end(run: Path, ref: Reference, res: Result) -> None:
    """The finished run against the reference: complete, identical, nothing corrupt left."""
    final = run / "checkpoints" / f"step{ref.steps}"
    corrupt, litter = audit(run, final=True)
    res.corrupt += corrupt
    if litter:
        res.notes.append(f"left behind: {', '.join(litter)}")
    kept = len(ckpt.list_checkpoints(run))
    if kept > KEEP_LAST:
        res.notes.append(f"{kept} checkpoints kept (keep_last {KEEP_LAST})")
    res.resumed = ckpt.is_complete(final) and latest_name(run) == final.name
    if not res.resumed:
        res.problems.append(f"ended at {latest_name(run)}, not {final.name}")
        return
    diff = differences(ref.final, final)
    res.identical = not diff
    if diff:
        res.problems.append(f"differs from the reference: {', '.join(diff[:4])}")
    if history(run) != ref.history:
        res.identical = False
        res.problems.append("metrics.jsonl history differs from the reference")


def kill_trial(root: Path, tokens: Path, ref: Reference, rng: random.Random
               ) -> tuple[Result, str]:
    """Kill the run once or twice (the second time, its resume), then run it to the end."""
    root.mkdir()
    run = root / "run"
    config = write_config(root / "c.yaml", tokens, run, ref.steps)
    res, kills = Result(), []
    for j in range(1, rng.choice([1, 1, 2]) + 1):
        for attempt in range(3 if j == 1 else 1):  # a run never killed would be no trial
            killed, what = kill_once(config, run, ref, rng, root, f"kill{j}-{attempt + 1}")
            kills.append(what)
            if killed or j > 1:
                break
            shutil.rmtree(run, ignore_errors=True)  # the kill missed: start over
        corrupt, _ = audit(run, final=False)
        res.corrupt += [f"after kill {j}: {c}" for c in corrupt]
        if not killed:
            break
    runs, err = finish(config, run, root, "trial")
    if err:
        res.problems.append(f"resume failed {runs} times: {err}")
    check_end(run, ref, res)
    return res, f"{' | '.join(kills)} -> resumed in {runs} run(s)"


def mount_tmpfs(where: Path, size: int) -> str | None:
    """Mount a tmpfs of `size` bytes at `where`; None, or why it cannot be done."""
    if os.geteuid() != 0:
        return f"mounting a small tmpfs needs root (running as uid {os.geteuid()})"
    if not shutil.which("mount"):
        return "no `mount` command"
    where.mkdir(parents=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True, text=True)
    return f"mount -t tmpfs failed ({out.stderr.strip()[:100]})" if out.returncode else None


def disk_full_trial(root: Path, tokens: Path, ref: Reference, rng: random.Random,
                    check: bool) -> tuple[Result | None, str]:
    """The run's folder on a tmpfs with room for 4 checkpoints. Once the first checkpoint is
    saved the run is frozen and a filler takes all but a random part of one checkpoint's size,
    so the next save cannot fit: kiln's free-space check (`check`) must refuse it, or (check
    off) the write must fail part-way; either way in one line, leaving no partial checkpoint.
    Then the filler goes and the run resumes to the end."""
    size = ckpt.checkpoint_bytes(ref.final)
    disk = root / "disk"
    why = mount_tmpfs(disk, 4 * size + 4 * 2**20)
    if why:
        return None, f"skipped: {why}"
    res = Result()
    try:
        run = disk / "run"
        config = write_config(root / "c.yaml", tokens, run, ref.steps, check_free_space=check)
        k = Kiln(config, root, "full")
        first = f"step{INTERVAL}"
        if not wait_until(k, lambda: latest_name(run) == first):
            res.problems.append(f"the run ended before {first} was saved: {k.last_error()}")
            return res, "no first checkpoint"
        k.signal(signal.SIGSTOP)
        leave = int(rng.uniform(0, 1) * size)  # the next save does not fit in this
        free = shutil.disk_usage(disk).free
        filler = disk / "filler"
        try:
            filler.write_bytes(b"\0" * max(0, free - leave))
        except OSError:
            pass
        left = shutil.disk_usage(disk).free
        k.signal(signal.SIGCONT)
        rc = k.wait()
        err = k.err.read_text(errors="replace")
        said = k.last_error()
        what = (f"{left / 2**10:,.0f} KiB left after {first} (a checkpoint is "
                f"{size / 2**10:,.0f} KiB): rc {rc}, logged step {logged_step(run)}, latest "
                f"{latest_name(run)}, said: "
                f"{said.removeprefix('kiln: error: ').replace(str(run), 'RUN')[:110]}...")
        if rc == 0:
            res.problems.append("the disk never filled (the run finished)")
        elif ("Traceback" in err or not said.startswith("kiln: error:")
              or not any(w in said for w in ("no space left", "not enough disk space"))):
            res.problems.append(f"not a one-line 'no space left' error: {said[:160]}")
        corrupt, _ = audit(run, final=False)
        res.corrupt += corrupt
        leftovers = sorted(p.name for p in ckpt.checkpoints_dir(run).glob(".tmp-step*"))
        if leftovers:
            res.corrupt.append(f"partial checkpoint left after the failed save: {leftovers}")
        if latest_name(run) != first:
            res.problems.append(f"latest is {latest_name(run)}, not {first}")
        filler.unlink()
        runs, err = finish(config, run, root, "full")
        if err:
            res.problems.append(f"resume after freeing space failed: {err}")
        check_end(run, ref, res)
        return res, f"{what} -> freed, resumed in {runs} run(s)"
    finally:
        gc.collect()  # no open mapping may keep the tmpfs busy
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def sigterm_trial(root: Path, tokens: Path, ref: Reference, rng: random.Random
                  ) -> tuple[Result, str]:
    """SIGTERM the moment the save of a random stepN begins: that save must finish, the run
    stop there with exit 0 and say how to resume; then it resumes to the end."""
    root.mkdir()
    run = root / "run"
    config = write_config(root / "c.yaml", tokens, run, ref.steps)
    step = rng.choice(range(2 * INTERVAL, ref.steps, INTERVAL))
    res = Result()
    k = Kiln(config, root, "term")
    tmp = ckpt.checkpoints_dir(run) / f".tmp-step{step}"
    if wait_until(k, tmp.is_dir):
        k.signal(signal.SIGSTOP)  # frozen inside the save: the signal waits for SIGCONT
        inside = sorted(f.name for f in tmp.iterdir()) if tmp.is_dir() else ["renamed"]
        k.signal(signal.SIGTERM)
        k.signal(signal.SIGCONT)
        what = f"SIGTERM in the save of step{step} [{','.join(inside) or 'empty'}]"
    else:
        what = f"SIGTERM missed: the save of step{step} was not seen"
        res.problems.append(what)
    rc = k.wait()
    out, err = k.out.read_text(errors="replace"), k.err.read_text(errors="replace")
    stopped = re.search(r"stopped by SIGTERM at step (\d+); checkpoint (\S+); resume with: "
                        r"kiln train (\S+)", out)
    if rc != 0:
        res.problems.append(f"exit {rc}, not 0: {k.last_error()}")
    elif "SIGTERM received" not in err or stopped is None:
        res.problems.append("no 'SIGTERM received' / 'stopped by SIGTERM ... resume with' "
                            "message")
    elif int(stopped.group(1)) != step or latest_name(run) != f"step{step}":
        res.problems.append(f"stopped at step {stopped.group(1)}, latest {latest_name(run)}; "
                            f"expected step{step} (the save it was in)")
    corrupt, _ = audit(run, final=False)
    res.corrupt += corrupt
    what += f": rc {rc}, latest {latest_name(run)}"
    runs, err = finish(config, run, root, "term")
    if err:
        res.problems.append(f"resume failed: {err}")
    check_end(run, ref, res)
    return res, f"{what} -> resumed in {runs} run(s)"


RANKS = 2
RANK_TIMEOUT_MIN = 0.5  # parallel.timeout_minutes: a survivor stuck in a collective fails fast
EXIT_LIMIT = 120  # seconds torchrun may take to exit after a rank is killed


def rank_parallel(dp: str) -> dict:
    return {"dp": dp, "timeout_minutes": RANK_TIMEOUT_MIN}


def workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the kiln workers a torchrun launcher started: its children whose
    environment holds RANK=."""
    kids: set[int] = set()
    for f in Path(f"/proc/{launcher}/task").glob("*/children"):
        try:
            kids |= {int(x) for x in f.read_text().split()}
        except OSError:
            pass
    found = {}
    for kid in kids:
        try:
            env = Path(f"/proc/{kid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for var in env:
            if var.startswith(b"RANK="):
                found[int(var[len("RANK="):])] = kid
    return found


def alive(pid: int) -> bool:
    """Is process `pid` running (a zombie is not)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_error(k: Kiln) -> str:
    """The exit codes in torchrun's report and the first error line a kiln worker wrote."""
    err = k.err.read_text(errors="replace")
    codes = re.findall(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)", err)
    said = "exit codes " + ", ".join(f"rank {r} {c}" for r, c in sorted(codes))
    for line in err.splitlines():
        m = re.match(r"\[rank\d+\]:\s*((kiln: error:|[A-Za-z_.]*(Error|Exception)\b:).*)",
                     line.strip())
        if m:
            text = re.sub(r"\[/\S+\] ", "", m.group(1))  # without gloo's source path
            return f"{said}; {text[:90]}"
    return said


def verify_cli(run: Path) -> str | None:
    """`kiln checkpoint verify RUN`: None when it exits 0, else its complaint."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-m", "kiln", "checkpoint", "verify", str(run)],
                         capture_output=True, text=True, env=env)
    if out.returncode == 0:
        return None
    said = (out.stdout + out.stderr).strip().splitlines()
    return f"exit {out.returncode}: {said[0][:150] if said else 'nothing said'}"


def rank_kill_trial(root: Path, tokens: Path, ref: Reference, rng: random.Random, dp: str
                    ) -> tuple[Result, str, float | None]:
    """A 2-rank torchrun run; once its first checkpoint is saved, ONE worker process (a
    random rank) is SIGKILLed at a random moment: in the training loop, or as rank 0 begins
    the save of a random later checkpoint. torchrun must exit non-zero within EXIT_LIMIT s
    (returned: how long it took) and leave no worker behind; no checkpoint may be damaged;
    then the same torchrun command resumes to a final checkpoint bit-identical to the
    2-rank reference's."""
    root.mkdir()
    run = root / "run"
    config = write_config(root / "c.yaml", tokens, run, ref.steps, rank_parallel(dp))
    res, what, exit_s = Result(), "", None
    for attempt in range(1, 4):  # a kill that lands after the run ended is drawn again
        k = Kiln(config, root, f"kill-{attempt}", RANKS)
        if not wait_until(k, lambda: latest_name(run) is not None, timeout=300):
            k.wait()
            res.problems.append(f"no first checkpoint (rc {k.proc.returncode}; "
                                f"{worker_error(k)})")
            return res, "the run never saved", None
        pids = workers(k.proc.pid)
        if sorted(pids) != list(range(RANKS)):
            res.problems.append(f"workers of torchrun (pid {k.proc.pid}) not found: {pids}")
            k.signal(signal.SIGTERM)  # torchrun then stops its workers
            k.wait()
            return res, "no workers", None
        victim = rng.randrange(RANKS)
        kind = rng.choice(["training", "save"])
        done = max(step_dirs(run), default=0)
        ahead = [s for s in range(INTERVAL, ref.steps + 1, INTERVAL) if s > done]
        if kind == "save" and ahead:
            step = rng.choice(ahead)
            moment = f"as rank 0 began the save of step{step}"
            wait_until(k, save_phase_reached(run, step, "tmp"), timeout=300)
        else:
            delay = rng.uniform(0, ref.loop)
            moment = f"{delay:.2f} s after the first checkpoint"
            end = time.perf_counter() + delay
            while k.running() and time.perf_counter() < end:
                time.sleep(0.002)
        if not (k.running() and alive(pids[victim])) or training_done(k):
            k.wait()
            what += f"kill of rank {victim} {moment} missed (training over); "
            shutil.rmtree(run, ignore_errors=True)
            continue
        os.kill(pids[victim], signal.SIGKILL)
        t_kill = time.perf_counter()
        try:
            rc = k.wait(timeout=EXIT_LIMIT + 60)
        except subprocess.TimeoutExpired:
            rc = None
        exit_s = time.perf_counter() - t_kill
        left = left_by_kill(run, logged_step(run))
        what += (f"SIGKILL rank {victim} (pid {pids[victim]}) {moment} [{left}] -> torchrun "
                 f"rc {rc} after {exit_s:.1f} s")
        if rc is None or rc == 0 or exit_s >= EXIT_LIMIT:
            res.problems.append(f"torchrun exit {rc} {exit_s:.0f} s after the kill "
                                f"(want non-zero within {EXIT_LIMIT} s)")
        else:
            res.notes.append(worker_error(k))
        deadline = time.perf_counter() + 5
        while any(alive(p) for p in pids.values()) and time.perf_counter() < deadline:
            time.sleep(0.05)
        for r, p in pids.items():
            if alive(p):
                res.problems.append(f"rank {r} (pid {p}) still running after torchrun exited")
                os.kill(p, signal.SIGKILL)
        break
    else:
        res.problems.append("three runs ended before the kill landed")
        return res, what, None
    corrupt, _ = audit(run, final=False)
    res.corrupt += [f"after the kill: {c}" for c in corrupt]
    if latest_name(run) is None or not ckpt.is_complete(ckpt.checkpoints_dir(run)
                                                         / latest_name(run)):
        res.problems.append(f"after the kill latest is {latest_name(run)}, not a complete "
                            "checkpoint")
    runs, err = finish(config, run, root, "trial", tries=2, ranks=RANKS)
    if err:
        res.problems.append(f"resume failed {runs} times: {err}")
    check_end(run, ref, res)
    complaint = verify_cli(run)
    if complaint:
        res.corrupt.append(f"kiln checkpoint verify: {complaint}")
    return res, f"{what} -> resumed in {runs} run(s)", exit_s


def verdict(res: Result) -> str:
    words = ["resumed" if res.resumed else "NOT RESUMED",
             "bit-identical" if res.identical else "NOT IDENTICAL"]
    if res.corrupt:
        words.append(f"CORRUPT: {'; '.join(res.corrupt)}")
    return ", ".join(words) + "".join(f"; {n}" for n in res.problems + res.notes)


def source_version() -> str:
    """The commit of this source tree, and whether src/ differs from it."""
    def git(*a: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "(no git)"
    return head + (" + uncommitted changes in src/" if git("status", "--porcelain", "src")
                   else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="SIGKILL trials (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--steps", type=int, default=40, help="training steps of each run")
    ap.add_argument("--rank-trials", type=int, default=2,
                    help="trials killing one rank of a 2-process DDP torchrun run (default 2)")
    ap.add_argument("--fsdp-trials", type=int, default=1,
                    help="the same with FSDP2 and sharded checkpoints (default 1)")
    ap.add_argument("--rank-steps", type=int, default=20,
                    help="training steps of each torchrun run (default 20)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder and its logs")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kiln-chaos-"))
    failed = False
    try:
        global SRC  # edits made to src/ while the drill runs must not mix two versions
        SRC = Path(shutil.copytree(REPO / "src", work / "src",
                                   ignore=shutil.ignore_patterns("__pycache__")))
        tokens = make_tokens(work)
        (work / "ref").mkdir()
        ref = reference_run(work / "ref", tokens, args.steps)
        print(f"reference: {args.steps} steps, checkpoint every {INTERVAL}, keep_last "
              f"{KEEP_LAST}; {ref.life:.1f} s ({ref.startup:.1f} s start-up); work folder {work}; "
              f"kiln {source_version()}",
              flush=True)
        resumed = identical = corrupt = 0
        w = len(str(args.trials))
        for i in range(1, args.trials + 1):
            t0 = time.perf_counter()
            res, line = kill_trial(work / f"trial{i:02d}", tokens, ref, rng)
            resumed += res.resumed
            identical += res.identical
            corrupt += len(res.corrupt)
            failed |= not res.ok
            print(f"trial {i:>{w}}/{args.trials} {line}: {verdict(res)} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        extra = [("disk-full (check_free_space)", partial(disk_full_trial, check=True)),
                 ("disk-full (no check)", partial(disk_full_trial, check=False)),
                 ("sigterm", sigterm_trial)]
        for n, (name, trial) in enumerate(extra):
            res, line = trial(work / f"extra{n}", tokens, ref, rng)
            if res is None:
                print(f"{name}: {line}", flush=True)
                continue
            corrupt += len(res.corrupt)
            failed |= not res.ok
            print(f"{name}: {line}: {verdict(res)}", flush=True)
        rank_ok, exits = 0, []
        rank_total = args.rank_trials + args.fsdp_trials
        for dp, count in (("ddp", args.rank_trials), ("fsdp", args.fsdp_trials)):
            if not count:
                continue
            (work / f"ref-{dp}").mkdir()
            rref = reference_run(work / f"ref-{dp}", tokens, args.rank_steps, RANKS,
                                 rank_parallel(dp))
            print(f"reference ({RANKS} ranks, {dp}): {args.rank_steps} steps; {rref.life:.1f} s "
                  f"({rref.startup:.1f} s start-up, {rref.loop:.1f} s from the first checkpoint "
                  "to the end of training)", flush=True)
            for i in range(1, count + 1):
                t0 = time.perf_counter()
                res, line, exit_s = rank_kill_trial(work / f"rank-{dp}{i}", tokens, rref, rng,
                                                    dp)
                rank_ok += res.ok
                corrupt += len(res.corrupt)
                failed |= not res.ok
                if exit_s is not None:
                    exits.append(exit_s)
                print(f"rank-kill {dp} {i}/{count} {line}: {verdict(res)} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        ranks = ""
        if rank_total:
            slowest = f"; torchrun exited {max(exits):.1f} s after a kill at most" if exits else ""
            ranks = (f"; {rank_ok}/{rank_total} rank-kill trials resumed bit-identical "
                     f"({args.rank_trials} ddp, {args.fsdp_trials} fsdp{slowest})")
        print(f"{resumed}/{args.trials} resumed, {identical}/{args.trials} bit-identical, "
              f"{corrupt} corrupt{ranks} ({time.perf_counter() - t_start:.0f} s)")
    finally:
        if args.keep or failed:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
