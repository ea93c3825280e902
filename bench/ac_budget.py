"""What activation_checkpointing=budget keeps: the bytes autograd holds for the backward pass
after one forward of a model whose blocks are compiled at each memory budget, against eager,
and the step time (forward + backward, after the compile).

    python bench/ac_budget.py [--d 64] [--layers 2] [--batch 4] [--seq 64] [--device cpu]

Counted through torch.autograd.graph.saved_tensors_hooks: every distinct tensor saved for the
backward pass (the compiled blocks' saved tensors, the embedding's and the head's), once.
"""

from __future__ import annotations

import argparse
import time

import torch

from kiln.config import ModelConfig
from kiln.model import Transformer
from kiln.parallel import apply_compile


def measure(cfg: ModelConfig, tokens: torch.Tensor, budget: float | None, steps: int = 3):
    torch.manual_seed(0)
    model = Transformer(cfg).to(tokens.device)
    if budget is not None:
        apply_compile(model, budget)
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens).float().sum().backward()  # (compiles)
    grad = model.blocks[0].mlp.up_proj.weight.grad.clone()
    t0 = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(tokens).float().sum().backward()
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    return sum(seen.values()), (time.perf_counter() - t0) / steps, grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    cfg = ModelConfig(d_model=a.d, n_layers=a.layers, n_heads=a.heads, vocab_size=a.vocab,
                      max_seq_len=a.seq)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen).to(a.device)
    print(f"d_model {a.d}, {a.layers} layers, {a.batch} x {a.seq} tokens on {a.device}")
    ref = None
    for budget in (None, 1.0, 0.5, 0.2, 0.0):
        kept, dt, grad = measure(cfg, tokens, budget)
        ref = grad if ref is None else ref
        name = "eager" if budget is None else f"budget {budget:g}"
        diff = ((grad - ref).abs().max() / ref.abs().max()).item()
        print(f"{name:>11}: {kept / 1e6:8.2f} MB kept for backward, {dt * 1e3:8.1f} ms/step, "
              f"gradient within {diff:.1e} (relative to its largest) of eager's")


if __name__ == "__main__":
    main()
