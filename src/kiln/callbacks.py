"""What the training loop reports to, each a small callback: the metrics file, the console,
trackers (kiln.trackers), and any of your own passed to Trainer(callbacks=[...]).

A callback may implement any of: on_fit_start(trainer), on_step(trainer) (after every step),
on_log(trainer, metrics), on_eval(trainer, metrics), on_checkpoint(trainer, path),
on_note(trainer, text), on_preempt(trainer, result), on_fit_end(trainer, metrics). Only rank 0
runs callbacks.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

from kiln.errors import KilnError, warn


class Callback:
    def on_fit_start(self, trainer) -> None: ...
    def on_step(self, trainer) -> None: ...
    def on_log(self, trainer, metrics: dict) -> None: ...
    def on_eval(self, trainer, metrics: dict) -> None: ...
    def on_checkpoint(self, trainer, path: Path) -> None: ...
    def on_fit_end(self, trainer, metrics: dict) -> None: ...
    def on_preempt(self, trainer, result: dict) -> None: ...
    def on_note(self, trainer, text: str) -> None: ...


class MetricsFileCallback(Callback):
    """RUN_DIR/metrics.jsonl: one JSON object per logged step (and per evaluation).

    On resume, lines after the checkpoint's step are dropped, so the file describes exactly
    the steps that led to the current weights. A line cut short (a crash or a full disk in the
    middle of a write) is dropped with a warning. A run that starts again from step 0 over an
    earlier history keeps that history in ``metrics.prev-N.jsonl``; nothing is deleted.
    A failed write stops the run with a one-line error.
    """

    def __init__(self, path: Path, truncate_after: int | None = None):
        self.path = Path(path)
        self._f = None
        self._check_appendable()
        if truncate_after is not None and self.path.is_file():
            try:
                self._truncate(truncate_after)
            except OSError as e:
                raise KilnError(f"could not rewrite {self.path} ({e.strerror or e}); free disk "
                                "space and run again (checkpoints are untouched)") from None

    def _check_appendable(self) -> None:
        """Refuse, before the first step, a metrics path that cannot take records: a folder,
        a dangling link, a device or pipe (a link to /dev/full), a file that cannot be opened
        for appending. Nothing is created."""
        p, fix = self.path, "remove or rename it: kiln keeps its metrics in a regular file there"
        if p.is_symlink() and not p.exists():
            raise KilnError(f"{p} is a link to {os.readlink(p)}, which does not exist; {fix}")
        if p.exists() and not p.is_file():
            what = "a folder" if p.is_dir() else "not a regular file (a device or pipe)"
            raise KilnError(f"{p} is {what}; {fix}")
        try:
            if p.exists():  # (a new one is made by the first record: the folder is writable)
                with open(p, "a"):
                    pass
        except OSError as e:
            raise KilnError(f"cannot append to {p} ({e.strerror or e}); {fix}, or free disk "
                            "space") from None

    def _truncate(self, after: int) -> None:
        kept, later, torn = [], 0, []
        for i, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record.get("step", 0))
            except (ValueError, TypeError, AttributeError):
                torn.append(i)
                continue
            if step <= after:
                kept.append(line)
            else:
                later += 1
        if torn:
            warn(f"{self.path}: dropped {len(torn)} unreadable line(s) (line {torn[0]}: a "
                 "record cut short by a crash or a full disk)")
        if after == 0 and later:  # a fresh start over an earlier history: keep that history
            n = 1
            while (old := self.path.with_name(f"metrics.prev-{n}.jsonl")).exists():
                n += 1
            os.replace(self.path, old)
            warn(f"{self.path.parent} has {later} logged record(s) but no checkpoint to resume "
                 f"from: this run starts at step 0; the earlier records are kept in {old}")
            return
        if not torn and not later:
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def _write(self, record: dict) -> None:
        """Append one line, whole or not at all: a write cut short (a full disk) is cut back
        off the file before the run stops, so no torn line is left behind."""
        line = memoryview((json.dumps(record) + "\n").encode("utf-8"))
        size = None
        try:
            if self._f is None:
                self._f = open(self.path, "ab", buffering=0)  # each write reaches the file
            size = os.fstat(self._f.fileno()).st_size
            while line:
                line = line[self._f.write(line):]
        except OSError as e:
            if size is not None:
                try:
                    os.ftruncate(self._f.fileno(), size)  # frees space: needs none
                except OSError:
                    pass
            raise KilnError(f"could not append to {self.path} ({e.strerror or e}) at step "
                            f"{record.get('step')}; the run stopped, its checkpoints are "
                            f"untouched; free disk space and resume: kiln train "
                            f"{self.path.parent}") from None

    def on_log(self, trainer, metrics: dict) -> None:
        self._write(metrics)

    def on_eval(self, trainer, metrics: dict) -> None:
        self._write(metrics)

    def on_preempt(self, trainer, result: dict) -> None:
        self.on_fit_end(trainer, result)

    def on_fit_end(self, trainer, metrics: dict) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ConsoleCallback(Callback):
    """Progress lines: step, loss, LR, grad norm, tokens/s, ETA."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self._t0 = time.perf_counter()
        self._step0 = 0

    def on_fit_start(self, trainer) -> None:
        n = trainer.numbers
        self._t0, self._step0 = time.perf_counter(), trainer.step
        where = {"new": "new run", "resume": f"resumed from {trainer.plan.source}",
                 "init": f"new run from {trainer.plan.source}"}[trainer.plan.kind]
        self.console.print(
            f"[bold]kiln[/bold] {where} | {trainer.cfg.model.num_params():,} params | "
            f"{trainer.device.type} {trainer.precision} | {n.tokens_per_step:,} tokens/step | "
            f"steps {trainer.step} -> {n.stop_step} of {n.total_steps} | run_dir "
            f"{trainer.run_dir}"
        )
        for note in trainer.plan.notes[1:]:
            self.console.print(note, markup=False)

    def on_log(self, trainer, m: dict) -> None:
        done = trainer.step - self._step0
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(done, 1) * (trainer.numbers.stop_step - trainer.step)
        self.console.print(
            f"step {m['step']:>6}/{trainer.numbers.stop_step} | loss {m['loss']:.4f} | "
            f"lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f} | "
            f"{m['tokens_per_sec']:,.0f} tok/s"
            + (f" | MFU {m['mfu']:.1%}" if "mfu" in m else "")
            + f" | ETA {_fmt_time(eta)}"
        )

    def on_preempt(self, trainer, result: dict) -> None:
        self.console.print(
            f"[yellow]stopped by {result['preempted']} at step {trainer.step}; checkpoint "
            f"{result['checkpoint']}; resume with: kiln train {trainer.run_dir}[/yellow]"
        )

    def on_checkpoint(self, trainer, path: Path) -> None:
        self.console.print(f"[green]saved checkpoint {path}[/green]")

    def on_note(self, trainer, text: str) -> None:
        self.console.print(text, markup=False)

    def on_eval(self, trainer, m: dict) -> None:
        if "val_loss" not in m:  # downstream tasks: each task's primary metric
            tasks = trainer.evals.tasks
            parts = [f"{t.name} {t.primary_metric} {m[key]:.4f}" for t in tasks
                     if (key := f"{t.name}/{t.primary_metric}") in m]
            self.console.print(f"[cyan]tasks  step {m['step']:>6} | "
                               + " | ".join(parts) + "[/cyan]")
            return
        self._last_eval = m
        self.console.print(
            f"[cyan]eval   step {m['step']:>6} | val_loss {m['val_loss']:.4f} | "
            f"val_ppl {m['val_ppl']:.2f}[/cyan]"
        )

    def on_fit_end(self, trainer, m: dict) -> None:
        elapsed = time.perf_counter() - self._t0
        self.console.print(f"done: step {trainer.step}, {trainer.tokens_seen:,} tokens, "
                           f"{_fmt_time(elapsed)}")
        ev = getattr(self, "_last_eval", None)
        baseline = trainer.unigram_entropy
        if ev is not None and baseline is not None:
            self.console.print(
                f"final val_loss {ev['val_loss']:.4f} nats vs unigram entropy of the training "
                f"data {baseline:.4f} nats ({abs(baseline - ev['val_loss']):.2f} nats "
                f"{'below' if ev['val_loss'] <= baseline else 'above'} it)"
            )
