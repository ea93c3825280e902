"""Scoring multiple-choice tasks by log-likelihood, the way OLMo's in-loop evaluator does.

For every choice of every instance the context and the continuation are tokenized apart
(no special tokens), joined, and cut from the left to the model's length:
``query = (context + continuation[:-1])[-max_len:]``. One forward pass scores many queries;
the output layer runs only at the continuation's positions, and the log-probabilities come
from fp32 log-softmax over the real vocabulary (the padding rows of the head are left out).
``ll`` is the sum of the natural-log probabilities of the continuation's tokens.

Metrics of a task (each a mean over instances, with the standard error of that mean):

- ``acc``: argmax of ``ll`` is the gold choice (ties go to the lowest index);
- ``len_norm`` (OLMES ``acc_per_char``): argmax of ``ll / len(continuation)`` in characters,
  leading space included;
- ``acc_per_token``: argmax of ``ll / tokens of the continuation``;
- ``bpb``: bits per UTF-8 byte of the gold continuation, ``-ll / bytes / ln 2``;
- ``ce_loss``: nats per character of the gold continuation;
- ``f1`` (MRPC): F1 of the predictions with choice 0 as the positive class.

The primary metric of each task is the one OLMo's task registry names (``Task.primary_metric``).
Tasks that score only the gold continuation (``bpb`` / ``ce_loss`` tasks) report those two.

Batches are made once for the whole request list, ordered by length, and rank ``r`` of ``W``
scores batches ``r, r + W, ...``: every batch is the same computation whatever the world size,
so several processes give the numbers of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from kiln.errors import KilnError
from kiln.evals.tasks import Task

LN2 = math.log(2)
ACCURACIES = ("acc", "len_norm", "acc_per_token")

Forward = Callable[[Tensor, Tensor], Tensor]
"""(tokens [B, T], flat positions [K]) -> logits [K, >= vocab] at those positions."""


@dataclass
class Request:
    instance: int
    choice: int
    query: list[int]  # context + continuation minus its last token, cut from the left
    cont: list[int]  # the continuation's tokens that are scored (the query's last targets)


def make_request(instance: int, choice: int, ctx: list[int], cont: list[int], max_len: int
                 ) -> Request:
    """``query = (ctx + cont[:-1])[-max_len:]``; a continuation longer than the query keeps
    its last tokens."""
    query = (ctx + cont[:-1])[-max_len:]
    return Request(instance, choice, query, cont[-len(query):] if len(cont) > len(query)
                   else cont)


def tokenize(task: Task, tokenizer, max_len: int) -> list[Request]:
    """The requests of every (instance, choice), tokenized with ``tokenizer`` (HF tokenizers)."""
    texts = sorted({s for inst in task.instances for s in (*inst.contexts, *inst.continuations)})
    ids = dict(zip(texts, (e.ids for e in tokenizer.encode_batch(texts,
                                                                  add_special_tokens=False))))
    out = []
    for i, inst in enumerate(task.instances):
        for c, (ctx, cont) in enumerate(zip(inst.contexts, inst.continuations)):
            cont_ids = ids[cont]
            if not cont_ids:
                raise KilnError(f"task {task.name}: instance {inst.id} choice {c} is empty "
                                "after tokenization; every choice needs some text")
            out.append(make_request(i, c, ids[ctx], cont_ids, max_len))
    return out


def batches(requests: Sequence[Request], batch_tokens: int, max_batch: int = 256
            ) -> list[list[int]]:
    """Request indices grouped into batches of at most ``batch_tokens`` (padded) tokens,
    longest first (padding stays small, and a batch too big shows up at once)."""
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].query), i))
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < max_batch and (len(out[-1]) + 1) * len(
                requests[out[-1][0]].query) <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def _score_batch(forward: Forward, reqs: list[Request], vocab: int, device: torch.device
                 ) -> list[tuple[float, bool]]:
    """(ll, greedy) of each request: greedy when every continuation token is the argmax."""
    T = len(reqs[0].query)
    tokens = torch.zeros(len(reqs), T, dtype=torch.long)
    pos, targets, owner = [], [], []
    for b, r in enumerate(reqs):
        tokens[b, :len(r.query)] = torch.tensor(r.query)
        start = len(r.query) - len(r.cont)
        pos.extend(range(b * T + start, b * T + len(r.query)))
        targets.extend(r.cont)
        owner.extend([b] * len(r.cont))
    logits = forward(tokens.to(device), torch.tensor(pos, device=device))
    # fp32 log-softmax (fp64 for an fp64 model), summed per request in fp64
    logp = torch.log_softmax(logits[:, :vocab].to(torch.promote_types(logits.dtype,
                                                                      torch.float32)), dim=-1)
    target_t = torch.tensor(targets, device=device)
    tok_lp = logp.gather(1, target_t[:, None]).squeeze(1)
    owner_t = torch.tensor(owner, device=device)
    sums = torch.zeros(len(reqs), dtype=torch.float64, device=device)
    sums.index_add_(0, owner_t, tok_lp.double())
    misses = torch.zeros(len(reqs), dtype=torch.long, device=device)
    misses.index_add_(0, owner_t, (logp.argmax(-1) != target_t).long())
    return list(zip(sums.tolist(), (misses == 0).tolist()))


def loglikelihoods(forward: Forward, requests: Sequence[Request], *, vocab: int,
                   device: torch.device, batch_tokens: int = 8192, rank: int = 0,
                   world: int = 1, greedy: bool = False,
                   on_batch: Callable[[int, int], None] | None = None
                   ) -> np.ndarray | tuple[np.ndarray, ...]:
    """``ll`` of every request (float64 array), all ranks taking part when ``world > 1``;
    with ``greedy`` also whether each continuation is what greedy decoding would produce."""
    groups = batches(requests, batch_tokens)
    mine: dict[int, tuple[float, bool]] = {}
    rounds = math.ceil(len(groups) / world) if groups else 0
    for k in range(rounds):
        g = k * world + rank
        # a rank without a batch this round repeats batch 0 (FSDP needs every rank in the
        # forward's collectives) and drops the result
        reqs = [requests[i] for i in groups[g if g < len(groups) else 0]]
        lls = _score_batch(forward, reqs, vocab, device)
        if g < len(groups):
            mine.update(zip(groups[g], lls))
        if on_batch is not None:
            on_batch(k + 1, rounds)
    if world > 1:  # (every process: a tensor-parallel group's ranks hold the same part)
        parts: list[dict[int, tuple[float, bool]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        for p in parts:
            mine.update(p or {})
    ll = np.array([mine[i][0] for i in range(len(requests))], dtype=np.float64)
    return (ll, np.array([mine[i][1] for i in range(len(requests))])) if greedy else ll


def _mean_stderr(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(((pred == 0) & (gold == 0)).sum())
    fp, fn = float(((pred == 0) & (gold != 0)).sum()), float(((pred != 0) & (gold == 0)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def task_metrics(task: Task, requests: Sequence[Request], ll: np.ndarray) -> dict:
    """``{"metrics": {name: (value, stderr)}, "primary": name, "instances": n}`` of a task."""
    per: list[list[tuple[float, int, int, int]]] = [[] for _ in task.instances]
    for r, v in zip(requests, ll):
        cont = task.instances[r.instance].continuations[r.choice]
        per[r.instance].append((v, len(r.cont), len(cont), len(cont.encode("utf-8"))))
    gold = np.array([inst.gold for inst in task.instances])
    bpb = np.array([-p[g][0] / (p[g][3] * LN2) for p, g in zip(per, gold)])
    ce = np.array([-p[g][0] / p[g][2] for p, g in zip(per, gold)])
    metrics: dict[str, tuple[float, float]] = {}
    if max(len(p) for p in per) > 1:
        for name, norm in (("acc", lambda t: 1), ("len_norm", lambda t: t[2]),
                           ("acc_per_token", lambda t: t[1])):
            pred = np.array([int(np.argmax([t[0] / norm(t) for t in p])) for p in per])
            metrics[name] = _mean_stderr((pred == gold).astype(np.float64))
            if name == "acc" and task.primary_metric == "f1":
                metrics["f1"] = (_f1(pred, gold), float("nan"))
    metrics["bpb"], metrics["ce_loss"] = _mean_stderr(bpb), _mean_stderr(ce)
    primary = task.primary_metric if task.primary_metric in metrics else next(iter(metrics))
    return {"primary": primary, "instances": len(task.instances),
            "metrics": {k: {"value": v, "stderr": s} for k, (v, s) in metrics.items()}}


def evaluate_tasks(forward: Forward, tasks: Sequence[Task], tokenizer, *, max_len: int,
                   vocab: int, device: torch.device, batch_tokens: int = 8192, rank: int = 0,
                   world: int = 1, progress: Callable[[str, int, int], None] | None = None
                   ) -> dict:
    """Task name -> :func:`task_metrics` (same on every rank). ``progress(task, done, total)``
    is called after each batch round."""
    results = {}
    for task in tasks:
        reqs = tokenize(task, tokenizer, max_len)
        ll = loglikelihoods(forward, reqs, vocab=vocab, device=device,
                            batch_tokens=max(batch_tokens, max_len), rank=rank, world=world,
                            on_batch=None if progress is None else
                            (lambda d, t, name=task.name: progress(name, d, t)))
        results[task.name] = task_metrics(task, reqs, ll)
    return results


def model_forward(model: torch.nn.Module, autocast=None) -> Forward:
    """A :data:`Forward` for a kiln Transformer (or its DDP / FSDP / compiled wrapper)."""
    import contextlib

    def forward(tokens: Tensor, at: Tensor) -> Tensor:
        with autocast if autocast is not None else contextlib.nullcontext():
            return model(tokens, logits_at=at)

    return forward
