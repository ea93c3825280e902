"""What a run will do, before it does it: the numbers `kiln train --dry-run` prints."""

from __future__ import annotations

from pathlib import Path

from kiln.config import Config, run_numbers
from kiln.errors import KilnError
from kiln.hardware import GPUS, threads_warning
from kiln.model import flops_per_token
from kiln.parallel import DistInfo, resolve_dp, tp_unsplittable
from kiln.schedule import LRSchedule


def plan_lines(cfg: Config, world_size: int = 1, plan=None) -> tuple[list[str], list[str]]:
    """(lines describing the run, loud warnings); `plan` is a kiln.start.StartPlan."""
    n = run_numbers(cfg, world_size, plan.total_steps if plan is not None else None)
    m, d, t = cfg.model, cfg.data, cfg.trainer
    lines, warnings = [], []
    if (many := threads_warning(t.threads)) is not None:
        warnings.append(many)
    total_p = m.num_params()
    lines.append(f"parameters            {total_p:,} ({m.num_params(False):,} without embeddings)")
    lines.append(f"vocabulary            {m.vocab_size:,} (embedding padded to "
                 f"{m.padded_vocab_size:,})")
    lines.append(f"tokens per step       {n.tokens_per_step:,} "
                 f"({t.global_batch_size} x {d.seq_len})")
    lines.append(f"micro-batches/step    {n.micro_batches_per_step} of {t.micro_batch_size} "
                 f"instances (x {world_size} rank{'s' if world_size > 1 else ''})")
    lines.append(f"steps for duration    {n.total_steps:,} ({t.max_duration})")
    start = plan.step if plan is not None else 0
    if start:
        lines.append(f"steps this run        {n.stop_step - start:,} ({start:,} -> "
                     f"{n.stop_step:,})")
    lines.append(f"tokens this run       {(n.stop_step - start) * n.tokens_per_step:,}")
    if n.stop_step < n.total_steps:
        lines.append(f"hard stop             step {n.stop_step:,} (schedule still planned to "
                     f"{n.total_steps:,})")
    if plan is None:
        sched = LRSchedule.build(cfg.schedule, cfg.optim.lr, n.total_steps, n.warmup_steps)
    else:
        sched = plan.schedule
    lines.append(f"warmup ends           step {max(sched.warmup_end, 0):,}")
    lines.append(f"training FLOPs/token  {flops_per_token(m, d.seq_len):.3g}")
    keys = sched.key_steps(start or None)
    keys = [s for s in keys if s >= start] or keys
    lines.append("lr at steps           " + ", ".join(f"{s:,}: {sched.lr(s):.3g}" for s in keys))
    stride = d.stride or d.seq_len
    if stride < d.seq_len:
        warnings.append(
            f"WARNING: data.stride={stride} < data.seq_len={d.seq_len}: windows OVERLAP, every "
            f"token is seen ~{d.seq_len / stride:.0f} times per epoch (overfitting risk); "
            "remove data.stride for non-overlapping windows"
        )
    return lines, warnings


MANY_EPOCHS = 4
"""A run that goes over its training data more often than this is warned about."""


def data_lines(cfg: Config, train_windows: int, val_windows: int | None,
               total_tokens: int, n_files: int, plan=None) -> tuple[list[str], list[str]]:
    """(lines, loud warnings) about the data; `plan` (a StartPlan) brings the tokens already
    seen, so a resume after a batch change counts the earlier steps at their own batch."""
    n = run_numbers(cfg, total_steps=plan.total_steps if plan is not None else None)
    stop = n.stop_step
    done_steps, done_tokens = 0, 0
    if plan is not None:
        done_steps, done_tokens = plan.step, plan.tokens_seen
    per_epoch = train_windows * cfg.data.seq_len
    tokens = done_tokens + max(stop - done_steps, 0) * n.tokens_per_step
    epochs = tokens / max(per_epoch, 1)
    out = [
        f"train data            {n_files} file(s), {total_tokens:,} tokens, {train_windows:,} "
        f"windows of {cfg.data.seq_len + 1}",
        f"epochs for the run    {epochs:.2f}",
    ]
    if val_windows is not None:
        out.append(f"validation windows    {val_windows:,}")
    warnings = []
    if epochs > MANY_EPOCHS:
        warnings.append(f"WARNING: this run goes over its training data ~{epochs:,.0f} times "
                        f"({tokens:,} tokens from {per_epoch:,} per epoch): expect "
                        "memorisation; add data or shorten trainer.max_duration")
    return out, warnings


# --------------------------------------------------------------------------------------------
# Memory: what one rank holds at the peak of a training step

MIB, GIB = 2**20, 2**30

CPU_IMPORT_BYTES = 226 * MIB
"""Resident memory of a process that has imported torch and kiln.trainer and done nothing
else (measured: torch 2.13 CPU build, x86-64, Linux, VmRSS)."""
CPU_FIRST_USE_BYTES = 91 * MIB
"""What building a Trainer and its first steps add once, whatever the model's size: code
torch loads on first use (73 MiB of it for the first Transformer on the meta device), the
data loader's thread, kernels' scratch space (measured as above: the RSS growth of a
two-step run of a model with 2 MiB of tensors)."""
CUDA_OVERHEAD_BYTES = 2 * GIB
"""GPU memory outside the tensors: the CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers
and the caching allocator's unused blocks. An assumption (no GPU was at hand to measure it):
the context and workspaces are usually 0.5-1 GiB; the rest is room for fragmentation."""


def _compute_precision(cfg: Config, device: str) -> str:
    p = cfg.trainer.precision
    return p if p != "auto" else ("bf16" if device == "cuda" else "fp32")


def layer_bytes_per_token(m, precision: str) -> int:
    """Bytes one transformer block saves for its backward pass, per token (see
    :func:`memory_estimate`)."""
    d, h, kv, heads = m.d_model, m.hidden_size, m.kv_heads * m.head_dim, m.n_heads
    bf16 = precision == "bf16"
    s = 2 if bf16 else 4
    if m.norm == "rmsnorm":  # fp32 input + fp32 normalised tensor + the rsqrt, per norm
        norms = 2 * (8 * d + 4)
        if bf16 and m.norm_placement == "reordered":
            norms = 8 * d + 8
    else:  # F.layer_norm: fp32 input + mean and rstd
        norms = 2 * (4 * d + 8)
    linear_in = 10 * d if bf16 else 8 * d  # autocast casts q/k/v and gate/up inputs apiece
    attn = 4 * s * d + 4 * heads  # q, k, v (GQA: repeated to all heads), output; logsumexp
    mlp = 4 * s * h  # gate, silu(gate), up, silu(gate) * up
    qk = ((6 if bf16 else 8) * (d + kv) + 8) if m.qk_norm else 0
    return norms + linear_in + attn + mlp + qk


def selective_bytes_per_token(m, precision: str) -> int:
    """What a block keeps per token under selective activation checkpointing: its input (fp32)
    and the outputs of its matmuls and attention kernel (q, k, v, o; attention's output and
    log-sum-exp; gate, up, down); the pointwise ops between them are recomputed."""
    s = 2 if precision == "bf16" else 4
    d, h, kv = m.d_model, m.hidden_size, m.kv_heads * m.head_dim
    return 4 * d + s * (d + 2 * kv) + s * d + 4 * m.n_heads + s * d + 2 * s * h + s * d


def memory_estimate(cfg: Config, world_size: int = 1, dp: str | None = None, *,
                    device: str | None = None, micro_batch_size: int | None = None,
                    activation_checkpointing: str | None = None, tp: int | None = None
                    ) -> dict:
    """Bytes one rank holds at the peak of a training step, by part.

    Returns a dict of ints ``params, grads, adam, activations, loss, overhead, total`` (the
    rows sum to ``total``), ``eval`` (the peak of a validation pass, not in ``total``) and
    the settings used: ``device, precision, dp, shards, micro_batch_size,
    micro_batches_per_step, activation_checkpointing``, and ``notes`` (a list of strings).

    ``device`` is "cpu" or "cuda" (default: trainer.device, auto meaning cuda);
    ``precision`` follows trainer.precision (auto: bf16 on cuda, fp32 on cpu); ``dp`` and
    ``activation_checkpointing`` default to the config's (dp auto: ddp when world_size > 1).
    Symbols: P parameters (a tied embedding once), L layers, d d_model, h the SwiGLU hidden
    size, V the padded vocabulary, H heads, kv = kv_heads * head_dim, N = micro_batch_size *
    seq_len tokens per micro-batch, s = 2 (bf16) or 4 (fp32) bytes of the compute dtype.

    * params: 4 P (fp32 master weights) / shards. FSDP/HSDP also hold gathered copies in
      the FSDP param dtype (pb = 2 for bf16, else 4): the root's embedding and head (kept
      gathered from forward to backward) and two blocks (the one computing and the one
      prefetched): pb * (P_embedding + 2 P_block).
    * grads: 4 P / shards. DDP adds its gradient buckets, another 4 P
      (gradient_as_bucket_view is off); FSDP/HSDP add one block's unsharded fp32
      gradients, 4 P_block. With one micro-batch per step the gradients are made as the
      activations are freed, so at the peak (the start of the backward pass) none are held
      yet: the row is then 0 (plus DDP's buckets) unless the end of the backward, 4 P +
      4 V d (the embedding's dense gradient), is the higher point.
    * adam: 8 P / shards (two fp32 moments).
    * activations: what autograd saves, per block and token (eager mode; torch.compile
      saves less). fp32 (s = 4), pre-norm RMSNorm: ``40 d + 16 h + 4 H + 8`` bytes:

      - each RMSNorm: its fp32 input and fp32 normalised tensor (8 d) and the rsqrt (4);
        a LayerNorm (OLMo's non-parametric one too): the input and mean/rstd (4 d + 8);
      - the inputs of the projections: 8 d in fp32 (one tensor for q/k/v, one for
        gate/up); under bf16 autocast each projection casts its own copy: 10 d;
      - attention (SDPA's flash kernels): q, k, v and the output, 4 s d (grouped-query
        k and v are repeated to all heads first), and the log-sum-exp, 4 H;
      - SwiGLU: gate, silu(gate), up and their product, 4 s h;
      - QK-norm adds 8 (d + kv) + 8 (bf16: 6 (d + kv) + 8); OLMo-2's reordered norms
        under bf16 save 8 d less.

      bf16 pre-norm RMSNorm: ``34 d + 8 h + 4 H + 8``. Under bf16 autocast with fp32
      weights (no FSDP, or parallel.param_dtype=fp32) each block also keeps the bf16 copy
      of its weights, 2 P_block. A block costs N x those bytes (+ the copies); activation
      checkpointing keeps only each checkpointed block's input, 4 N d: full = L * 4 N d,
      every_n with k = ceil(L / ac_every) checkpointed blocks = k * 4 N d + (L - k) blocks;
      selective keeps in every block its input and its matmuls' and attention's outputs,
      N (4 d + s (4 d + 2 kv + 2 h) + 4 H) (see selective_bytes_per_token); budget keeps
      its input and ac_budget of the rest of a block (an estimate: torch.compile chooses).
      A checkpointed block is recomputed in the backward pass, after the loss has freed
      its buffers: when one block + 8 N d (the gradient flowing in and out) + 4 V d (the
      head's gradient, with one micro-batch per step) is more than the loss row, that is
      the peak and the rows show it (activations + one block; loss = the rest). Plus the
      RoPE tables (8 max_seq_len head_dim) and, with data.document_mask, the N seq_len byte
      mask.
    * loss, fused (trainer.fused_loss, kiln.losses): the final norm's saves and output,
      grad_hidden 4 N d and the fp32 head gradient 4 V d kept for the backward pass, the
      per-token losses 4 N, and the larger of the forward's work (one fp32 chunk of logits,
      c V 4 with c from kiln.losses.default_chunk_size; bf16 adds the weight's bf16 copy
      2 V d, the chunk's bf16 gradient 2 c V and a 2 V d product) and the backward's
      (the scaled copies, 4 N d + 4 V d). Plain path: the final norm's saves, the head's
      input and N V (12 + 2 [bf16]) bytes: the logits (and their fp32 copy), the log-softmax
      kept for backward, and its gradient and the logits' gradient made in backward.
    * overhead: cpu: CPU_IMPORT_BYTES + CPU_FIRST_USE_BYTES (measured); cuda:
      CUDA_OVERHEAD_BYTES (assumed).
    * eval: a validation pass (no gradients are held then: the step sets them to None):
      params + adam + overhead + N V (s + 8 + 4 [bf16]): the logits of a micro-batch (and
      their fp32 copy), the contiguous copy cross_entropy makes of the transposed logits,
      and the log-softmax. It can be more than the training step's peak.
    """
    from kiln.losses import default_chunk_size

    m, t, pc = cfg.model, cfg.trainer, cfg.parallel
    device = device or ("cpu" if t.device == "cpu" else "cuda")
    precision = _compute_precision(cfg, device)
    bf16 = precision == "bf16"
    s = 2 if bf16 else 4
    tp = tp or pc.tp  # tensor parallelism: weights, their state and the work split tp ways
    cp = pc.cp  # context parallelism: each window's tokens split cp ways
    dp_world = max(world_size // (tp * cp), 1)  # the ranks the batch is split over
    dp = dp or pc.dp
    if dp == "auto":  # as a run would resolve it
        dp = resolve_dp(pc, DistInfo(world_size=world_size, tp=tp, cp=cp))
    shards = {"fsdp": dp_world * cp, "hsdp": pc.shard_size or min(dp_world * cp, 8)
              }.get(dp, 1) * tp
    ac = activation_checkpointing or pc.activation_checkpointing
    micro = micro_batch_size or t.micro_batch_size
    per_rank = max(t.global_batch_size // dp_world, 1)
    n_micro = -(-per_rank // micro)
    T = cfg.data.seq_len
    N = micro * T // cp  # this rank's tokens
    d, L, V = m.d_model, m.n_layers, m.padded_vocab_size
    V_full, V = V, V // tp  # the head's share of the vocabulary (the loss works on shards)
    P = m.num_params()
    final_norm = {"rmsnorm": d, "layernorm": 2 * d}.get(m.norm, 0)
    block_p = (m.num_params(False) - final_norm) // L
    emb_p = P - m.num_params(False)
    sharded = dp in ("fsdp", "hsdp")
    pb = 2 if sharded and bf16 and pc.param_dtype != "fp32" else 4
    notes: list[str] = []

    params = 4 * P // shards
    if sharded:
        params += pb * (emb_p + 2 * block_p) // tp
    grads = 4 * P // shards
    buckets = 4 * P if dp == "ddp" else 0
    if sharded:
        grads += 4 * block_p // tp
    adam = 8 * P // shards

    weight_copies = 2 * block_p // tp if bf16 and pb == 4 else 0
    block = N * layer_bytes_per_token(m, precision) // tp + weight_copies
    inputs = 4 * N * d
    if ac == "selective":  # every block keeps more than its input: its matmuls' outputs
        inputs = N * selective_bytes_per_token(m, precision)
    if ac == "budget":  # the partitioner keeps that fraction of the rest
        inputs += int(pc.ac_budget * max(block - inputs, 0))
        notes.append(f"activation_checkpointing=budget: every block keeps its input and "
                     f"{pc.ac_budget:g} of the rest of its activations (as asked of "
                     "torch.compile's partitioner, which chooses what: bench/gpu.sh OUT ac "
                     "measures it)")
    k = {"full": L, "every_n": -(-L // max(pc.ac_every, 1)), "selective": L,
         "budget": L if pc.ac_budget < 1 else 0}.get(ac, 0)
    acts = k * inputs + (L - k) * block + 8 * m.max_seq_len * m.head_dim
    if cfg.data.document_mask:
        acts += N * T

    norm_saves = N * (8 * d + 4 if m.norm == "rmsnorm" else 4 * d + 8)
    if t.fused_loss:
        chunk = default_chunk_size(V)
        rows = min(N, -(-N // -(-N // chunk)))
        forward = 4 * N * d + 4 * rows * V
        if bf16:
            forward += 2 * V * d * (pb == 4) + 2 * rows * V + 2 * V * d
        backward = 4 * N * d + pb * V * d
        loss = norm_saves + 4 * N * d + 4 * V * d + 4 * N + max(forward, backward)
    else:
        loss = norm_saves + (2 if bf16 else 4) * N * d + N * V * (12 + (2 if bf16 else 0))
    # A checkpointed block is recomputed in the backward pass, after the loss has let go of
    # its buffers: then one block's activations, the gradient flowing in and out (8 N d)
    # and, with one micro-batch per step, the head's fresh gradient are held instead.
    head_grad = 4 * V * d if n_micro == 1 else 0
    if k and block + 8 * N * d + head_grad > loss:
        acts, loss = acts + block, 8 * N * d + head_grad
        notes.append("the peak is the recomputation of a checkpointed block in the backward "
                     "pass (the loss's buffers are freed by then)")

    if n_micro == 1:
        if acts + loss >= grads + 4 * V * d:
            notes.append("one micro-batch per step: the peak comes before the gradients "
                         f"({fmt_bytes(grads)}), which are made as activations are freed")
            grads = 0
        else:
            acts, loss = 0, 4 * V * d
            notes.append("one micro-batch per step: the peak is the end of the backward pass "
                         "(all gradients, the embedding's dense gradient)")
    grads += buckets
    overhead = CPU_IMPORT_BYTES + CPU_FIRST_USE_BYTES if device == "cpu" else CUDA_OVERHEAD_BYTES
    total = params + grads + adam + acts + loss + overhead
    eval_peak = params + adam + overhead + N * V_full * (s + 8 + (4 if bf16 else 0))
    return {"params": params, "grads": grads, "adam": adam, "activations": acts, "loss": loss,
            "overhead": overhead, "total": total, "eval": eval_peak, "device": device,
            "precision": precision, "dp": dp, "shards": shards, "micro_batch_size": micro,
            "micro_batches_per_step": n_micro, "activation_checkpointing": ac, "tp": tp,
            "notes": notes}


def fmt_bytes(n: float) -> str:
    """1536 MiB -> '1.50 GiB'; under a GiB in MiB."""
    return f"{n / GIB:,.2f} GiB" if abs(n) >= GIB else f"{n / MIB:,.0f} MiB"


# --------------------------------------------------------------------------------------------
# GPUs

def gpu_spec(name: str, precision: str = "bf16") -> tuple[float, float]:
    """(memory bytes, dense peak FLOP/s in `precision`) of a GPU named as `--gpu` takes it,
    from kiln.hardware's table, the one a run's MFU is measured against."""
    from kiln.hardware import by_name

    gpu = by_name(name)
    return gpu.memory, gpu.bf16 if precision == "bf16" else gpu.fp32


def largest_micro_batch(cfg: Config, gpu_memory_bytes: float, world_size: int = 1,
                        dp: str | None = None, activation_checkpointing: str | None = None,
                        limit: int = 4096, tp: int | None = None) -> int:
    """The largest micro-batch (instances per forward/backward on one rank, up to `limit`)
    whose :func:`memory_estimate` on CUDA fits in `gpu_memory_bytes`; 0 when not even one
    instance fits. Every size is tried (the peak is not monotonic where the micro-batch
    reaches the whole per-rank batch and the gradients leave the peak)."""
    best = 0
    for micro in range(1, limit + 1):
        est = memory_estimate(cfg, world_size, dp, device="cuda", micro_batch_size=micro,
                              activation_checkpointing=activation_checkpointing, tp=tp)
        if est["total"] <= gpu_memory_bytes:
            best = micro
        elif est["activations"] + est["loss"] > gpu_memory_bytes:
            break  # activations alone no longer fit: no larger micro-batch can
    return best


# --------------------------------------------------------------------------------------------
# Time

MFU = 0.40
"""Assumed model FLOPs utilisation when none is measured (large dense runs on H100s reach
0.35-0.50)."""


def hours(tokens: float, flops_per_token: float, gpus: int, peak_flops: float | None = None,
          mfu: float = MFU, tokens_per_sec: float | None = None) -> float:
    """Wall-clock hours to train `tokens` on `gpus` GPUs: tokens * flops_per_token / (gpus *
    peak_flops * mfu), or, from a measured per-GPU throughput, tokens / (gpus *
    tokens_per_sec). Scaling is taken as linear (the same MFU on every GPU count)."""
    if tokens_per_sec:
        return tokens / (gpus * tokens_per_sec) / 3600
    return tokens * flops_per_token / (gpus * peak_flops * mfu) / 3600


def measured_throughput(run_dir: str | Path) -> tuple[float | None, float | None]:
    """(median MFU, median tokens/s) of RUN_DIR/metrics.jsonl's logged steps (None where
    absent): the MFU is per GPU (logged on GPUs kiln knows), the tokens/s the whole run's."""
    import json
    import statistics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None, None
    mfus, tps = [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) > 1:  # step 1 pays for warm-up
            if isinstance(rec.get("mfu"), (int, float)):
                mfus.append(float(rec["mfu"]))
            if isinstance(rec.get("tokens_per_sec"), (int, float)):
                tps.append(float(rec["tokens_per_sec"]))
    return (statistics.median(mfus) if mfus else None,
            statistics.median(tps) if tps else None)


# --------------------------------------------------------------------------------------------
# Checkpoints and disk


def param_tensors(m) -> int:
    """How many parameter tensors the model has (a tied head counted once)."""
    norm = {"rmsnorm": 1, "layernorm": 2}.get(m.norm, 0)
    block = 2 * norm + 7 * (2 if m.bias else 1) + (2 * norm if m.qk_norm else 0)
    return m.n_layers * block + norm + (1 if m.tie_embeddings else 2)


def checkpoint_bytes_estimate(cfg: Config, tokenizer_bytes: int = 0) -> int:
    """Bytes of one checkpoint: model.safetensors (fp32 weights, a tied embedding stored
    once: 4 P, plus a ~100-byte header entry per tensor), optim.pt (AdamW's two fp32 moments,
    8 P, plus ~700 bytes of records per parameter tensor), rng.pt, trainer.json, config.yaml,
    manifest.json (16 KiB together) and the tokenizer.json copied beside them. Sharded
    checkpoints hold the same tensors."""
    n = param_tensors(cfg.model)
    return 12 * cfg.model.num_params() + 800 * n + 16 * 1024 + tokenizer_bytes


def checkpoint_plan(cfg: Config, stop_step: int, start_step: int = 0,
                    tokenizer_bytes: int = 0) -> dict:
    """How many checkpoints a run writes between start_step and stop_step and the disk they
    need: ``saves``, ``kept`` (checkpoint.keep_last; 0 keeps all), ``size`` (bytes of one),
    ``peak`` (bytes on disk at most: a new checkpoint is written before the oldest is
    pruned, so keep_last + 1 of them)."""
    ck = cfg.checkpoint
    saves = 0
    if ck.interval:
        saves = (stop_step - 1) // ck.interval - start_step // ck.interval
    saves += 1 if ck.save_final and stop_step > start_step else 0
    saves = max(saves, 0)
    kept = min(ck.keep_last, saves) if ck.keep_last else saves
    size = checkpoint_bytes_estimate(cfg, tokenizer_bytes)
    on_disk = min(kept + 1, saves) if ck.keep_last else saves
    return {"saves": saves, "kept": kept, "size": size, "peak": on_disk * size}


# --------------------------------------------------------------------------------------------
# Data that is not there yet


def missing_data(cfg: Config) -> list[tuple[str, str]]:
    """(field, pattern) of every local data path (data.paths, data.val_paths, the sources'
    paths) that matches no file yet; URLs are not looked at. Other problems of the files
    (an empty one, ...) are left for build_datasets to refuse."""
    from kiln.data.remote import is_url
    from kiln.data.tokens import resolve_paths

    d = cfg.data
    fields = [("data.paths", d.paths), ("data.val_paths", d.val_paths)]
    fields += [(f"data.sources[{i}].paths", s.paths) for i, s in enumerate(d.sources)]
    missing = []
    for name, patterns in fields:
        for p in patterns:
            if is_url(p):
                continue
            try:
                resolve_paths([p])
            except KilnError as e:
                if "matches no files" in str(e):
                    missing.append((name, p))
    return missing


def missing_data_warning(missing: list[tuple[str, str]]) -> str:
    by_field: dict[str, list[str]] = {}
    for name, p in missing:
        by_field.setdefault(name, []).append(repr(p))
    what = "; ".join(f"{name} {', '.join(ps)}" for name, ps in by_field.items())
    verb = "match" if len(missing) > 1 else "matches"
    return (f"WARNING: {what} {verb} no files yet (run kiln prepare first); data-dependent "
            "numbers are unknown")


NO_DATA_LINE = "epochs for the run    unknown (no data yet)"


# --------------------------------------------------------------------------------------------
# kiln plan


def add_plan_arguments(p) -> None:
    p.description = ("Memory per rank, the largest micro-batch that fits a GPU, the time to "
                     "train, the checkpoints and the disk they need: before launch, without "
                     "data (any config field can be overridden, as for kiln train: "
                     "--trainer.micro_batch_size=4)")
    p.add_argument("config", help="YAML config file, or a run directory")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="GPUs (ranks) the run will use (default 1)")
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help=f"GPU to plan for: {', '.join(g.name for g in GPUS)} (default h100)")
    p.add_argument("--tokens-per-sec", type=float, default=None, metavar="X",
                   help="measured training throughput of ONE GPU, instead of an assumed MFU")
    p.add_argument("--mfu", type=float, default=None, metavar="F",
                   help=f"model FLOPs utilisation to assume (default {MFU}, or the median "
                   "logged by the run when CONFIG is a run directory)")


def _hours_text(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.1f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:,.1f} h" + (f" ({h / 24:,.1f} d)" if h >= 48 else "")


MFU_PLAUSIBLE = 0.7
"""An MFU above this, implied by a claimed throughput, is warned about: well-tuned dense
training reaches 0.4-0.6; above 1.0 is more than the GPU's peak."""


def time_lines(cfg: Config, run_tokens: int, gpus: int, gpu: str, precision: str, device: str,
               mfu: float | None = None, tokens_per_sec: float | None = None,
               run_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """kiln plan's time table: hours for the run's tokens and round numbers of tokens on 1
    and `gpus` GPUs, from `tokens_per_sec` (one GPU's), else `mfu`, else what the run in
    `run_dir` logged, else :data:`MFU`. A CPU config without a throughput gets a hint. A
    throughput is checked against the GPU's peak: the MFU it implies is shown, and one above
    :data:`MFU_PLAUSIBLE` is warned about. (lines, loud warnings)"""
    F = flops_per_token(cfg.model, cfg.data.seq_len)
    _, peak = gpu_spec(gpu, precision)
    source = None
    if tokens_per_sec is not None:
        source = f"measured {tokens_per_sec:,.0f} tokens/s per GPU (--tokens-per-sec)"
    elif mfu is None and run_dir is not None:
        logged_mfu, logged_tps = measured_throughput(run_dir)
        if logged_mfu is not None:
            mfu = logged_mfu
            source = f"MFU {mfu:.2f} measured (median in {run_dir}/metrics.jsonl)"
        elif logged_tps is not None:
            tokens_per_sec = logged_tps
            source = (f"{logged_tps:,.0f} tokens/s measured (median in {run_dir}/metrics.jsonl,"
                      " taken as one GPU's)")
    if source is None and device == "cpu":
        return ["", "# time: the config trains on CPU; pass --tokens-per-sec X (one process's "
                "measured throughput) for hours, or --gpu NAME to plan for a GPU"], []
    warnings = []
    if tokens_per_sec:
        implied = tokens_per_sec * F / peak
        source += f", MFU {implied:.2f} on a {gpu} ({precision} peak)"
        if implied > MFU_PLAUSIBLE:
            beyond = " more than the GPU's peak:" if implied > 1 else ""
            warnings.append(
                f"WARNING: {tokens_per_sec:,.0f} tokens/s per GPU means MFU {implied:.2f} on "
                f"a {gpu} ({F:.3g} FLOPs/token, {precision} peak {peak / 1e12:,.0f} TFLOP/s):"
                f"{beyond} above the {MFU_PLAUSIBLE} dense training reaches at best; check the "
                "figure (per GPU? per node? another model or sequence length?) and the --gpu")
    if source is None:
        source = (f"{gpu} dense {precision} peak {peak / 1e12:,.0f} TFLOP/s at MFU "
                  f"{mfu or MFU:.2f}" + (" (assumed)" if mfu is None else ""))
    cols = [1] + ([gpus] if gpus > 1 else [])
    out = ["", f"# time ({source}; FLOPs/token {F:.3g})",
           f"{'tokens':<26}" + "".join(f"{f'{g} GPU' + 's' * (g > 1):>22}" for g in cols)]
    rows = {run_tokens: "this run", 20 * cfg.model.num_params(): "20 tokens/param"}
    for e in (1e9, 1e10, 1e11, 1e12):
        rows.setdefault(int(e), "")
    for tokens in sorted(rows):
        label = f"{tokens:.3g}" + (f" ({rows[tokens]})" if rows[tokens] else "")
        out.append(f"{label:<26}" + "".join(
            f"{_hours_text(hours(tokens, F, g, peak, mfu or MFU, tokens_per_sec)):>22}"
            for g in cols))
    return out, warnings


def suggest_layout(cfg: Config, world: int, gpu: str, gpu_mem: float) -> str:
    """When not one instance fits a rank: the smallest tensor-parallel degree (within a node
    of 8, splitting the model) with which one does, with full activation checkpointing and
    FSDP, as OLMo-core advises (FSDP first, then TP when one instance does not fit)."""
    for tp in (2, 4, 8):
        if world % tp or tp_unsplittable(cfg.model, tp) is not None:
            continue
        fits = largest_micro_batch(cfg, gpu_mem, world, "fsdp" if world > tp else "none",
                                   "full", tp=tp)
        if fits:
            return (f"layout: not one instance fits a {gpu} this way; with --parallel.tp={tp} "
                    f"(dp {world // tp} x tp {tp}), FSDP and full activation checkpointing up to "
                    f"{fits} do")
    return (f"layout: not one instance fits a {gpu}, even with tensor parallelism up to 8 on "
            f"{world} GPUs; use more GPUs, a shorter data.seq_len or a smaller model")


def memory_lines(cfg: Config, world: int, gpu: str, device: str) -> tuple[list[str], list[str]]:
    """kiln plan's memory table: the config's setting and the alternatives (activation
    checkpointing on/off; with several ranks the other data-parallel mode), the largest
    micro-batch that fits `gpu`, the validation pass; (lines, loud warnings)."""
    gpu_mem, _ = gpu_spec(gpu)
    base = memory_estimate(cfg, world, device=device)
    dp, ac = base["dp"], base["activation_checkpointing"]
    alt_ac = "none" if ac == "full" else "full"
    columns = [(f"dp {dp}, ac {ac} (config)", dp, ac), (f"dp {dp}, ac {alt_ac}", dp, alt_ac)]
    if world > 1:
        other = "ddp" if dp in ("fsdp", "hsdp") else "fsdp"
        columns += [(f"dp {other}, ac {ac}", other, ac),
                    (f"dp {other}, ac {alt_ac}", other, alt_ac)]
    ests = [memory_estimate(cfg, world, d_, device=device, activation_checkpointing=a_)
            for _, d_, a_ in columns]
    micro, T = base["micro_batch_size"], cfg.data.seq_len
    width = max(len(c[0]) + 2 for c in columns)
    layout = f", tp {base['tp']}" if base["tp"] > 1 else ""
    out = ["", f"# memory per rank ({device}, {base['precision']}, {world} "
           f"rank{'s' * (world > 1)}{layout}, micro-batch {micro} x {T} tokens, "
           f"{base['micro_batches_per_step']} per step)",
           f"{'':<14}" + "".join(f"{c[0]:>{width}}" for c in columns)]
    for key, label in (("params", "params"), ("grads", "grads"), ("adam", "Adam"),
                       ("activations", "activations"), ("loss", "loss"),
                       ("overhead", "overhead"), ("total", "total")):
        out.append(f"{label:<14}" + "".join(f"{fmt_bytes(e[key]):>{width}}" for e in ests))
    warnings = []
    if device == "cuda":
        fits = [largest_micro_batch(cfg, gpu_mem, world, d_, a_) for _, d_, a_ in columns]
        out.append(f"{'max micro':<14}" + "".join(f"{f if f < 4096 else '4096+':>{width}}"
                                                  for f in fits)
                   + f"   (the largest micro-batch that fits one {gpu}, "
                   f"{gpu_mem / 1e9:.0f} GB)")
        if not any(fits):
            out.append(suggest_layout(cfg, world, gpu, gpu_mem))
    out += [f"note: {note}" for note in base["notes"]]
    if device == "cpu":
        out.append("note: on CPU, glibc's malloc keeps freed blocks under 32 MiB for reuse: "
                   "the process's RSS peaked 10-80% above the tensors' bytes in "
                   "docs/planning.md's runs (MALLOC_MMAP_THRESHOLD_=131072 makes RSS follow "
                   "the live tensors)")
    if cfg.data.val_paths or cfg.data.val_fraction > 0:
        out.append(f"validation pass peak  {fmt_bytes(base['eval'])} (logits of a micro-batch;"
                   " gradients are freed by then)")
        if base["eval"] > base["total"]:
            warnings.append(f"WARNING: a validation pass ({fmt_bytes(base['eval'])}) needs "
                            f"more memory than a training step ({fmt_bytes(base['total'])}): "
                            "the evaluation's full logits; lower trainer.micro_batch_size if "
                            "it does not fit")
    if device == "cuda":
        per_rank = cfg.trainer.global_batch_size // world
        divides = [m for m in range(1, fits[0] + 1) if per_rank % m == 0]
        use = (f"{divides[-1]} is the largest that divides the per-rank batch of {per_rank}"
               if divides else "")
        if fits[0] == 0:
            warnings.append(f"WARNING: not even one instance of {T} tokens fits one {gpu} with "
                            "this config; use activation checkpointing, fsdp or more GPUs")
        elif base["total"] > gpu_mem:
            warnings.append(f"WARNING: trainer.micro_batch_size={micro} does not fit one {gpu} "
                            f"(about {fmt_bytes(base['total'])} of {gpu_mem / 1e9:.0f} GB); "
                            f"the largest that fits is {fits[0]}" + (f" ({use})" if use else ""))
        else:
            out.append(f"largest micro-batch   {fits[0]} fits one {gpu}"
                       + (f" ({use})" if use else ""))
    return out, warnings


def checkpoint_lines(cfg: Config, stop: int, start: int, warmup: int, files: list
                     ) -> tuple[list[str], list[str]]:
    """kiln plan's steps, checkpoints and disk; (lines, loud warnings)."""
    from kiln import checkpoint as ckpt

    tok_bytes, tok_note = 0, ""
    if files:
        from kiln.data.build import find_tokenizer

        tok = find_tokenizer(cfg, files)
        tok_bytes = tok.stat().st_size if tok is not None and tok.is_file() else 0
    elif cfg.data.tokenizer and Path(cfg.data.tokenizer).is_file():
        tok_bytes = Path(cfg.data.tokenizer).stat().st_size
    else:
        tok_note = " (the tokenizer.json copied into each is not known yet: not counted)"
    ck = checkpoint_plan(cfg, stop, start, tok_bytes)
    c, P = cfg.checkpoint, cfg.model.num_params()
    every = (f"every {c.interval:,} steps" if c.interval else "no interval saves") + (
        " + the final one" if c.save_final else "")
    kept = f"keep_last {c.keep_last}" if c.keep_last else "all kept (keep_last 0)"
    on_disk = ck["peak"] // max(ck["size"], 1)
    why = (" (keep_last + 1: a new one is written before the oldest is pruned)"
           if c.keep_last and on_disk == c.keep_last + 1 else "")
    free, where = ckpt.free_bytes(cfg.trainer.run_dir)
    out = ["", "# steps, checkpoints and disk",
           f"steps                 {stop - start:,}"
           + (f" ({start:,} -> {stop:,})" if start else "") + f", warmup {warmup:,}",
           f"checkpoints           {ck['saves']:,} ({every}; {kept})",
           f"checkpoint size       {fmt_bytes(ck['size'])} (fp32 weights {fmt_bytes(4 * P)}, "
           f"Adam {fmt_bytes(8 * P)}, small files){tok_note}",
           f"disk at most          {fmt_bytes(ck['peak'])}: {on_disk} checkpoint"
           f"{'s' * (on_disk != 1)}{why}",
           f"free disk             {fmt_bytes(free)} in {where}"]
    warnings = []
    if ck["peak"] > free:
        warnings.append(f"WARNING: the checkpoints need about {fmt_bytes(ck['peak'])} at most "
                        f"and {where} has {fmt_bytes(free)} free: the run will stop at a save "
                        "that does not fit; free space, lower checkpoint.keep_last or move "
                        "trainer.run_dir")
    return out, warnings


def run_plan(args, overrides: list[str]) -> int:
    """`kiln plan CONFIG`: print the plan; 0 (warnings do not fail it)."""
    from kiln.config import load_run_config
    from kiln.data.remote import has_urls
    from kiln.start import plan_start

    if args.gpus < 1:
        raise KilnError(f"--gpus must be at least 1 (got {args.gpus})")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise KilnError(f"--mfu must be in (0, 1] (got {args.mfu}); 0.4 is typical")
    if args.tokens_per_sec is not None and not args.tokens_per_sec > 0:
        raise KilnError(f"--tokens-per-sec must be positive (got {args.tokens_per_sec})")
    gpu = (args.gpu or "h100").lower()
    gpu_spec(gpu)  # an unknown name is refused before anything else
    cfg = load_run_config(args.config, overrides)
    world = args.gpus
    device = "cpu" if cfg.trainer.device == "cpu" and args.gpu is None else "cuda"

    plan = plan_start(cfg)
    lines, warnings = plan_lines(cfg, world, plan=plan)
    files = []
    missing = missing_data(cfg)
    if missing:
        warnings.insert(0, missing_data_warning(missing))
        lines.append(NO_DATA_LINE)
    elif has_urls(cfg.data.train_paths()) or has_urls(cfg.data.val_paths):
        lines.append("epochs for the run    unknown (the data are URLs: kiln plan does not "
                     "fetch them; kiln train --dry-run does)")
    else:
        from kiln.data.build import build_datasets

        train, val, files = build_datasets(cfg)
        more, data_warnings = data_lines(cfg, len(train), None if val is None else len(val),
                                         sum(len(f) for f in files), len(files), plan=plan)
        lines += more
        warnings += data_warnings
    out = ["# the run", *lines]

    more, loud = memory_lines(cfg, world, gpu, device)
    out += more
    warnings += loud

    n = run_numbers(cfg, world, plan.total_steps)
    stop, start = n.stop_step, plan.step
    more, loud = time_lines(cfg, (stop - start) * n.tokens_per_step, world, gpu,
                            _compute_precision(cfg, device), device, mfu=args.mfu,
                            tokens_per_sec=args.tokens_per_sec,
                            run_dir=Path(args.config) if Path(args.config).is_dir() else None)
    out += more
    warnings += loud

    more, loud = checkpoint_lines(cfg, stop, start, n.warmup_steps, files)
    out += more
    warnings += loud
    for line in out:
        print(line)
    for w in warnings:
        print(w)
    return 0
