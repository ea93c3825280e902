"""Autoregressive sampling from a :class:`kiln.model.Transformer`, with an optional KV cache.

The cache is preallocated (one k and one v tensor per layer, [B, kv_heads, max_len, head_dim])
so decoding never reallocates; the model writes each step's keys/values into its layer's slice
and advances ``cache.length``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.model import Transformer


class KVCache:
    """Per-layer key/value buffers for ``batch_size`` sequences of up to ``max_len`` tokens."""

    def __init__(self, n_layers: int, batch_size: int, kv_heads: int, max_len: int,
                 head_dim: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0
        """Tokens already in the cache; the next forward's tokens start at this position."""

    @classmethod
    def for_model(cls, model: Transformer, batch_size: int, max_len: int | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None
                  ) -> KVCache:
        """A cache shaped for ``model``; device and dtype default to its embedding's."""
        cfg, w = model.cfg, model.embed.weight
        return cls(cfg.n_layers, batch_size, cfg.kv_heads, max_len or cfg.max_seq_len,
                   cfg.head_dim, device or w.device, dtype or w.dtype)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return self.k[i], self.v[i]

    def check(self, batch_size: int, end: int) -> None:
        """Raise if a forward of this batch size reaching position ``end`` does not fit."""
        if batch_size != self.batch_size:
            raise KilnError(f"batch of {batch_size} does not match the KV cache's batch size "
                            f"{self.batch_size}; build the cache for this batch")
        if end > self.max_len:
            raise KilnError(f"KV cache holds {self.max_len} positions but {end} are needed; "
                            "build it with a larger max_len")

    def reset(self) -> None:
        self.length = 0  # stale entries beyond length are never read


# --------------------------------------------------------------------------------------------
# Sampling


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   max_new_tokens: int = 0, num_samples: int = 1) -> None:
    """Refuse sampling settings that cannot sample, in one line (before any model loads)."""
    import math

    if not math.isfinite(temperature) or temperature < 0:
        raise KilnError(f"temperature={temperature} must be a number >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise KilnError(f"top_k={top_k} must be >= 1 (or None to disable)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise KilnError(f"top_p={top_p} must be in (0, 1] (or None to disable)")
    if max_new_tokens < 0:
        raise KilnError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if num_samples < 1:
        raise KilnError(f"num_samples={num_samples} must be >= 1")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None
                  ) -> Tensor:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf (last dim).

    Top-p keeps the smallest set of most likely tokens whose probability mass is >= p: a token
    is kept when the mass of the tokens ranked above it is still < p, so the top token always
    survives.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.float().softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_token(logits: Tensor, greedy: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> int:
    """Pick one token from logits [vocab] (already cut to the real vocabulary)."""
    if greedy:
        return int(logits.argmax())
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)  # a CPU generator can drive sampling for a GPU model
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt: list[int] | Tensor, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             greedy: bool = False, eos_token_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens and return only the new ones.

    Stops after ``eos_token_id`` (which is included) and when prompt + new tokens reach the
    model's max_seq_len. ``temperature=0`` means greedy. Only ids < vocab_size can be drawn
    (the padding rows of the embedding are never sampled). ``use_cache=False`` re-runs the whole
    sequence every step; under greedy decoding both give the same tokens.
    """
    cfg = model.cfg
    ids = [int(t) for t in (prompt.reshape(-1).tolist() if isinstance(prompt, Tensor) else prompt)]
    if not ids:
        raise KilnError("generate needs a prompt of at least one token")
    if len(ids) > cfg.max_seq_len:
        raise KilnError(f"prompt of {len(ids)} tokens is longer than model.max_seq_len="
                        f"{cfg.max_seq_len}; shorten the prompt")
    check_sampling(temperature, top_k, top_p)
    greedy = greedy or temperature == 0
    budget = min(max_new_tokens, cfg.max_seq_len - len(ids))
    if budget <= 0:
        return []

    device = model.embed.weight.device
    seq = torch.tensor([ids], dtype=torch.long, device=device)
    cache = KVCache.for_model(model, 1, len(ids) + budget) if use_cache else None
    new: list[int] = []
    step_input = seq
    for _ in range(budget):
        if cache is not None:
            logits = model(step_input, cache)[0, -1]
        else:
            logits = model(seq)[0, -1]
        tok = _next_token(logits[: cfg.vocab_size], greedy, temperature, top_k, top_p, generator)
        new.append(tok)
        if eos_token_id is not None and tok == eos_token_id:
            break
        step_input = torch.tensor([[tok]], dtype=torch.long, device=device)
        if cache is None:
            seq = torch.cat([seq, step_input], dim=1)
    return new
