"""The peer benchmark: kiln's whole training step against the loops people would write instead.

Variants (each in its own fresh subprocess, so peak memory is per variant):

  kiln          kiln's real Trainer built from a Config and run with fit(): the loader over a
                token file (background thread), train_step (fused chunked lm_head + CE), grad
                clipping, the LR schedule, the finite checks and metric logging every
                log.interval steps (kiln's default: 1). Checkpoints and eval off.
  kiln+compile  the same with parallel.compile=true (each block torch.compile'd)
  bare-eager    a hand-written Llama loop: full logits + F.cross_entropy, clip, AdamW
  bare-compile  the same with torch.compile(model)
  hf            transformers' LlamaForCausalLM of the same shape, its own loss (labels=)

Every variant trains the same shape (default, --shape cpu: vocab 50304, d_model 256, 4 layers,
4 heads, SwiGLU 1024, seq 256, batch 8, untied embeddings as kiln's default, AdamW) on windows
of the same random token stream. tokens/s = batch * seq * timed steps / their wall time, the
--warmup steps (compilation included) excluded; the compile variants report the warmup's extra
time over steady steps as their compile time. Memory on CPU: the process's peak RSS
(ru_maxrss) and its growth over the RSS just before the model was built; on CUDA:
torch.cuda.max_memory_allocated (timing synchronises the device at the window edges).

--reps rounds each run every variant once, in a rotating order; the table shows medians, and
kiln / best peer (fastest; smallest peak memory), against the targets: >= 1.15x the tokens/s
and <= 0.8x the peak memory of the best peer.

    python bench/peers.py [--steps 12] [--warmup 3] [--reps 3] [--device cpu|cuda] [--bf16]
                          [--shape cpu|gpu] [--variants kiln,bare-eager] [--json OUT]
    python bench/peers.py --breakdown --reps 1    # ms per part: forward, backward, clip, ...
    python bench/peers.py --profile --variants kiln,bare-eager   # top ops of the timed steps

transformers is optional; without it the hf row is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
VARIANTS = ("kiln", "kiln+compile", "bare-eager", "bare-compile", "hf")
KILNS = ("kiln", "kiln+compile")
PEERS = ("bare-eager", "bare-compile", "hf")
SPEED_TARGET, MEMORY_TARGET = 1.15, 0.8


@dataclass(frozen=True)
class Shape:
    vocab: int
    d_model: int
    layers: int
    heads: int
    hidden: int
    seq: int
    batch: int


SHAPES = {
    "cpu": Shape(vocab=50304, d_model=256, layers=4, heads=4, hidden=1024, seq=256, batch=8),
    # GPU-sized (~150M params with untied 50k embeddings): 16 x 1024 tokens per step
    "gpu": Shape(vocab=50304, d_model=768, layers=12, heads=12, hidden=2048, seq=1024, batch=16),
}


def rss_now_mib() -> float:
    """Resident set size now (not the peak), from /proc."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


# --------------------------------------------------------------------------------------------
# Child side: one variant, one process.


def token_windows(shape: Shape, n_windows: int):
    """The shared data: a random token stream cut into n_windows windows of seq + 1 tokens
    (window i starts at i * seq, as kiln's loader cuts a token file)."""
    import numpy as np

    rng = np.random.default_rng(0)
    stream = rng.integers(0, min(50000, shape.vocab - 1), n_windows * shape.seq + 1,
                          dtype=np.int64)
    return stream


class Clock:
    """Wall time at the edges of the warmup and timed windows (device synchronised there)."""

    def __init__(self, device, warmup: int, steps: int):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.marks: dict[int, float] = {}
        self.done = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.sync()
        self.marks[0] = time.perf_counter()

    def step_done(self) -> None:
        self.done += 1
        if self.done in (1, self.warmup, self.warmup + self.steps):
            self.sync()
            self.marks[self.done] = time.perf_counter()

    def result(self) -> dict:
        w, s, m = self.warmup, self.steps, self.marks
        step_s = (m[w + s] - m[w]) / s
        warmup_s = m[w] - m[0]
        return {"step_s": step_s, "first_step_s": m[1] - m[0], "warmup_s": warmup_s,
                "compile_s": max(0.0, warmup_s - w * step_s)}


class Profile:
    """torch.profiler over the timed steps (--profile): prints the top ops afterwards."""

    def __init__(self, enabled: bool, device):
        self.prof = None
        if enabled:
            import torch

            acts = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=False)

    def start(self) -> None:
        if self.prof is not None:
            self.prof.start()

    def stop(self, name: str, cuda: bool) -> None:
        if self.prof is None:
            return
        self.prof.stop()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(f"==== profile: {name}, timed steps, by {key}", file=sys.stderr)
        print(self.prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=55),
              file=sys.stderr)
        print(f"==== profile: {name}, labelled regions (inclusive)", file=sys.stderr)
        rows = [e for e in self.prof.key_averages() if e.key.startswith("##")]
        for e in sorted(rows, key=lambda e: -e.cpu_time_total):
            print(f"{e.key:<40} {e.count:>5} calls {e.cpu_time_total / 1e3:>10.1f} ms total",
                  file=sys.stderr)


class Segments:
    """--breakdown: wall time per part of the step (forward, backward, clip, optimizer, ...)
    over the timed steps, the device synchronised at every edge (which itself costs a little
    on CUDA). Parts may nest; the table reports each part's own total."""

    def __init__(self, enabled: bool, device):
        self.enabled, self.device = enabled, device
        self.on = False
        self.totals: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def __call__(self, label: str):
        if not (self.enabled and self.on):
            return contextlib.nullcontext()
        return self._timed(label)

    @contextlib.contextmanager
    def _timed(self, label: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - t0

    def wrap(self, obj, attr: str, label: str) -> None:
        """Time every call of obj.attr under `label` (an instance attribute shadows it)."""
        if not self.enabled:
            return
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            with self(label):
                return fn(*a, **kw)

        setattr(obj, attr, timed)

    def result(self, steps: int) -> dict[str, float]:
        return {k: v / steps * 1e3 for k, v in self.totals.items()}  # ms per step


def bare_model(shape: Shape):
    import torch
    import torch.nn.functional as F
    from torch import nn

    D, H, HID = shape.d_model, shape.heads, shape.hidden

    class BareBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.RMSNorm(D, eps=1e-5), nn.RMSNorm(D, eps=1e-5)
            self.qkv = nn.Linear(D, 3 * D, bias=False)
            self.o = nn.Linear(D, D, bias=False)
            self.gate_up = nn.Linear(D, 2 * HID, bias=False)
            self.down = nn.Linear(HID, D, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.n1(x)).view(b, t, 3, H, D // H).transpose(1, 3).unbind(2)

            def rope(u):
                u1, u2 = u.chunk(2, dim=-1)
                return u * cos + torch.cat((-u2, u1), dim=-1) * sin

            y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            x = x + self.o(y.transpose(1, 2).reshape(b, t, D))
            g, u = self.gate_up(self.n2(x)).chunk(2, dim=-1)
            return x + self.down(F.silu(g) * u)

    class BareModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(shape.vocab, D)
            self.blocks = nn.ModuleList(BareBlock() for _ in range(shape.layers))
            self.norm = nn.RMSNorm(D, eps=1e-5)
            self.head = nn.Linear(D, shape.vocab, bias=False)
            hd = D // H
            inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
            ang = torch.outer(torch.arange(shape.seq).float(), inv)
            ang = torch.cat((ang, ang), dim=-1)
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)

        def forward(self, idx):
            x = self.emb(idx)
            for blk in self.blocks:
                x = blk(x, self.cos, self.sin)
            return self.head(self.norm(x))

    return BareModel()


def hf_model(shape: Shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.d_model,
                      intermediate_size=shape.hidden, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                      max_position_embeddings=shape.seq, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def run_loop(name: str, shape: Shape, args, device, windows, clock: Clock, prof: Profile,
             seg: Segments) -> float:
    """bare-eager, bare-compile, hf: forward, loss, backward, clip, AdamW, zero_grad."""
    import torch
    import torch.nn.functional as F

    model = (hf_model(shape) if name == "hf" else bare_model(shape)).to(device)
    model.train()
    # as these loops are usually written: AdamW's defaults (fused on CUDA, as kiln's)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if device.type == "cuda" else {}))
    fwd = torch.compile(model) if name == "bare-compile" else model
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16
           else torch.autocast(device.type, enabled=False))
    B = shape.batch
    loss = None
    clock.start()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            prof.start()
            seg.on = True
        lo = (i * B) % (windows.size(0) - B + 1)
        batch = windows[lo:lo + B]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.profiler.record_function("## step"), seg("step (all)"):
            with seg("forward+loss"):
                with amp:
                    if name == "hf":  # its own loss; shift_labels: the others' targets
                        loss = fwd(input_ids=inputs, labels=targets,
                                   shift_labels=targets.contiguous()).loss
                    else:
                        logits = fwd(inputs)
                if name != "hf":
                    loss = F.cross_entropy(logits.float().view(-1, shape.vocab),
                                           targets.reshape(-1))
            with seg("backward"):
                loss.backward()
            with seg("clip_grad_norm"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            with seg("optimizer.step"):
                opt.step()
            with seg("zero_grad"):
                opt.zero_grad(set_to_none=True)
        clock.step_done()
    prof.stop(name, device.type == "cuda")
    return float(loss.detach())


def write_token_file(path: Path, stream) -> None:
    from kiln.data.tokens import TokenWriter, dtype_for_vocab

    eos = 50000  # never drawn (ids are < 50000): the stream is one document, EOS at its end
    w = TokenWriter(path, eos_token_id=eos, dtype=dtype_for_vocab(eos + 1), vocab_size=eos + 1)
    w.write(stream)
    w.close()


def kiln_config(name: str, shape: Shape, args, data: Path, run_dir: Path):
    from kiln.config import config_from_dict

    return config_from_dict({
        "model": {"d_model": shape.d_model, "n_layers": shape.layers, "n_heads": shape.heads,
                  "mlp_hidden_size": shape.hidden, "vocab_size": shape.vocab,
                  "max_seq_len": shape.seq, "norm": "rmsnorm", "norm_eps": 1e-5,
                  "rope_theta": 10000.0},  # tie_embeddings: kiln's default (untied)
        "data": {"paths": [str(data)], "seq_len": shape.seq},
        "optim": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"name": "cosine", "warmup": {"value": 2, "unit": "steps"}},
        "trainer": {"run_dir": str(run_dir), "global_batch_size": shape.batch,
                    "micro_batch_size": shape.batch, "device": args.device,
                    "precision": "bf16" if args.bf16 else "fp32",
                    "max_duration": {"value": args.warmup + args.steps, "unit": "steps"},
                    "eval_interval": 0, "threads": args.threads if args.device == "cpu" else None},
        "checkpoint": {"interval": 0, "save_final": False},
        "log": {"console": False, "interval": args.kiln_log_interval},
        "parallel": {"compile": name == "kiln+compile"},
    })


def run_kiln(name: str, cfg, args, device, clock: Clock, prof: Profile, seg: Segments
             ) -> float:
    """kiln's Trainer.fit(), timed at train_step's returns (the loader, the logging and the
    finite checks between steps fall inside the timed window)."""
    import torch

    from kiln.callbacks import Callback
    from kiln.trainer import Trainer

    class Start(Callback):
        def on_fit_start(self, trainer) -> None:
            clock.start()

    trainer = Trainer(cfg, resume=False, callbacks=[Start()])
    step = trainer.train_step
    next_batch = trainer.loader.next_batch
    losses: list = []

    def timed_step(*a, **kw):  # whatever train_step takes (batch, sources, ...)
        with torch.profiler.record_function("## train_step"), seg("train_step (all)"):
            out = step(*a, **kw)
        clock.step_done()
        if clock.done == args.warmup:  # from here on: the loop between steps too
            prof.start()
            seg.on = True
        losses.append(out[0])
        return out

    def timed_next_batch(*a, **kw):
        with torch.profiler.record_function("## loader.next_batch"):
            return next_batch(*a, **kw)

    trainer.train_step = timed_step
    trainer.loader.next_batch = timed_next_batch
    if seg.enabled:  # the parts of the step, and what the loop does between steps
        seg.wrap(trainer, "micro_loss", "forward+loss")
        seg.wrap(torch.Tensor, "backward", "backward")
        seg.wrap(torch.nn.utils, "clip_grad_norm_", "clip_grad_norm")
        seg.wrap(trainer.optimizer, "step", "optimizer.step")
        seg.wrap(trainer.optimizer, "zero_grad", "zero_grad")
        seg.wrap(trainer.loader, "next_batch", "loader.next_batch")
        seg.wrap(trainer, "_check_finite", "loop: _check_finite")
        for cb in trainer.callbacks:
            seg.wrap(cb, "on_log", f"loop: {type(cb).__name__}.on_log")
    trainer.fit()
    prof.stop(name, device.type == "cuda")
    if trainer.step != args.warmup + args.steps:
        raise RuntimeError(f"kiln ran {trainer.step} steps, expected {args.warmup + args.steps}")
    return float(losses[-1])


def child(name: str, args) -> None:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = Shape(**json.loads(args.shape_json))
    n_windows = max(64, (args.warmup + args.steps) * shape.batch)
    stream = token_windows(shape, n_windows)
    clock = Clock(device, args.warmup, args.steps)
    prof = Profile(args.profile, device)
    seg = Segments(args.breakdown, device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if name in KILNS:
            import kiln.trainer  # noqa: F401 - imported before the baseline is taken

            data = Path(tmp) / "tokens.bin"
            write_token_file(data, stream)
            cfg = kiln_config(name, shape, args, data, Path(tmp) / "run")
        else:
            if name == "hf":
                import transformers  # noqa: F401
            windows = torch.from_numpy(stream[:-1].reshape(n_windows, shape.seq))
            windows = torch.cat([windows, torch.from_numpy(stream[shape.seq::shape.seq])[:, None]],
                                dim=1).to(device)  # [n_windows, seq + 1]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
        rss0 = rss_now_mib()
        if name in KILNS:
            loss = run_kiln(name, cfg, args, device, clock, prof, seg)
        else:
            loss = run_loop(name, shape, args, device, windows, clock, prof, seg)
    r = clock.result()
    tokens = shape.batch * shape.seq
    out = {"name": name, "tokens_per_sec": tokens / r["step_s"], **r, "loss": loss,
           "rss_before_mib": rss0, "peak_rss_mib": rss_peak_mib(),
           "rss_growth_mib": rss_peak_mib() - rss0, "loadavg_end": loadavg()}
    if seg.enabled:
        out["breakdown_ms"] = seg.result(args.steps)
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["growth_mib"] = out["peak_mib"] - mem0
        out["gpu"] = torch.cuda.get_device_name(device)
    else:
        out["peak_mib"], out["growth_mib"] = out["peak_rss_mib"], out["rss_growth_mib"]
    print(json.dumps(out))


# --------------------------------------------------------------------------------------------
# Parent side: rounds of subprocesses, then the table.


def run_child(name: str, args, shape: Shape) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name,
           f"--shape-json={json.dumps(asdict(shape))}", f"--steps={args.steps}",
           f"--warmup={args.warmup}", f"--device={args.device}", f"--threads={args.threads}",
           f"--kiln-log-interval={args.kiln_log_interval}"]
    cmd += ["--bf16"] if args.bf16 else []
    cmd += ["--profile"] if args.profile else []
    cmd += ["--breakdown"] if args.breakdown else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    with tempfile.TemporaryDirectory(prefix="peers-inductor-") as cache:
        if not args.warm_cache:  # every compile is a cold one, as on a first run
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
            env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        load0 = loadavg()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                 timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            return {"name": name, "error": f"timed out after {args.child_timeout} s"}
    if args.profile:
        sys.stdout.write(out.stderr)
    if out.returncode != 0:
        return {"name": name, "error": out.stderr.strip()[-3000:] or f"exit {out.returncode}"}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["loadavg_start"] = load0
    return r


def median(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else float("nan")


def summarize(results: dict[str, list[dict]]) -> dict:
    med = {}
    for name, rows in results.items():
        ok = [r for r in rows if "error" not in r]
        if ok:
            med[name] = {k: median(ok, k) for k in
                         ("tokens_per_sec", "peak_mib", "growth_mib", "compile_s",
                          "first_step_s", "step_s", "peak_rss_mib", "loss")}
            med[name]["reps"] = len(ok)
    peers = {n: m for n, m in med.items() if n in PEERS}
    verdict = {}
    if peers:
        fastest = max(peers, key=lambda n: peers[n]["tokens_per_sec"])
        leanest = min(peers, key=lambda n: peers[n]["peak_mib"])
        leanest_growth = min(peers, key=lambda n: peers[n]["growth_mib"])
        for k in KILNS:
            if k not in med:
                continue
            speed = med[k]["tokens_per_sec"] / peers[fastest]["tokens_per_sec"]
            mem = med[k]["peak_mib"] / peers[leanest]["peak_mib"]
            growth = med[k]["growth_mib"] / peers[leanest_growth]["growth_mib"]
            verdict[k] = {"speed_ratio": speed, "fastest_peer": fastest, "memory_ratio": mem,
                          "leanest_peer": leanest, "growth_ratio": growth,
                          "leanest_growth_peer": leanest_growth,
                          "speed_target_met": speed >= SPEED_TARGET,
                          "memory_target_met": mem <= MEMORY_TARGET}
    return {"medians": med, "verdict": verdict}


def print_table(summary: dict, results: dict, args, shape: Shape, cuda: bool) -> None:
    med, verdict = summary["medians"], summary["verdict"]
    mem = "peak alloc" if cuda else "peak RSS"
    print(f"\nmedians of {args.reps} interleaved rep(s); {args.steps} timed steps after "
          f"{args.warmup} warmup; {shape.batch}x{shape.seq} tokens/step; "
          f"{'bf16' if args.bf16 else 'fp32'}; device {args.device}")
    print(f"{'variant':<13} {'tokens/s':>9} {'(min-max)':>15} {mem + ' MiB':>15} "
          f"{'growth MiB':>11} {'compile s':>10} {'1st step s':>11} {'loss':>7}")
    for name in VARIANTS:
        if name not in results:
            continue
        if name not in med:
            err = results[name][0].get("error", "?").strip().splitlines()
            print(f"{name:<13} failed: {err[-1] if err else '?'}")
            continue
        m = med[name]
        tps = [r["tokens_per_sec"] for r in results[name] if "error" not in r]
        spread = f"({min(tps):,.0f}-{max(tps):,.0f})"
        comp = f"{m['compile_s']:.1f}" if "compile" in name else "-"
        print(f"{name:<13} {m['tokens_per_sec']:>9,.0f} {spread:>15} {m['peak_mib']:>15,.0f} "
              f"{m['growth_mib']:>11,.0f} {comp:>10} {m['first_step_s']:>11.2f} "
              f"{m['loss']:>7.3f}")
    for k, v in verdict.items():
        print(f"{k}: {v['speed_ratio']:.2f}x the tokens/s of the fastest peer ({v['fastest_peer']})"
              f" [target >= {SPEED_TARGET}: {'MET' if v['speed_target_met'] else 'NOT met'}]; "
              f"{v['memory_ratio']:.2f}x the {mem} of the leanest peer ({v['leanest_peer']}) "
              f"[target <= {MEMORY_TARGET}: {'MET' if v['memory_target_met'] else 'NOT met'}]; "
              f"growth {v['growth_ratio']:.2f}x ({v['leanest_growth_peer']})")


def print_breakdown(results: dict[str, list[dict]]) -> None:
    """Median ms per step of each timed part, per variant (--breakdown)."""
    print("\nms per timed step, median over reps (parts nest: '(all)' holds the parts listed "
          "under it)")
    for name, rows in results.items():
        ok = [r for r in rows if "breakdown_ms" in r]
        if not ok:
            continue
        step_ms = median(ok, "step_s") * 1e3
        parts = {k: statistics.median(r["breakdown_ms"].get(k, 0.0) for r in ok)
                 for k in ok[0]["breakdown_ms"]}
        print(f"{name}: {step_ms:,.0f} ms/step wall")
        inner = [k for k in parts if "(all)" not in k and not k.startswith("loop")
                 and k != "loader.next_batch"]
        for k, v in parts.items():
            print(f"  {k:<34} {v:>9,.1f} ms  {v / step_ms:>6.1%}")
        total = next((v for k, v in parts.items() if "(all)" in k), None)
        if total is not None:
            rest = total - sum(parts[k] for k in inner)
            print(f"  {'step: rest (python, .to, lr, checks)':<34} {rest:>9,.1f} ms  "
                  f"{rest / step_ms:>6.1%}")
            outer = step_ms - total - sum(v for k, v in parts.items()
                                         if k.startswith("loop") or k == "loader.next_batch")
            print(f"  {'between steps: rest':<34} {outer:>9,.1f} ms  {outer / step_ms:>6.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="timed steps (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for every variant")
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu",
                   help="cpu: the small default shape; gpu: d768 x 12 layers, 16x1024 tokens")
    p.add_argument("--batch", type=int, help="override the shape's batch")
    p.add_argument("--seq", type=int, help="override the shape's seq")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--kiln-log-interval", type=int, default=1,
                   help="kiln's log.interval (default 1, kiln's default: a metric line, finite "
                        "check and loss read every step)")
    p.add_argument("--warm-cache", action="store_true",
                   help="share the inductor cache between runs (default: a cold one each)")
    p.add_argument("--child-timeout", type=float, default=1500)
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over the timed steps of each variant; prints top ops")
    p.add_argument("--breakdown", action="store_true",
                   help="time the parts of each step (forward, backward, clip, optimizer, "
                        "loader, checks) and print them; synchronises at every part on CUDA")
    p.add_argument("--json", metavar="OUT", help="write the raw results and medians here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--shape-json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    if args.child:
        child(args.child, args)
        return

    shape = SHAPES[args.shape]
    shape = Shape(**{**asdict(shape), **{k: v for k, v in
                                         (("batch", args.batch), ("seq", args.seq)) if v}})
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if "hf" in names and importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: skipping the hf variant")
        names.remove("hf")
    import torch

    print(f"peers: {shape}; device {args.device}"
          f"{'' if args.device == 'cuda' else f', {args.threads} threads'}; torch "
          f"{torch.__version__}; {os.cpu_count()} CPUs; loadavg {loadavg():.2f}; "
          f"kiln log.interval {args.kiln_log_interval}")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            r = run_child(name, args, shape)
            r["rep"] = rep
            results[name].append(r)
            if "error" in r:
                print(f"rep {rep + 1} {name:<13} FAILED\n{r['error']}", flush=True)
            else:
                print(f"rep {rep + 1} {name:<13} {r['tokens_per_sec']:>9,.0f} tokens/s  "
                      f"peak {r['peak_mib']:>7,.0f} MiB (growth {r['growth_mib']:>6,.0f})  "
                      f"warmup {r['warmup_s']:6.1f} s  load {r['loadavg_start']:.2f}"
                      f"->{r['loadavg_end']:.2f}", flush=True)
    summary = summarize(results)
    print_table(summary, results, args, shape, args.device == "cuda")
    if args.breakdown:
        print_breakdown(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "args": {k: v for k, v in vars(args).items() if k not in ("child", "shape_json")},
            "shape": asdict(shape), "torch": torch.__version__, "cpus": os.cpu_count(),
            "runs": results, **summary}, indent=1) + "\n")
        print(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
