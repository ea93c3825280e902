"""kiln's model inside lm-evaluation-harness (``pip install -e '.[eval]'``).

Three ways in:

    kiln eval RUN_DIR --harness hellaswag,arc_easy [--include-path my_tasks/] [--limit N]
    python -m kiln.evals.harness --model kiln --model_args path=RUN_DIR --tasks ...
    lm_eval --model hf --model_args pretrained=EXPORT_DIR ...   # after `kiln export hf`

``python -m kiln.evals.harness`` is lm-eval's own command line with the model ``kiln``
registered first (lm-eval finds models by import, not by plugin). Model arguments: ``path``
(run directory, checkpoint or Hugging Face folder), ``tokenizer``, ``device``, ``dtype``
(bf16 / fp32), ``batch_tokens``, ``seq_len``.

Log-likelihoods go through :mod:`kiln.evals.score` (batched by length, the output layer only
at the continuation's positions); the pairs are tokenized by lm-eval's own rule (context and
continuation encoded together, then split). Generation is greedy with kiln's KV cache.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from kiln.errors import KilnError, quiet_loggers
from kiln.evals.run import load_model
from kiln.evals.score import loglikelihoods, make_request, model_forward


@register_model("kiln")
class KilnLM(TemplateLM):
    backend = "causal"

    def __init__(self, path: str, tokenizer: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_tokens: int = 16384, seq_len: int | None = None,
                 **_: Any):  # lm-eval also passes batch_size, max_batch_size: unused here
        super().__init__()
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's CLI passes cuda:0 unless told; its hf backend falls back
        loaded = load_model(path, tokenizer, device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self._device = self.model.embed.weight.device
        bf16 = dtype == "bf16" or (dtype is None and self._device.type == "cuda")
        self.autocast = torch.autocast(self._device.type, dtype=torch.bfloat16) if bf16 else None
        self.max_len = min(int(seq_len or loaded.seq_len), self.model.cfg.max_seq_len)
        print(f"kiln: {path}: context length {self.max_len} tokens (the model's max_seq_len "
              "unless model_args seq_len says less)", file=sys.stderr)
        self.batch_tokens = max(int(batch_tokens), self.max_len)
        if loaded.eos is None:
            raise KilnError(f"{path}: no EOS token known (set data.eos_token_id in the run's "
                            "config); lm-eval needs one to score texts from their start")
        self._eot = loaded.eos

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int], **_) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        reqs = [make_request(i, 0, ctx, cont, self.max_len) for i, (ctx, cont) in
                enumerate(pairs)]
        ll, greedy = loglikelihoods(model_forward(self.model, self.autocast), reqs,
                                    vocab=self.model.cfg.vocab_size, device=self._device,
                                    batch_tokens=self.batch_tokens, greedy=True)
        return [(float(v), bool(g)) for v, g in zip(ll, greedy)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_
                              ) -> list[tuple[float, bool]]:
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole texts, scored in disjoint windows of the model's length (lm-eval's rule)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_len, 1)):
                pairs.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._score(pairs)):
            totals[i] += ll
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until one of the request's stop strings (or max_gen_toks)."""
        import contextlib

        from kiln.generate import generate

        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or [self.tok_decode([self._eot])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-max(1, self.max_len - budget):] or [self._eot]
            with self.autocast if self.autocast is not None else contextlib.nullcontext():
                new = generate(self.model, ids, budget, greedy=True, eos_token_id=self._eot)
            text = self.tok_decode([t for t in new if t != self._eot])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def run_harness(target: str, tasks: list[str], *, limit: int | None, include_path: str | None,
                tokenizer: str | None, device: str | None, dtype: str | None,
                batch_tokens: int, seq_len: int | None = None) -> dict[str, Any]:
    """lm-eval's simple_evaluate on kiln's model; returns lm-eval's results dictionary."""
    import lm_eval

    manager = task_manager(tasks, include_path)
    model = KilnLM(target, tokenizer=tokenizer, device=device, dtype=dtype,
                   batch_tokens=batch_tokens, seq_len=seq_len)
    return lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager)


_managers: dict[str | None, Any] = {}


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager, once every name in `tasks` is known to it (else one line, before
    any model is loaded; lm-eval's own log lines about the lookup are kept quiet)."""
    from lm_eval.tasks import TaskManager

    with quiet_loggers("lm-eval", "lm_eval"):
        if include_path not in _managers:  # indexing every task takes seconds: once
            _managers[include_path] = (TaskManager(include_path=include_path) if include_path
                                       else TaskManager())
        manager = _managers[include_path]
        unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise KilnError(f"lm-eval knows no task {', '.join(unknown)}; check the name (lm-eval "
                        "--tasks list) or --include-path")
    return manager


def main() -> None:
    """``python -m kiln.evals.harness``: lm-eval's command line with ``--model kiln``; a
    refusal of kiln's (a checkpoint without a tokenizer, say) is one line, exit 2."""
    from lm_eval.__main__ import cli_evaluate

    try:
        sys.exit(cli_evaluate())
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
