"""Pictures of a run: the LR schedule (past and planned)."""

from __future__ import annotations

from pathlib import Path

from kiln.schedule import LRSchedule


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
