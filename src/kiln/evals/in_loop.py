"""Evaluation inside the training loop: the validation loss (trainer.eval_interval) and the
downstream tasks of eval.tasks (eval.interval), scored on the current weights. Every rank
evaluates its share and the numbers are combined, so they are the same on every rank and at
every world size; each result goes to the callbacks (metrics.jsonl, console, trackers) and
the tasks also to RUN_DIR/eval/stepN.json.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kiln.data.loader import eval_indices
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.trainer import Trainer


class InLoopEval:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        self.val_interval = cfg.trainer.eval_interval
        self.task_interval = cfg.eval.interval or cfg.trainer.eval_interval
        self.tasks, self.tokenizer = self._load_tasks()  # refused before any step

    def _load_tasks(self) -> tuple[list, object]:
        """The tasks of eval.tasks and the tokenizer to score them with, refused in one line
        when a name or file is wrong or the run has no tokenizer."""
        e, path = self.trainer.cfg.eval, self.trainer.tokenizer_path
        if not e.tasks:
            return [], None
        from kiln.data.tokenizers import load_tokenizer
        from kiln.evals.tasks import load_task

        if path is None:
            raise KilnError("eval.tasks needs the run's tokenizer, and the data has none "
                            "beside it; set data.tokenizer to its tokenizer.json")
        try:
            tasks = [load_task(name, limit=e.limit) for name in e.tasks]
        except KilnError as err:
            raise KilnError(f"eval.tasks: {err}") from None
        return tasks, load_tokenizer(path)

    def after_step(self, step: int) -> None:
        """The evaluations due at `step`."""
        if self.val_interval and step % self.val_interval == 0:
            self.log_validation()
        if self.task_interval and step % self.task_interval == 0:
            self.log_tasks()

    def at_end(self, step: int) -> None:
        """The last evaluations of a run, unless they just ran at its last step."""
        if self.trainer.val_data is not None and not (
                self.val_interval and step % self.val_interval == 0):
            self.log_validation()
        if self.tasks and not (self.task_interval and step % self.task_interval == 0):
            self.log_tasks()

    # -- validation loss ----------------------------------------------------------------------

    @torch.no_grad()
    def validation(self) -> dict[str, float] | None:
        t = self.trainer
        if t.val_data is None or len(t.val_data) == 0:
            return None
        t.model.eval()
        micro = t.cfg.trainer.micro_batch_size
        idx = eval_indices(t.val_data, t.cfg.trainer.eval_batches * micro)
        # each rank evaluates its share of the windows (every rank runs the same number of
        # forward passes, which FSDP needs); the sums are combined across ranks
        world, rank = t.dist.dp_size, t.dist.dp_rank  # (a tensor-parallel group: one share)
        per_rank = math.ceil(len(idx) / world)
        mine = idx[rank * per_rank : (rank + 1) * per_rank]
        sums = torch.zeros(2, dtype=torch.float64, device=t.device)
        for i in range(0, per_rank, micro):
            chunk = mine[i : i + micro]
            real = len(chunk)
            if real < micro:  # pad with window 0 so every rank does the same work
                chunk = np.concatenate([chunk, np.zeros(micro - real, dtype=np.int64)])
            mb = t.val_data.batch(chunk).to(t.device)
            with t.autocast:
                logits = t.model(mb[:, :-1], **t.document_kwargs(mb[:, :-1]))
            ce = F.cross_entropy(logits.float().transpose(1, 2), mb[:, 1:], reduction="none")
            sums[0] += ce[:real].mean(dim=1).sum().double()
            sums[1] += real
        if t.dist.enabled:
            dist.all_reduce(sums)
        loss = (sums[0] / sums[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def log_validation(self) -> None:
        t = self.trainer
        t.watch.check_finite(t.step)  # never report (or save) from non-finite weights
        metrics = self.validation()
        if metrics is not None:
            t.emit("on_eval", {"step": t.step, "tokens": t.tokens_seen, **metrics})

    # -- downstream tasks ---------------------------------------------------------------------

    @torch.no_grad()
    def task_results(self) -> dict | None:
        """eval.tasks scored on the current weights, every rank taking its share of the
        batches."""
        if not self.tasks:
            return None
        from kiln.evals.score import evaluate_tasks, model_forward

        t = self.trainer
        t.model.eval()
        return evaluate_tasks(
            model_forward(t.model, t.autocast), self.tasks, self.tokenizer,
            max_len=t.cfg.model.max_seq_len, vocab=t.cfg.model.vocab_size, device=t.device,
            batch_tokens=t.cfg.eval.batch_tokens, rank=t.dist.dp_rank, world=t.dist.dp_size)

    def log_tasks(self) -> None:
        results = self.task_results()
        if results is None:
            return
        t = self.trainer
        record: dict = {"step": t.step, "tokens": t.tokens_seen}
        for name, r in results.items():
            record.update({f"{name}/{m}": v["value"] for m, v in r["metrics"].items()})
        t.emit("on_eval", record)
        if t.dist.is_main:
            from kiln.evals.run import write_results

            write_results(t.run_dir / "eval" / f"step{t.step}.json",
                          {"step": t.step, "target": str(t.run_dir), "in_loop": True,
                           "limit": t.cfg.eval.limit, "seed": 1234, "dtype": t.precision,
                           "tasks": results})
