"""What a run will do, before it does it: the numbers `kiln train --dry-run` prints."""

from __future__ import annotations

from kiln.config import Config, run_numbers
from kiln.model import flops_per_token
from kiln.schedule import LRSchedule


def plan_lines(cfg: Config, world_size: int = 1, plan=None) -> tuple[list[str], list[str]]:
    """(lines describing the run, loud warnings); `plan` is a kiln.start.StartPlan."""
    n = run_numbers(cfg, world_size)
    if plan is not None:
        n.total_steps = plan.total_steps
        if cfg.trainer.hard_stop is None:
            n.stop_step = plan.total_steps
    m, d, t = cfg.model, cfg.data, cfg.trainer
    lines, warnings = [], []
    total_p = m.num_params()
    lines.append(f"parameters            {total_p:,} ({m.num_params(False):,} without embeddings)")
    lines.append(f"vocabulary            {m.vocab_size:,} (embedding padded to "
                 f"{m.padded_vocab_size:,})")
    lines.append(f"tokens per step       {n.tokens_per_step:,} "
                 f"({t.global_batch_size} x {d.seq_len})")
    lines.append(f"micro-batches/step    {n.micro_batches_per_step} of {t.micro_batch_size} "
                 f"instances (x {world_size} rank{'s' if world_size > 1 else ''})")
    lines.append(f"steps for duration    {n.total_steps:,} ({t.max_duration})")
    start = plan.step if plan is not None else 0
    if start:
        lines.append(f"steps this run        {n.stop_step - start:,} ({start:,} -> "
                     f"{n.stop_step:,})")
    lines.append(f"tokens this run       {(n.stop_step - start) * n.tokens_per_step:,}")
    if n.stop_step < n.total_steps:
        lines.append(f"hard stop             step {n.stop_step:,} (schedule still planned to "
                     f"{n.total_steps:,})")
    if plan is None:
        sched = LRSchedule.build(cfg.schedule, cfg.optim.lr, n.total_steps, n.warmup_steps)
    else:
        sched = plan.schedule
    lines.append(f"warmup ends           step {max(sched.warmup_end, 0):,}")
    lines.append(f"training FLOPs/token  {flops_per_token(m, d.seq_len):.3g}")
    keys = sched.key_steps(start or None)
    keys = [s for s in keys if s >= start] or keys
    lines.append("lr at steps           " + ", ".join(f"{s:,}: {sched.lr(s):.3g}" for s in keys))
    stride = d.stride or d.seq_len
    if stride < d.seq_len:
        warnings.append(
            f"WARNING: data.stride={stride} < data.seq_len={d.seq_len}: windows OVERLAP, every "
            f"token is seen ~{d.seq_len / stride:.0f} times per epoch (overfitting risk); "
            "remove data.stride for non-overlapping windows"
        )
    return lines, warnings


MANY_EPOCHS = 4
"""A run that goes over its training data more often than this is warned about."""


def data_lines(cfg: Config, train_windows: int, val_windows: int | None,
               total_tokens: int, n_files: int, plan=None) -> tuple[list[str], list[str]]:
    """(lines, loud warnings) about the data; `plan` (a StartPlan) brings the tokens already
    seen, so a resume after a batch change counts the earlier steps at their own batch."""
    n = run_numbers(cfg)
    total, stop = n.total_steps, n.stop_step
    done_steps, done_tokens = 0, 0
    if plan is not None:
        total = plan.total_steps
        stop = total if cfg.trainer.hard_stop is None else min(stop, total)
        done_steps, done_tokens = plan.step, plan.tokens_seen
    per_epoch = train_windows * cfg.data.seq_len
    tokens = done_tokens + max(stop - done_steps, 0) * n.tokens_per_step
    epochs = tokens / max(per_epoch, 1)
    out = [
        f"train data            {n_files} file(s), {total_tokens:,} tokens, {train_windows:,} "
        f"windows of {cfg.data.seq_len + 1}",
        f"epochs for the run    {epochs:.2f}",
    ]
    if val_windows is not None:
        out.append(f"validation windows    {val_windows:,}")
    warnings = []
    if epochs > MANY_EPOCHS:
        warnings.append(f"WARNING: this run goes over its training data ~{epochs:,.0f} times "
                        f"({tokens:,} tokens from {per_epoch:,} per epoch): expect "
                        "memorisation; add data or shorten trainer.max_duration")
    return out, warnings
