"""How a run starts: new, resumed, or started from another run's checkpoint.

:func:`plan_start` decides everything that depends on earlier checkpoints (which one, the
step counter, the LR schedule, what is carried over) from their small metadata files alone,
so ``--dry-run`` and ``kiln schedule`` describe exactly what ``kiln train`` will do. The
trainer then loads the tensors the plan names.

* **resume**: RUN_DIR already has checkpoints. Everything is restored; the saved schedule is
  kept. A changed ``max_duration`` is refused unless ``--extend-to`` asks for a new tail.
* **start from** (``init.from``): a new run initialised from a checkpoint with explicit
  choices for the optimizer, the counters and the data position (see InitConfig).
* **new**: a fresh run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln import checkpoint as ckpt
from kiln.config import Config, Duration, config_from_dict, is_number, run_numbers
from kiln.data.remote import data_names, local_copy
from kiln.data.tokens import fingerprint_change
from kiln.errors import KilnError
from kiln.schedule import LRSchedule


@dataclass
class StartPlan:
    kind: str  # "new" | "resume" | "init"
    schedule: LRSchedule
    total_steps: int
    step: int = 0
    tokens_seen: int = 0
    source: Path | None = None
    """The checkpoint to load (resume) or to start from (init)."""
    source_format: str = "kiln"
    """"kiln" (a kiln checkpoint) or "hf" (a Hugging Face model directory)."""
    load_optimizer: bool = False
    load_data_position: bool = False
    data_state: dict | None = None
    stability: dict | None = None
    """The stability watch's history saved with the checkpoint (resume only)."""
    notes: list[str] = field(default_factory=list)
    """Plain-words description of the choices, for the console and --dry-run."""


def parse_extend_to(text: str) -> Duration:
    """'1000', '1000steps', '2e9tokens' or '{value: 2e9, unit: tokens}' -> Duration."""
    import yaml

    raw = text.strip().replace("_", "")
    for unit in ("tokens", "steps"):
        if raw.endswith(unit) and is_number(raw[: -len(unit)]):
            return Duration(float(raw[: -len(unit)]), unit)
    if is_number(raw):
        return Duration(float(raw), "steps")
    try:
        value = yaml.safe_load(text)
        if isinstance(value, dict):
            return Duration(float(value["value"]), value.get("unit", "steps"))
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        pass
    raise KilnError(f"--extend-to={text!r} is not a duration; write --extend-to=5000 (steps), "
                    "--extend-to=2e9tokens or --extend-to='{value: 2e9, unit: tokens}'")


def _steps(d: Duration, tokens_per_step: int) -> int:
    return int(d.value) if d.unit == "steps" else math.ceil(d.value / tokens_per_step)


def _data_files(data) -> list[str]:
    """The training files of a DataConfig, in the order the run reads them (a mixture's
    sources one after another)."""
    groups = [s.paths for s in data.sources] if data.sources else [data.paths]
    out = []
    for paths in groups:
        try:
            out += data_names(paths)  # local files resolved, URLs as given
        except KilnError:
            out += list(paths)
    return out


def check_model_shape(cfg: Config, source: Path, verify: str = "full") -> None:
    """Refuse a checkpoint whose tensors do not fit cfg.model, naming the first mismatch."""
    from kiln.model import Transformer

    with torch.device("meta"):
        expected = Transformer(cfg.model).state_dict()
    ckpt.check_shapes(ckpt.tensor_shapes(source, verify), expected, ckpt.weights_path(source),
                      tied=cfg.model.tie_embeddings)


def plan_start(cfg: Config, extend_to: Duration | None = None,
               extend_shape: str = "cosine", resume_from: str | None = None) -> StartPlan:
    """Decide how this run starts (see the module docstring). Reads metadata only.
    `resume_from` (stepN) resumes from that checkpoint of the run instead of the latest."""
    plan = _plan_start(cfg, extend_to, extend_shape, resume_from)
    hard = cfg.trainer.hard_stop
    if hard is not None:
        at = run_numbers(cfg, total_steps=plan.total_steps).stop_step
        if at < plan.step:
            raise KilnError(f"trainer.hard_stop={hard} (step {at:,}) is before the current step "
                            f"{plan.step:,} of {cfg.trainer.run_dir}; give a later hard stop, or "
                            "--trainer.hard_stop=null to train to the end")
        if at == plan.step and plan.step < plan.total_steps:
            plan.notes.append(f"hard stop: trainer.hard_stop={hard} is the current step "
                              f"{plan.step:,}: nothing to train (--trainer.hard_stop=null trains "
                              "to the end)")
    return plan


def _plan_start(cfg: Config, extend_to: Duration | None, extend_shape: str,
                resume_from: str | None) -> StartPlan:
    n = run_numbers(cfg)
    latest = ckpt.resume_point(cfg.trainer.run_dir, resume_from,
                               cfg.checkpoint.verify_on_load)
    if latest is not None:
        plan = _plan_resume(cfg, latest, extend_to, extend_shape)
        if resume_from is not None:
            plan.notes.append(f"--resume-from={resume_from}: checkpoints after {latest.name} "
                              "are kept aside, not replaced (stepN-aside-K, or stepN-damaged-K "
                              "when they fail verification)")
        return plan
    if extend_to is not None:
        raise KilnError(f"--extend-to needs a run to extend, but {cfg.trainer.run_dir!r} has no "
                        "checkpoint; train it first or point trainer.run_dir at the run")
    if cfg.init.from_ and cfg.init.from_.startswith("hf:"):
        return _plan_init_hf(cfg)
    if cfg.init.from_:
        return _plan_init(cfg)
    sched = LRSchedule.build(cfg.schedule, cfg.optim.lr, n.total_steps, n.warmup_steps)
    return StartPlan("new", sched, n.total_steps, notes=["start: a new run from random weights"])


def _plan_resume(cfg: Config, latest: Path, extend_to: Duration | None,
                 extend_shape: str) -> StartPlan:
    verify = cfg.checkpoint.verify_on_load
    trainer, saved_raw = ckpt.read_meta(latest, verify)
    saved = config_from_dict(saved_raw)
    check_model_shape(cfg, latest, verify)
    step, tokens = int(trainer["step"]), int(trainer["tokens_seen"])
    schedule = LRSchedule.from_state(trainer["schedule"])
    total = int(trainer["total_steps"])
    notes = [f"start: resume {cfg.trainer.run_dir} from {latest.name} (step {step:,}, "
             f"{tokens:,} tokens seen); weights, optimizer, schedule, data position and RNG "
             "restored"]
    if cfg.init.from_:
        notes.append(f"init.from={cfg.init.from_} is not applied again: this run already exists")

    saved_files = trainer.get("data_files", _data_files(saved.data))
    if _data_files(cfg.data) != saved_files:
        raise KilnError(
            f"data.paths differ from those of the run in {cfg.trainer.run_dir}; to switch data, "
            f"start a new run with --init.from={latest} (its data starts fresh)"
        )
    saved_print = trainer.get("data_fingerprint")
    if isinstance(saved_print, list) and all(isinstance(x, dict) for x in saved_print):
        files = [local_copy(f, cfg.data.cache_dir) for f in _data_files(cfg.data)]  # URL: cached
        if not all(f.is_file() for f in files):
            files = None  # the loader names what is missing
        change = fingerprint_change(saved_print, files) if files else None
        if change and not cfg.data.allow_changed:
            raise KilnError(
                f"the training data changed since {latest.name} was saved ({change}), so its "
                f"data position would point into other data; to go on with the data as it is, "
                f"from its start: kiln train {cfg.trainer.run_dir} --trainer.run_dir=NEW_DIR "
                f"--init.from={latest} --init.load_data_position=false; or, if you know the "
                "saved position is still right, --data.allow_changed=true")
        if change:
            notes.append(f"data: {change}; resuming at the saved position anyway "
                         "(data.allow_changed=true)")
    if cfg.data.seq_len != saved.data.seq_len:
        raise KilnError(f"data.seq_len changed from {saved.data.seq_len} to {cfg.data.seq_len}; "
                        "a run keeps its sequence length (start a new run with init.from)")
    tps = cfg.trainer.global_batch_size * cfg.data.seq_len
    if cfg.trainer.global_batch_size != saved.trainer.global_batch_size:
        notes.append(
            f"global batch changed {saved.trainer.global_batch_size} -> "
            f"{cfg.trainer.global_batch_size}: the data position is kept at "
            f"{trainer['data']['tokens_in_epoch']:,} tokens into epoch {trainer['data']['epoch']}"
            f" (no window repeated or skipped); the LR schedule keeps its step axis"
        )
    if cfg.trainer.micro_batch_size != saved.trainer.micro_batch_size:
        notes.append(f"micro-batch changed {saved.trainer.micro_batch_size} -> "
                     f"{cfg.trainer.micro_batch_size}: only gradient accumulation changes")

    if cfg.schedule != saved.schedule:
        changed = ", ".join(f"schedule.{k}" for k in vars(cfg.schedule)
                            if getattr(cfg.schedule, k) != getattr(saved.schedule, k))
        notes.append(f"schedule: changed since the checkpoint ({changed}), but a resume keeps "
                     "the saved schedule: --extend-to=END lays a new tail, or start a new run "
                     "with --init.from and --schedule.restart=true")
    if cfg.optim.lr != saved.optim.lr and saved.optim.lr > 0:
        factor = cfg.optim.lr / saved.optim.lr
        schedule = schedule.scaled_after(step, factor)
        notes.append(f"schedule: optim.lr changed {saved.optim.lr:.3g} -> {cfg.optim.lr:.3g}: "
                     f"every LR after step {step:,} is the saved schedule's times {factor:.3g} "
                     f"(next step {schedule.lr(step + 1):.3g})")
    if extend_to is not None:
        new_end = _steps(extend_to, tps)
        if new_end <= step:
            raise KilnError(f"--extend-to={extend_to} (step {new_end:,}) is not after the current "
                            f"step {step:,}; give a later end")
        if new_end != schedule.end:
            peak = cfg.optim.lr
            schedule = schedule.relay(step, end=new_end, peak=peak,
                                      final=peak * cfg.schedule.final_lr_fraction,
                                      cfg=cfg.schedule, shape=extend_shape)
            notes.append(f"schedule: extended from step {total:,} to {new_end:,}: {extend_shape} "
                         f"from the current LR {schedule.lr(step):.3g} to "
                         f"{schedule.lr(new_end):.3g}")
        total = new_end
        cfg.trainer.max_duration = extend_to
    elif cfg.trainer.max_duration != saved.trainer.max_duration:
        raise KilnError(
            f"trainer.max_duration changed from {saved.trainer.max_duration} to "
            f"{cfg.trainer.max_duration} on resume; the saved LR schedule is kept unless you "
            f"ask to reshape it: kiln train {cfg.trainer.run_dir} --extend-to=NEW_END"
        )
    return StartPlan("resume", schedule, total, step=step, tokens_seen=tokens, source=latest,
                     load_optimizer=True, load_data_position=True, data_state=trainer["data"],
                     stability=trainer.get("stability"), notes=notes)


def _plan_init(cfg: Config) -> StartPlan:
    init = cfg.init
    verify = cfg.checkpoint.verify_on_load
    source = ckpt.resolve(init.from_)
    trainer, src_raw = ckpt.read_meta(source, verify)
    src = config_from_dict(src_raw)
    check_model_shape(cfg, source, verify)
    src_step, src_tokens = int(trainer["step"]), int(trainer["tokens_seen"])
    n = run_numbers(cfg)
    notes = [f"start: a new run from {source} (step {src_step:,} of its run)",
             "  weights: loaded"]
    notes.append("  optimizer: Adam moments and step counts loaded (init.load_optimizer=true)"
                 if init.load_optimizer else
                 "  optimizer: fresh, moments zero (init.load_optimizer=false)")

    data_state = None
    if init.load_data_position:
        if _data_files(cfg.data) != trainer.get(
                "data_files", _data_files(src.data)):
            raise KilnError(
                "init.load_data_position=true continues the source run's data order, but "
                "data.paths differ from the source's; set init.load_data_position=false to "
                "start the new data at its beginning"
            )
        if cfg.data.seq_len != src.data.seq_len:
            raise KilnError("init.load_data_position=true needs the source's data.seq_len "
                            f"({src.data.seq_len}); set init.load_data_position=false")
        data_state = trainer["data"]
        notes.append(f"  data: continues the source's order at {data_state['tokens_in_epoch']:,} "
                     f"tokens into epoch {data_state['epoch']} (init.load_data_position=true)")
    else:
        notes.append("  data: starts at the beginning of data.paths "
                     "(init.load_data_position=false)")

    src_sched = LRSchedule.from_state(trainer["schedule"])
    peak = cfg.optim.lr
    final = peak * cfg.schedule.final_lr_fraction
    # in kiln's own count (an imported OLMo run's trainer.json counts OLMo's T per row)
    src_tps = src.trainer.global_batch_size * src.data.seq_len
    batch_changed = src_tps != n.tokens_per_step
    if batch_changed:
        notes.append(f"  global batch: the source took {src.trainer.global_batch_size} x "
                     f"{src.data.seq_len} = {src_tps:,} tokens per step, this run takes "
                     f"{cfg.trainer.global_batch_size} x {cfg.data.seq_len} = "
                     f"{n.tokens_per_step:,}: what is left of the source's warmup is carried "
                     "over in tokens")
    if init.load_schedule_position:
        step, tokens = src_step, src_tokens
        notes.append(f"  counters: step and tokens continue from {step:,} / {tokens:,} "
                     "(init.load_schedule_position=true); trainer.max_duration is where the "
                     "counter ends")
        base = src_sched
    else:
        step, tokens = 0, 0
        notes.append("  counters: step and tokens start at 0 "
                     "(init.load_schedule_position=false)")
        base = src_sched.shifted(-src_step)
    if batch_changed and base.warmup_end > step:  # the same tokens of warmup, in new steps
        left = (base.warmup_end - step) * src_tps
        base = LRSchedule(base.segments, warmup_end=step + math.ceil(left / n.tokens_per_step))
    end = n.total_steps
    if end <= step:
        raise KilnError(
            f"trainer.max_duration ends at step {end:,}, not after the starting step {step:,} "
            "(init.load_schedule_position=true keeps the source's counter); set a later "
            "trainer.max_duration or init.load_schedule_position=false"
        )
    if (not src_sched.segments and src_step > 0 and init.load_schedule_position
            and not cfg.schedule.restart):
        raise KilnError(
            f"{source} holds no LR schedule to continue at step {src_step:,} (its source's "
            "scheduler has no kiln shape), so its LR there is unknown; choose one: "
            "--schedule.restart=true (a fresh warmup to optim.lr, then schedule.name, from step "
            f"{src_step:,}) or --init.load_schedule_position=false (counters from 0)")
    if not src_sched.segments:  # imported weights: no schedule to continue
        warm = min(n.warmup_steps, end - step)
        schedule = LRSchedule.build(cfg.schedule, peak, end - step, warm, start=step)
        notes.append(f"  schedule: the source has none (imported weights): warmup to "
                     f"{peak:.3g} over {warm:,} steps, {cfg.schedule.name} to {final:.3g} at "
                     f"step {end:,}")
    elif cfg.schedule.restart:
        warm = min(n.warmup_steps, end - step)
        fresh = LRSchedule.build(cfg.schedule, peak, end - step, warm, start=step)
        history = [seg for seg in base.segments if seg.takes_over < step]
        schedule = LRSchedule(history + fresh.segments, warmup_end=fresh.warmup_end)
        notes.append(f"  schedule: restarted (schedule.restart=true): warmup to {peak:.3g} "
                     f"over {warm:,} steps, {cfg.schedule.name} to {final:.3g} at step {end:,}")
    elif (init.load_schedule_position and not batch_changed
          and end == int(trainer.get("total_steps", base.end))
          and src.optim.lr == peak and src.schedule == cfg.schedule):
        # the source run goes on to the end it was planned for: its own curve, unchanged
        # (an imported OLMo schedule may end before the run does, then hold its last LR)
        schedule = base
        tail = (f"; it ends at step {base.end:,} and holds {base.lr(base.end):.3g} to step "
                f"{end:,}" if base.end < end else "")
        notes.append(f"  schedule: the source's schedule continues unchanged{tail}")
    else:
        schedule = base.relay(step, end=end, peak=peak, final=final, cfg=cfg.schedule)
        if base.warmup_end > step:
            left = (base.warmup_end - step) * n.tokens_per_step
            carried = (f"the remaining {base.warmup_end - step:,} warmup steps ({left:,} "
                       f"tokens) carried over (warmup ends at step {base.warmup_end:,}), then ")
        else:
            carried = ""
        notes.append(f"  schedule: continues from the source's LR {base.lr(step):.3g}: {carried}"
                     f"{cfg.schedule.name} to {final:.3g} at step {end:,} "
                     "(schedule.restart=true for a fresh warmup)")
    return StartPlan("init", schedule, end, step=step, tokens_seen=tokens, source=source,
                     load_optimizer=init.load_optimizer,
                     load_data_position=init.load_data_position, data_state=data_state,
                     notes=notes)


def _plan_init_hf(cfg: Config) -> StartPlan:
    """init.from=hf:DIR: Hugging Face weights, a fresh optimizer and schedule, counters at 0."""
    from kiln.interop.hf import hf_to_kiln_config, read_hf_config

    hf_dir = Path(cfg.init.from_[len("hf:"):])
    hf_model = hf_to_kiln_config(read_hf_config(hf_dir))
    with torch.device("meta"):
        from kiln.model import Transformer

        expected = {k: tuple(v.shape) for k, v in Transformer(hf_model).state_dict().items()}
        mine = Transformer(cfg.model).state_dict()
    ckpt.check_shapes(expected, mine, hf_dir, tied=cfg.model.tie_embeddings)
    if hf_model.tie_embeddings != cfg.model.tie_embeddings:
        raise KilnError(f"{hf_dir} has tie_word_embeddings={hf_model.tie_embeddings}; set "
                        f"model.tie_embeddings={str(hf_model.tie_embeddings).lower()}")
    n = run_numbers(cfg)
    schedule = LRSchedule.build(cfg.schedule, cfg.optim.lr, n.total_steps, n.warmup_steps)
    notes = [f"start: a new run from the Hugging Face model in {hf_dir}",
             "  weights: loaded (converted from Hugging Face names)",
             "  optimizer: fresh (a Hugging Face model carries no optimizer state)",
             "  data: starts at the beginning of data.paths",
             "  counters: step and tokens start at 0",
             f"  schedule: warmup over {n.warmup_steps:,} steps, {cfg.schedule.name} to step "
             f"{n.total_steps:,}"]
    return StartPlan("init", schedule, n.total_steps, source=hf_dir, source_format="hf",
                     notes=notes)
