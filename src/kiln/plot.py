"""Pictures of runs: the LR schedule (past and planned), and the curves of one or more runs
on one figure (`kiln plot`)."""

from __future__ import annotations

import csv
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import KilnError, one_line
from kiln.schedule import LRSchedule

if TYPE_CHECKING:
    import argparse

    from matplotlib.figure import Figure


def plot_schedule(schedule: LRSchedule, path: Path, *, current: int | None = None,
                  title: str = "learning rate", first: int | None = None) -> Path:
    """Write a PNG of the LR curve: the part already trained solid, the planned part dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = first if first is not None else min(s.start for s in schedule.segments) + 1
    end = max(schedule.end, start + 1)
    every = max((end - start) // 2000, 1)
    steps = list(range(start, end + 1, every))
    if steps[-1] != end:
        steps.append(end)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    if current is not None and current >= start:
        past = [s for s in steps if s <= current] + [current]
        ax.plot(past, [schedule.lr(s) for s in past], color="tab:blue", lw=2, label="trained")
        todo = [current] + [s for s in steps if s > current]
        ax.plot(todo, [schedule.lr(s) for s in todo], color="tab:orange", lw=2, ls="--",
                label="planned")
        ax.axvline(current, color="grey", lw=0.8, ls=":")
        ax.legend(loc="upper right")
    else:
        ax.plot(steps, [schedule.lr(s) for s in steps], color="tab:orange", lw=2, ls="--",
                label="planned")
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# kiln plot: the curves of one or more runs on one figure

X_KEYS = {"steps": "step", "tokens": "tokens"}
"""--x: the record key of each axis."""
DEFAULT_METRICS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_sec")
"""Panels drawn by default, those that some run logged (then each task's primary metric)."""
NOT_SMOOTHED = frozenset({"lr"})
"""Training-line metrics drawn as logged: the LR is no noisy measurement."""
PRIMARY_FALLBACK = ("acc", "len_norm", "f1", "bpb", "ce_loss", "acc_per_token")
"""A task's panel metric when RUN_DIR/eval/stepN.json does not name its primary metric."""
FORMATS = (".png", ".svg", ".pdf")
_STEP_DIR = re.compile(r"^step(\d+)$")


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Segment:
    """The records of one run directory, placed on the x axis of the history drawn: a run's
    steps plus ``step_offset`` (a continued run that counted from 0 again sits after its
    parent's steps)."""

    name: str
    path: Path
    records: list[dict]
    step_offset: int = 0
    token_offset: int = 0

    def points(self, metric: str, x: str) -> tuple[list[float], list[float]]:
        key = X_KEYS[x]
        off = self.step_offset if x == "steps" else self.token_offset
        pairs = sorted((r[key] + off, float(r[metric]) if math.isfinite(r[metric]) else math.nan)
                       for r in self.records if _number(r.get(metric)) and _number(r.get(key)))
        return [p[0] for p in pairs], [p[1] for p in pairs]

    @cached_property
    def keys(self) -> set[str]:
        return {k for r in self.records for k, v in r.items()
                if _number(v) and k not in ("step", "tokens")}

    @cached_property
    def train_keys(self) -> set[str]:
        """Metrics of the training lines (dense, one per logged step)."""
        return {k for r in self.records if "loss" in r for k in r}


@dataclass
class History:
    """What is drawn for one run: its ancestors' records up to where each was continued
    (oldest first), then its own."""

    name: str
    path: Path
    own: Segment
    ancestors: list[Segment] = field(default_factory=list)
    primary: dict[str, str] = field(default_factory=dict)
    """Task name -> its primary metric (from RUN_DIR/eval/stepN.json)."""
    notes: list[str] = field(default_factory=list)

    @property
    def segments(self) -> list[Segment]:
        return [*self.ancestors, self.own]


def read_metrics(run_dir: Path) -> tuple[list[dict], int]:
    """RUN_DIR/metrics.jsonl's records, and the number of unreadable lines skipped."""
    records, torn = [], 0
    try:
        text = (run_dir / "metrics.jsonl").read_text(errors="replace")
    except OSError as e:
        raise KilnError(f"could not read {run_dir / 'metrics.jsonl'} ({e.strerror or e})") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(record, dict) and _number(record.get("step")):
            records.append(record)
        else:
            torn += 1
    return records, torn


def read_primary(run_dir: Path) -> dict[str, str]:
    """Task -> primary metric, as the run's in-loop evaluations recorded them."""
    out: dict[str, str] = {}
    folder = run_dir / "eval"
    if not folder.is_dir():
        return out
    files = sorted((p for p in folder.glob("step*.json") if _STEP_DIR.match(p.stem)),
                   key=lambda p: int(p.stem[4:]))
    for p in files:
        try:
            tasks = json.loads(p.read_text()).get("tasks", {})
            out.update({t: r["primary"] for t, r in tasks.items()
                        if isinstance(r, dict) and isinstance(r.get("primary"), str)})
        except (OSError, ValueError, AttributeError):
            continue
    return out


def load_history(run: str | Path, *, parents: bool = True) -> History:
    """One run's records (RUN_DIR or RUN_DIR/metrics.jsonl) and, with `parents`, those of the
    runs it was continued from (init.from in RUN_DIR/config.yaml), each up to the fork."""
    path = Path(run)
    if path.name == "metrics.jsonl" and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise KilnError(f"run directory {str(path)!r} does not exist; give the trainer.run_dir "
                        "of a run")
    if not (path / "metrics.jsonl").is_file():
        raise KilnError(f"{path} has no metrics.jsonl (not a run directory, or a run that has "
                        "not logged a step yet); give the trainer.run_dir of a run that trained")
    records, torn = read_metrics(path)
    if not records:
        raise KilnError(f"{path / 'metrics.jsonl'} holds no records; train the run for at "
                        "least log.interval steps first")
    h = History(path.name, path, Segment(path.name, path, records), primary=read_primary(path))
    if torn:
        h.notes.append(f"{h.name}: skipped {torn} unreadable line(s) of its metrics.jsonl")
    if parents:
        _attach_parents(h)
    return h


def _attach_parents(h: History) -> None:
    """Prepend the ancestors of `h` (init.from, then its init.from, ...), each cut at the
    step its child started from; put every segment on the x axis of the oldest."""
    child, seen = h.own, {h.path.resolve()}
    while len(h.ancestors) < 32:
        found = _parent_of(child)
        if found is None:
            break
        parent_dir, fork, kept, note = found
        if parent_dir is None:
            h.notes.append(note)
            break
        if parent_dir.resolve() in seen:
            h.notes.append(f"{child.name}: init.from leads back to {parent_dir} (a loop); "
                           "its ancestors are not drawn")
            break
        seen.add(parent_dir.resolve())
        if not (parent_dir / "metrics.jsonl").is_file():
            h.notes.append(f"{child.name}: its parent {parent_dir} has no metrics.jsonl; drawn "
                           "without it")
            break
        records, _ = read_metrics(parent_dir)
        first = min(int(r["step"]) for r in child.records)
        latest = _latest_step(parent_dir)
        if fork is None:  # init.from named the run directory: its latest checkpoint then
            fork = min(v for v in (latest, first - 1 if kept else None,
                                   max((int(r["step"]) for r in records), default=0))
                       if v is not None)
            where = f"step {fork:,}, its latest checkpoint"
        else:
            where = f"step {fork:,}"
        note = note.replace("{where}", where)
        kept_records = [r for r in records if r["step"] <= fork]
        if not kept_records:
            h.notes.append(f"{child.name}: its parent {parent_dir} logged nothing up to step "
                           f"{fork:,}; drawn without it")
            break
        parent = Segment(parent_dir.name, parent_dir, kept_records)
        if kept:  # the child continued the parent's counters
            parent.step_offset, parent.token_offset = child.step_offset, child.token_offset
        else:
            parent.step_offset = child.step_offset - fork
            parent.token_offset = child.token_offset - _tokens_at(parent_dir, records, fork)
        h.notes.append(note)
        h.ancestors.insert(0, parent)
        child = parent
    root = h.segments[0]
    s0, t0 = root.step_offset, root.token_offset
    for seg in h.segments:
        seg.step_offset -= s0
        seg.token_offset -= t0


def _parent_of(child: Segment) -> tuple[Path | None, int | None, bool, str] | None:
    """(parent run directory, fork step in the parent's count or None, counters kept, note)
    from the child's saved config; None when it was not continued from a kiln run."""
    import yaml

    try:
        cfg = yaml.safe_load((child.path / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    init = cfg.get("init") if isinstance(cfg, dict) else None
    src = init.get("from") if isinstance(init, dict) else None
    if not isinstance(src, str) or not src or src.startswith("hf:"):
        return None
    kept = init.get("load_schedule_position", True) is not False
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    for cand in _candidates(Path(src).expanduser(), child.path, trainer.get("run_dir")):
        m = _STEP_DIR.match(cand.name)
        if m and cand.parent.name == "checkpoints" and cand.parent.parent.is_dir():
            run, fork = cand.parent.parent, int(m.group(1))
        elif cand.is_dir() and ((cand / "metrics.jsonl").is_file()
                                or (cand / "checkpoints").is_dir()):
            run, fork = cand, None
        else:
            continue
        return run, fork, kept, (f"{child.name}: continues {run.name} from {{where}} "
                                 f"(init.from={src})")
    return None, None, kept, (f"{child.name}: its parent (init.from={src}) is not a run "
                              "directory found here; drawn without it")


def _candidates(src: Path, run_dir: Path, saved_run_dir: object) -> list[Path]:
    """Where init.from may be now: as written, from where the run was started (the saved
    trainer.run_dir tells how deep the run directory was), and beside the run directory
    (runs moved together)."""
    out = [src]
    if not src.is_absolute() and isinstance(saved_run_dir, str) and saved_run_dir:
        depth = len(Path(saved_run_dir).parts)
        here = run_dir.resolve()
        if not Path(saved_run_dir).is_absolute() and depth <= len(here.parents):
            out.append(here.parents[depth - 1] / src)
    parts = src.parts
    tail = parts[-3:] if len(parts) >= 3 and parts[-2] == "checkpoints" else parts[-1:]
    out.append(run_dir.parent.joinpath(*tail))
    return out


def _latest_step(run_dir: Path) -> int | None:
    root = run_dir / "checkpoints"
    try:
        m = _STEP_DIR.match((root / "latest").read_text().strip())
        if m:
            return int(m.group(1))
    except OSError:
        pass
    steps = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else [])
             if (m := _STEP_DIR.match(p.name))]
    return max(steps, default=None)


def _tokens_at(run_dir: Path, records: list[dict], step: int) -> int:
    """Tokens seen by the parent at `step`: its record of that step, its checkpoint, or the
    tokens per step of its last record before."""
    for r in records:
        if r["step"] == step and _number(r.get("tokens")):
            return int(r["tokens"])
    try:
        state = json.loads((run_dir / "checkpoints" / f"step{step}" / "trainer.json").read_text())
        return int(state["tokens_seen"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    before = [r for r in records if r["step"] <= step and _number(r.get("tokens")) and r["step"]]
    if not before:
        return 0
    last = max(before, key=lambda r: r["step"])
    return round(last["tokens"] / last["step"] * step)


def load_histories(runs: list[str | Path], *, parents: bool = True) -> list[History]:
    """Every run (each once), named by its folder (with its parent folder where two share a
    name)."""
    if not runs:
        raise KilnError("no run to plot; give one or more run directories")
    histories, seen = [], set()
    for run in runs:
        h = load_history(run, parents=parents)
        if h.path.resolve() not in seen:
            seen.add(h.path.resolve())
            histories.append(h)
    names = [h.name for h in histories]
    for h in histories:
        if names.count(h.name) > 1:
            h.name = h.own.name = f"{h.path.resolve().parent.name}/{h.path.name}"
    return histories


def _tasks(histories: list[History]) -> dict[str, str]:
    """Task -> the metric key drawn for it (its primary metric), in the order first logged."""
    out: dict[str, str] = {}
    for h in histories:
        for seg in h.segments:
            for r in seg.records:
                for key in r:
                    task, _, metric = key.rpartition("/")
                    if not task or task in out:
                        continue
                    keys = {k for rr in seg.records for k in rr if k.startswith(task + "/")}
                    primary = h.primary.get(task)
                    if primary is None or f"{task}/{primary}" not in keys:
                        primary = next((m for m in PRIMARY_FALLBACK if f"{task}/{m}" in keys),
                                       metric)
                    out[task] = f"{task}/{primary}"
    return out


def resolve_metrics(metrics: str | list[str] | None, histories: list[History]) -> list[str]:
    """The panels: the names asked for (a task's name alone is its primary metric), or the
    default ones these runs logged; an unknown name is refused with the closest ones."""
    present: set[str] = set()
    for h in histories:
        for seg in h.segments:
            present |= seg.keys
    tasks = _tasks(histories)
    if metrics is None:
        chosen = [m for m in DEFAULT_METRICS if m in present] + list(tasks.values())
        return chosen or sorted(present)
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise KilnError("--metrics is empty; give comma-separated names such as "
                        "--metrics=loss,val_loss,lr")
    chosen = []
    for name in names:
        key = name if name in present else tasks.get(name)
        if key is None:
            close = difflib.get_close_matches(name, sorted(present | set(tasks)), n=3,
                                              cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise KilnError(f"unknown metric {name!r}: no run here logged it; {hint}(metrics "
                            f"in these runs: {', '.join(sorted(present))})")
        if key not in chosen:
            chosen.append(key)
    return chosen


def read_compare(path: str | Path, x: str, metrics: list[str]
                 ) -> tuple[str, dict[str, tuple[list[float], list[float]]]]:
    """A reference curve: (label, {metric: (xs, ys)}) from a CSV with a header row, an x
    column named step/steps or tokens and metric columns named like the panels."""
    p = Path(path)
    what = f"--compare {p}"
    if not p.is_file():
        raise KilnError(f"{what}: no such file; give a CSV whose header names step (or tokens) "
                        "and metrics such as loss")
    try:
        rows = list(csv.reader(p.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise KilnError(f"{what}: not a readable CSV ({one_line(e)}); give a text CSV with a "
                        "header row") from None
    numbered = [(i, [c.strip() for c in r]) for i, r in enumerate(rows, 1)
                if any(c.strip() for c in r)]
    if not numbered:
        raise KilnError(f"{what} is empty; give a header row (step,loss) and rows of numbers")
    header = numbered[0][1]
    lower = [c.lower() for c in header]
    cols = {"steps": next((i for i, c in enumerate(lower) if c in ("step", "steps")), None),
            "tokens": next((i for i, c in enumerate(lower) if c in ("tokens", "token")), None)}
    xcol = cols[x]
    if xcol is None:
        other = "tokens" if x == "steps" else "steps"
        if cols[other] is not None:
            raise KilnError(f"{what}: its x column is {header[cols[other]]!r}, not {x}; plot "
                            f"with --x {other}, or add a {x} column to the CSV")
        raise KilnError(f"{what}: no x column in its header ({', '.join(header)}); name one "
                        "column step (or steps, or tokens)")
    matched = [(i, h) for i, h in enumerate(header) if h in metrics and i not in cols.values()]
    if not matched:
        others = [h for i, h in enumerate(header) if i not in cols.values()]
        raise KilnError(f"{what}: no column is a metric drawn (its columns: "
                        f"{', '.join(others) or 'none'}; panels: {', '.join(metrics)}); name a "
                        "column like the metric, e.g. loss, or choose panels with --metrics")
    curves: dict[str, tuple[list[float], list[float]]] = {h: ([], []) for _, h in matched}

    def number(line: int, row: list[str], i: int) -> float | None:
        cell = row[i] if i < len(row) else ""
        if not cell:
            return None
        try:
            return float(cell)
        except ValueError:
            raise KilnError(f"{what}: line {line}: {cell!r} in column {header[i]!r} is not a "
                            "number; fix or remove that row") from None

    for line, row in numbered[1:]:
        xv = number(line, row, xcol)
        if xv is None:
            continue
        for i, h in matched:
            yv = number(line, row, i)
            if yv is not None:
                curves[h][0].append(xv)
                curves[h][1].append(yv)
    if not any(xs for xs, _ in curves.values()):
        raise KilnError(f"{what} has a header but no rows of numbers; add rows such as "
                        f"{header[xcol]},{matched[0][1]} = 100,3.2")
    return p.stem, curves


def auto_smooth(histories: list[History]) -> int:
    """The default EMA span: a fiftieth of the longest run's logged steps, at most 200 (1:
    none)."""
    n = max(len([r for seg in h.segments for r in seg.records if "loss" in r])
            for h in histories)
    return max(1, min(round(n / 50), 200))


def ema(ys: list[float], span: int) -> list[float]:
    """Exponential moving average with the bias of its start removed (span 1: unchanged);
    NaN points are skipped."""
    if span <= 1:
        return list(ys)
    alpha, s, w, out = 2.0 / (span + 1), 0.0, 0.0, []
    for y in ys:
        if math.isnan(y):
            out.append(math.nan)
            continue
        s, w = (1 - alpha) * s + alpha * y, (1 - alpha) * w + alpha
        out.append(s / w)
    return out


def ancestor_label(h: History, seg: Segment) -> str:
    return f"from {'parent' if seg is h.ancestors[-1] else 'ancestor'} {seg.name}"


def make_figure(histories: list[History], *, x: str = "steps",
                metrics: str | list[str] | None = None, smooth: int | None = None,
                compare: str | Path | None = None) -> Figure:
    """One panel per metric on a shared x axis; each run in its colour (its ancestors
    dashed), training-line metrics raw (thin) and smoothed, evaluations with markers, and the
    --compare curve black dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    if x not in X_KEYS:
        raise KilnError(f"--x {x!r}: give --x steps or --x tokens")
    if smooth is not None and smooth < 0:
        raise KilnError(f"--smooth {smooth}: give an EMA span of 1 or more (0 or 1: none)")
    names = resolve_metrics(metrics, histories)
    ref = read_compare(compare, x, names) if compare is not None else None
    span = auto_smooth(histories) if smooth is None else max(smooth, 1)
    plotted = {h.path.resolve() for h in histories}
    colours = [f"C{i % 10}" for i in range(len(histories))]

    cols = 1 if len(names) == 1 else 2
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(6.0 * cols, 2.5 * rows + 0.5), dpi=100, layout="constrained")
    grid = fig.subplots(rows, cols, sharex=True, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[len(names):]:
        above = axes[axes.index(ax) - cols]
        above.xaxis.set_tick_params(labelbottom=True)
        above.set_xlabel("step" if x == "steps" else "tokens")
        fig.delaxes(ax)
    axes = axes[: len(names)]
    for ax, metric in zip(axes, names):
        train_metric = any(metric in seg.train_keys for h in histories for seg in h.segments)
        smoothed = train_metric and metric not in NOT_SMOOTHED and span > 1
        ax.set_title(metric + (f"  (EMA span {span})" if smoothed else ""), loc="left",
                     fontsize=10)
        for h, colour in zip(histories, colours):
            segs = [s for s in h.ancestors if s.path.resolve() not in plotted] + [h.own]
            xs: list[float] = []
            ys: list[float] = []
            starts = []
            for seg in segs:
                sx, sy = seg.points(metric, x)
                starts.append(len(xs))
                xs += sx
                ys += sy
            if not xs:
                continue
            smooth_ys = ema(ys, span) if smoothed else ys
            bounds = [*starts, len(xs)]
            for k, seg in enumerate(segs):
                lo, hi = bounds[k], bounds[k + 1]
                if lo == hi:
                    continue
                own = seg is h.own
                if not own and hi < len(xs):
                    hi += 1  # reach the first point of what follows: one unbroken history
                style = dict(color=colour, ls="-" if own else "--")
                label = h.name if own else f"{h.name} ({ancestor_label(h, seg)})"
                if smoothed:
                    ax.plot(xs[lo:hi], ys[lo:hi], lw=0.6, alpha=0.3, **style)
                    ax.plot(xs[lo:hi], smooth_ys[lo:hi], lw=1.6, label=label, **style)
                else:
                    ax.plot(xs[lo:hi], ys[lo:hi], lw=1.4, label=label,
                            marker=None if train_metric else "o", ms=3, **style)
        if ref is not None and metric in ref[1]:
            rx, ry = ref[1][metric]
            ax.plot(rx, ry, color="black", ls="--", lw=1.2, label=ref[0])
        ax.grid(alpha=0.3)
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        elif metric in ("tokens_per_sec", "model_flops_per_sec"):
            ax.yaxis.set_major_formatter(EngFormatter())
    for ax in axes[-cols:]:
        ax.set_xlabel("step" if x == "steps" else "tokens")
    if x == "tokens":
        axes[0].xaxis.set_major_formatter(EngFormatter())
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = [label for h in histories for label in
             [h.name, *(f"{h.name} ({ancestor_label(h, s)})" for s in reversed(h.ancestors))]]
    labels = sorted(handles, key=lambda lb: order.index(lb) if lb in order else len(order))
    if labels:
        axes[0].legend([handles[lb] for lb in labels], labels, fontsize=8, loc="best")
    return fig


def output_path(out: str | Path | None, runs: list[str | Path]) -> Path:
    """--out, or RUN_DIR/plots/curves.png of the first run; the format is its extension."""
    if out is None:
        first = Path(runs[0])
        if first.name == "metrics.jsonl":
            first = first.parent
        return first / "plots" / "curves.png"
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise KilnError(f"--out {path}: the format is the extension; end it with "
                        f"{', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    return path


def save_figure(fig: Figure, out: Path) -> Path:
    """Write the figure (PNG, SVG or PDF by the extension; no date inside, so the same runs
    give the same file)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {} if out.suffix.lower() == ".png" else {"Date": None}
        if out.suffix.lower() == ".pdf":
            meta["CreationDate"] = meta.pop("Date")
        fig.savefig(out, metadata=meta)
    except OSError as e:
        raise KilnError(f"could not write {out} ({e.strerror or e}); give another --out") from None
    return out


def plot_runs(runs: list[str | Path], out: str | Path | None = None, *, x: str = "steps",
              metrics: str | list[str] | None = None, smooth: int | None = None,
              compare: str | Path | None = None, parents: bool = True) -> tuple[Path, Figure]:
    """Draw the curves of `runs` on one figure and write it to `out` (default:
    RUN_DIR/plots/curves.png of the first run). Returns the path and the Figure."""
    if not runs:
        raise KilnError("no run to plot; give one or more run directories")
    path = output_path(out, runs)
    fig = make_figure(load_histories(runs, parents=parents), x=x, metrics=metrics,
                      smooth=smooth, compare=compare)
    return save_figure(fig, path), fig


def panel_names(fig: Figure) -> list[str]:
    """The metric of each panel of a figure made by :func:`make_figure`."""
    return [ax.get_title(loc="left").split("  (")[0] for ax in fig.axes]


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Draw the loss, validation loss, LR, grad norm, throughput and downstream-task "
        "curves of one or more runs (RUN_DIR/metrics.jsonl) on one figure, one panel per "
        "metric. A run continued from another (init.from) is drawn after its parent's "
        "history up to the checkpoint it started from.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (trainer.run_dir), each drawn in its colour")
    parser.add_argument("--x", choices=sorted(X_KEYS), default="steps",
                        help="x axis: optimizer steps (default) or tokens seen")
    parser.add_argument("--metrics", default=None, metavar="A,B,...",
                        help="panels, comma-separated metric names of metrics.jsonl (a task's "
                        "name alone: its primary metric); default: loss, val_loss, lr, "
                        "grad_norm, tokens_per_sec and each task's primary metric, where "
                        "logged")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="figure file, .png, .svg or .pdf (default: "
                        "RUN_DIR/plots/curves.png of the first run)")
    parser.add_argument("--smooth", type=int, default=None, metavar="N",
                        help="EMA span of the training-line curves, drawn over the raw ones "
                        "(default: a fiftieth of the logged steps, at most 200; 1: none)")
    parser.add_argument("--compare", default=None, metavar="CSV",
                        help="a reference curve to draw black dashed: a CSV with a header, "
                        "a step (or tokens) column and metric columns such as loss")
    parser.add_argument("--no-parents", action="store_true",
                        help="draw each run alone, without the run it was continued from")


def run_plot(args: argparse.Namespace) -> int:
    path = output_path(args.out, args.runs)
    histories = load_histories(args.runs, parents=not args.no_parents)
    fig = make_figure(histories, x=args.x, metrics=args.metrics, smooth=args.smooth,
                      compare=args.compare)
    for h in histories:
        for note in h.notes:
            print(note)
    save_figure(fig, path)
    panels = panel_names(fig)
    print(f"wrote {path} ({len(panels)} panel{'s' * (len(panels) != 1)}: {', '.join(panels)})")
    return 0
