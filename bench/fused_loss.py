"""Plain vs fused output layer + cross entropy: time per forward+backward and peak RSS.

    python bench/fused_loss.py [--tokens 2048] [--d 256] [--vocab 50304] [--steps 3]

Each variant runs in a fresh subprocess (2 threads, fp32), so ru_maxrss is its own peak;
"over setup" subtracts the RSS after the inputs and a first zeroed .grad were allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(variant: str, n: int, d: int, v: int, steps: int, z_loss: float) -> None:
    import torch
    import torch.nn.functional as F

    from kiln.losses import linear_cross_entropy

    torch.set_num_threads(2)
    torch.manual_seed(0)
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (n,))
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    setup = rss_mib()

    def step():
        if variant == "plain":
            logits = F.linear(hidden, weight).float()
            loss = F.cross_entropy(logits, targets)
            if z_loss > 0:
                z = torch.logsumexp(logits, dim=-1)
                loss = loss + z_loss * (z * z).mean()
        else:
            loss, _ = linear_cross_entropy(hidden, weight, targets, z_loss=z_loss)
        loss.backward()
        return loss.item()

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"variant": variant, "loss": loss, "s_per_step": min(times),
                      "peak_rss_mib": rss_mib(), "setup_rss_mib": setup}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8 * 256)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--z-loss", type=float, default=0.0)
    ap.add_argument("--child", choices=["plain", "fused"])
    a = ap.parse_args()
    if a.child:
        child(a.child, a.tokens, a.d, a.vocab, a.steps, a.z_loss)
        return
    print(f"N={a.tokens} d={a.d} V={a.vocab} fp32, forward+backward, 2 threads, "
          f"best of {a.steps} steps; z_loss={a.z_loss}")
    for variant in ("plain", "fused"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, *sys.argv[1:]],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{variant:>5}: {r['s_per_step']:.3f} s/step  peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"({r['peak_rss_mib'] - r['setup_rss_mib']:.0f} over setup)  loss {r['loss']:.6f}")


if __name__ == "__main__":
    main()
