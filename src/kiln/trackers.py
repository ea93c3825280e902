"""Experiment trackers as callbacks: TensorBoard event files and Weights & Biases.

Both are optional (`pip install -e '.[track]'`) and run on rank 0 only. ``build_trackers``
returns the ones the config turns on; a missing package stops the run before its first step
with a one-line error naming the extra. RUN_DIR/metrics.jsonl is written either way.
"""

from __future__ import annotations

import re
import secrets
import string
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.callbacks import Callback
from kiln.errors import KilnError, one_line, warn
from kiln.files import write_atomic

if TYPE_CHECKING:
    from kiln.config import Config

_FLUSH_SECS = 5  # TensorBoard: at most this long between a logged point and the disk


def _values(metrics: dict) -> dict[str, float]:
    """Every numeric value of a metrics record except its step (bools are not numbers here)."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, Real) and not isinstance(v, bool)}


def _missing(option: str, package: str) -> KilnError:
    return KilnError(f"log.{option} needs the {package} package: pip install -e '.[track]'")


class TensorBoardCallback(Callback):
    """Scalars to RUN_DIR/tb at global_step = the training step (`tensorboard --logdir
    RUN_DIR/tb`), and the run's config as text once per start.

    A resumed run hides the points that an earlier attempt logged after the checkpoint it
    resumes from (SummaryWriter's purge_step; TensorBoard also drops a run's points from a
    step logged again), so the curves show the steps that led to the current weights, as
    metrics.jsonl does. Data reaches the disk at each evaluation, checkpoint, the end of the
    run and a preemption, and at least every few seconds between.
    """

    def __init__(self, run_dir: Path):
        try:
            import tensorboard  # noqa: F401  (torch's writer needs it; say so up front)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(run_dir) / "tb"
        self._w = None

    def on_fit_start(self, trainer) -> None:
        # points at steps after the one this run starts from belong to an abandoned attempt
        self._w = self._writer_class(log_dir=str(self.log_dir), purge_step=trainer.step + 1,
                                     flush_secs=_FLUSH_SECS)
        self._w.add_text("config", "```yaml\n" + trainer.saved_config_yaml() + "```",
                         global_step=trainer.step)
        self._flush()

    def _scalars(self, metrics: dict) -> None:
        if self._w is None:
            return
        step = int(metrics["step"])
        for key, value in _values(metrics).items():
            self._w.add_scalar(key, value, global_step=step)

    def _flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def on_log(self, trainer, metrics: dict) -> None:
        self._scalars(metrics)  # the writer's own thread flushes every few seconds

    def on_eval(self, trainer, metrics: dict) -> None:
        self._scalars(metrics)
        self._flush()

    def on_checkpoint(self, trainer, path: Path) -> None:
        self._flush()

    def on_fit_end(self, trainer, metrics: dict) -> None:
        if self._w is not None:
            self._w.close()  # flushes
            self._w = None

    def on_preempt(self, trainer, result: dict) -> None:
        self.on_fit_end(trainer, result)


_ID_CHARS = string.ascii_lowercase + string.digits
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _reinit_arg(wandb) -> object:
    """A W&B run of its own beside any the user started ("create_new", wandb >= 0.19.10);
    older versions: finish a previous run first (reinit=True)."""
    try:
        version = tuple(int(p) for p in wandb.__version__.split(".")[:3])
    except ValueError:
        return "create_new"
    return "create_new" if version >= (0, 19, 10) else True


class WandbCallback(Callback):
    """Weights & Biases: the config, every numeric metric against ``trainer/step``.

    The run id is made once and kept in RUN_DIR/wandb_id, so a resume continues the same W&B
    run. Records carry the training step as ``trainer/step`` (the x axis of every chart)
    rather than as W&B's own step, which must only grow: a run resumed from a checkpoint
    before the last logged step replays those steps instead of having them dropped.
    log.wandb_mode auto leaves the mode to W&B (the WANDB_MODE environment variable, else
    online); offline writes RUN_DIR/wandb/offline-run-* for `wandb sync` later.
    """

    STEP = "trainer/step"

    def __init__(self, run_dir: Path, cfg: Config):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self._wandb = wandb
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.run = None

    @property
    def id_path(self) -> Path:
        return self.run_dir / "wandb_id"

    def run_id(self) -> str:
        """The run's W&B id: RUN_DIR/wandb_id, made and saved on the first start."""
        if self.id_path.is_file():
            saved = self.id_path.read_text().strip()
            if _ID_RE.fullmatch(saved):
                return saved
            warn(f"{self.id_path} does not hold a W&B run id ({saved[:40]!r}); starting a new "
                 "W&B run")
        new = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
        self.id_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.id_path, new + "\n")
        return new

    def on_fit_start(self, trainer) -> None:
        log = self.cfg.log
        run_id = self.run_id()
        try:
            self.run = self._wandb.init(
                project=log.wandb_project or "kiln", dir=str(self.run_dir), id=run_id,
                resume="allow", name=self.run_dir.name, config=self.cfg.to_dict(),
                mode=None if log.wandb_mode == "auto" else log.wandb_mode,
                reinit=_reinit_arg(self._wandb))
            self.run.define_metric(self.STEP)
            self.run.define_metric("*", step_metric=self.STEP)
        except Exception as e:  # no API key, no network, a bad project name, ...
            raise KilnError(f"log.wandb: W&B could not start run {run_id} "
                            f"({one_line(e)[:200]}); run `wandb login`, or set "
                            "log.wandb_mode: offline (upload later with `wandb sync`), or "
                            "turn log.wandb off") from None

    def _log(self, metrics: dict) -> None:
        if self.run is None:
            return
        self.run.log({self.STEP: int(metrics["step"]), **_values(metrics)})

    def on_log(self, trainer, metrics: dict) -> None:
        self._log(metrics)

    def on_eval(self, trainer, metrics: dict) -> None:
        self._log(metrics)

    def on_fit_end(self, trainer, metrics: dict) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish()

    def on_preempt(self, trainer, result: dict) -> None:
        if self.run is not None:
            self.run.mark_preempting()
        self.on_fit_end(trainer, result)


def build_trackers(cfg: Config, run_dir: Path) -> list[Callback]:
    """The trackers that cfg.log turns on (rank 0 only), in a fixed order: TensorBoard, W&B.
    A missing package raises a one-line KilnError naming the `track` extra."""
    trackers: list[Callback] = []
    if cfg.log.tensorboard:
        trackers.append(TensorBoardCallback(run_dir))
    if cfg.log.wandb:
        trackers.append(WandbCallback(run_dir, cfg))
    return trackers
