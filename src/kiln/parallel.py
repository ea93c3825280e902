"""Scaling out, applied from outside the model: process groups, meshes, DDP / FSDP2 / HSDP,
activation checkpointing and torch.compile.

``parallelize(model, ...)`` takes a plain :class:`kiln.model.Transformer` (possibly on the meta
device) and returns the module to train; the model code never knows it is distributed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from kiln.config import Config, ParallelConfig
from kiln.errors import KilnError, quiet_loggers, warn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    tp: int = 1
    """Ranks per tensor-parallel group: consecutive ranks, which see the same batch."""
    cp: int = 1
    """Ranks per context-parallel group (each takes its part of the same windows)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: how many ways each global batch is split."""
        return self.world_size // (self.tp * self.cp)

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.cp)

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp


def dist_info_from_env() -> DistInfo:
    """Rank and world size as torchrun sets them (WORLD_SIZE, RANK, LOCAL_RANK, ...)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return DistInfo(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")),
                    int(env.get("LOCAL_WORLD_SIZE", str(world))))


def check_layout(cfg: Config, world_size: int | None) -> None:
    """Refuse, in one line and before any weight is built, a layout that cannot split the
    model or (given `world_size`, the processes launched) the ranks."""
    pc, m = cfg.parallel, cfg.model
    tp, cp = pc.tp, pc.cp
    if cp > 1:
        if cfg.data.seq_len % (2 * cp):
            raise KilnError(f"parallel.cp={cp} splits each window into {2 * cp} chunks, and "
                            f"data.seq_len={cfg.data.seq_len} is not a multiple of {2 * cp}; "
                            "choose a seq_len that is")
        if pc.dp in ("ddp", "none"):
            raise KilnError(f"parallel.cp={cp} averages the gradients over its ranks with FSDP: "
                            f"set parallel.dp=fsdp or hsdp (not {pc.dp})")
        if world_size is not None and world_size % (cp * tp):
            raise KilnError(f"parallel.cp={cp} x parallel.tp={tp} does not divide the "
                            f"{world_size} processes launched; launch dp x cp x tp ranks")
    if tp == 1:
        return
    if (unsplit := tp_unsplittable(m, tp)) is not None:
        raise KilnError(f"parallel.tp={tp} cannot split {unsplit}; choose a tp that divides it")
    if pc.dp == "ddp":
        raise KilnError(f"parallel.tp={tp} combines with parallel.dp=fsdp or hsdp (2-D / 3-D), "
                        "not ddp; set parallel.dp=fsdp")
    if world_size is not None and world_size % tp:
        raise KilnError(f"parallel.tp={tp} does not divide the {world_size} processes launched; "
                        f"launch a multiple of {tp} (dp x tp ranks)")
    if pc.dp == "none" and world_size is not None and world_size != tp:
        raise KilnError(f"parallel.dp=none with parallel.tp={tp} needs exactly {tp} processes, "
                        f"not {world_size}; set parallel.dp=fsdp for dp x tp")


def tp_unsplittable(m, tp: int) -> str | None:
    """What of model config `m` tensor parallelism over `tp` ranks cannot split evenly ("WHAT
    = N"), or None when it splits everything."""
    for what, n in (("model.n_heads", m.n_heads), ("the kv heads (model.n_kv_heads)",
                    m.kv_heads), ("the MLP width (model.hidden_size)", m.hidden_size),
                    ("the padded vocabulary", m.padded_vocab_size)):
        if n % tp:
            return f"{what} = {n}"
    return None


def init_distributed(cfg: Config, device: torch.device) -> DistInfo:
    """Join the process group torchrun prepared (NCCL on CUDA, gloo on CPU)."""
    info = dist_info_from_env()
    info.tp, info.cp = cfg.parallel.tp, cfg.parallel.cp
    check_layout(cfg, info.world_size)
    if not info.enabled:
        return info
    if cfg.parallel.dp == "none" and info.tp != info.world_size:
        raise KilnError(f"{info.world_size} processes were launched but parallel.dp=none; set "
                        "parallel.dp to ddp, fsdp or hsdp (or auto)")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.parallel.timeout_minutes))
    return info


def pick_device(name: str) -> torch.device:
    """trainer.device resolved: auto is CUDA when there is one."""
    return parse_device(name, "trainer.device=")


def parse_device(text: str | None, flag: str = "--device ") -> torch.device:
    """The device a setting names (None or "auto": CUDA when there is one), refused in one
    line when it is not a device or not on this machine; `flag` is how the user wrote the
    setting, up to its value ("--device ", "trainer.device=")."""
    if text is None or text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise KilnError(f"{flag}{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KilnError(f"{flag}{text} but no CUDA device is visible; use {flag}cpu")
        if dev.index is not None and dev.index >= count:
            raise KilnError(f"{flag}{text} but this machine has {count} CUDA device(s) "
                            f"(cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":
        raise KilnError(f"{flag}{text}: kiln runs on cpu or cuda; use one of them")
    return dev


def resolve_dp(pcfg: ParallelConfig, info: DistInfo) -> str:
    if pcfg.dp == "auto":
        if info.cp > 1:
            return "fsdp"
        if info.tp > 1:
            return "fsdp" if info.dp_size > 1 else "none"
        return "ddp" if info.enabled else "none"
    return pcfg.dp


def build_mesh(dp: str, pcfg: ParallelConfig, info: DistInfo, device: torch.device):
    """The device mesh: data-parallel dimensions ("replicate", "shard": hsdp; "shard": fsdp),
    then "cp", then "tp" (innermost: a tensor-parallel group is consecutive ranks)."""
    from torch.distributed.device_mesh import init_device_mesh

    dims: list[tuple[str, int]] = []
    if dp == "hsdp":
        shard = pcfg.shard_size or max(info.local_world_size // info.tp, 1)
        if info.dp_size % shard:
            raise KilnError(f"parallel.shard_size={shard} does not divide the {info.dp_size} "
                            "data-parallel ranks")
        dims = [("replicate", info.dp_size // shard), ("shard", shard)]
    elif dp == "fsdp":
        dims = [("shard", info.dp_size)]
    if info.cp > 1:
        dims.append(("cp", info.cp))
    if info.tp > 1:
        dims.append(("tp", info.tp))
    return init_device_mesh(device.type, tuple(n for _, n in dims),
                            mesh_dim_names=tuple(name for name, _ in dims))


def apply_activation_checkpointing(model: nn.Module, pcfg: ParallelConfig) -> None:
    """Recompute activations in the backward pass instead of keeping them: every block's
    (full), every n-th block's (every_n), or in every block only the cheap ones (selective:
    the outputs of matmuls and attention are kept, the pointwise ops between them, norms,
    RoPE, SiLU, products, are recomputed)."""
    mode = pcfg.activation_checkpointing
    if mode in ("none", "budget"):  # budget: torch.compile's partitioner (apply_compile)
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs = {}
    if mode == "selective":
        from functools import partial

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_matmuls)
    every = max(pcfg.ac_every, 1) if mode == "every_n" else 1
    for i, block in enumerate(model.blocks):
        if i % every == 0:
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)


@functools.cache
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective activation checkpointing's policy: keep what a matmul or attention kernel
    made (expensive to redo), recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    return (CheckpointPolicy.MUST_SAVE if op in _saved_ops()
            else CheckpointPolicy.PREFER_RECOMPUTE)


def wants_compile(pcfg, device: torch.device) -> bool:
    """parallel.compile resolved: auto compiles on CUDA only."""
    return device.type == "cuda" if pcfg.compile == "auto" else bool(pcfg.compile)


class CompileWatch:
    """With compiled blocks: say how long the first step took (compiling), and warn once when
    a later step compiles again (a shape or guard that changes recompiles every time, silently
    slowing the run)."""

    def __init__(self, enabled: bool, start_step: int, note):
        self.enabled, self.start_step, self.note = enabled, start_step, note
        self.warned = False

    @contextmanager
    def around(self, step: int):
        """Wrap the train step that ends at `step` + 1."""
        if not self.enabled:
            yield
            return
        import time

        from torch._dynamo.utils import counters

        graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        yield
        new = counters["stats"]["unique_graphs"] - graphs
        if step == self.start_step:
            self.note(f"torch.compile: the first step took {time.perf_counter() - t0:.1f} s, "
                      f"compiling {new} graph(s)")
        elif new and step >= self.start_step + 2 and not self.warned:
            self.warned = True
            warn(f"torch.compile compiled {new} new graph(s) in step {step + 1}: something in "
                 "the step changes shape or type; every recompilation costs the first step's "
                 "time again (TORCH_LOGS=recompiles shows why)")


def apply_compile(model: nn.Module, memory_budget: float = 1.0) -> None:
    """Compile each block on its own: small graphs, one compilation reused by every layer.
    `memory_budget` (activation_checkpointing=budget) is the fraction of what a compiled block
    saves for its backward pass that the partitioner may keep; it recomputes the rest,
    cheapest first."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    if functorch_config.activation_memory_budget != memory_budget:
        # read when a graph is compiled: graphs compiled under another budget are dropped
        torch._dynamo.reset()
        functorch_config.activation_memory_budget = memory_budget
    for block in model.blocks:
        block.compile(dynamic=False)


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype | None,
               reduce_dtype: torch.dtype) -> None:
    """FSDP2: shard each block, then the rest (embedding, final norm, head) at the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def apply_tp(model: nn.Module, mesh) -> None:
    """Tensor parallelism over `mesh` (1-D, the "tp" ranks), with PyTorch's DTensor plans:
    q/k/v and gate/up column-wise (each rank its heads and its slice of the MLP width), o and
    down row-wise, the embedding and output head split by vocabulary, and the norms (and the
    residual stream between blocks) sequence-parallel: each rank holds its slice of the
    tokens there. The output head and the loss work on the vocabulary shards
    (kiln.losses.vocab_parallel_cross_entropy): the full logits are never gathered."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = mesh.size()
    tied = model.cfg.tie_embeddings
    parallelize_module(model, mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "final_norm": SequenceParallel(use_local_output=True),
    })
    if tied:
        model._tie()  # the head is the (now vocabulary-sharded) embedding
    else:
        model.lm_head.weight = nn.Parameter(distribute_tensor(model.lm_head.weight, mesh,
                                                              [Shard(0)]))
    qk = model.cfg.qk_norm
    # a sublayer takes the whole sequence (gathered); attention's other inputs (RoPE tables,
    # KV cache, start, document mask) as they are
    gathered = dict(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                    use_local_output=False)
    rest = (None,) * 6
    gathered_attn = dict(input_layouts=(Shard(1), *rest),
                         desired_input_layouts=(Replicate(), *rest), use_local_output=False)
    for block in model.blocks:
        parallelize_module(block, mesh, {
            "attn_norm": SequenceParallel(use_local_output=True),
            "mlp_norm": SequenceParallel(use_local_output=True),
            "attn": PrepareModuleInput(**gathered_attn),
            "attn.q_proj": ColwiseParallel(use_local_output=not qk),
            "attn.k_proj": ColwiseParallel(use_local_output=not qk),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp": PrepareModuleInput(**gathered),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
        attn = block.attn
        attn.n_heads, attn.kv_heads = attn.n_heads // tp, attn.kv_heads // tp  # this rank's
        for norm in (attn.q_norm, attn.k_norm):  # over all heads: each rank its slice
            if norm is not None:
                for name in ("weight", "bias"):
                    t = getattr(norm, name)
                    if t is not None:
                        setattr(norm, name, nn.Parameter(distribute_tensor(t, mesh,
                                                                           [Shard(0)])))
    model.tp_mesh = mesh


def check_device_settings(cfg: Config, device: torch.device) -> None:
    """Refuse, in one line, what cannot run on `device`: budget activation checkpointing
    without torch.compile, float8 training without torchao or on a GPU without float8
    matmuls."""
    if cfg.parallel.activation_checkpointing == "budget" and not wants_compile(cfg.parallel,
                                                                               device):
        why = "it is off" if cfg.parallel.compile is False else "auto compiles on CUDA only"
        raise KilnError("parallel.activation_checkpointing=budget works through torch.compile, "
                        f"and {why}: set parallel.compile=true (or choose selective or full)")
    if not cfg.parallel.float8:
        return
    if importlib.util.find_spec("torchao") is None:
        raise KilnError("parallel.float8 needs torchao: pip install -e '.[float8]' (or "
                        "--parallel.float8=false)")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise KilnError(f"parallel.float8 needs a GPU with float8 matmuls (compute capability "
                        f"8.9+: H100, H200, B200, L40S); {name} has none: "
                        "--parallel.float8=false")


def apply_float8(model: nn.Module, device: torch.device, fsdp: bool) -> None:
    """torchao's float8 training on the blocks' linear layers: dynamic per-tensor scales,
    float8 all-gather of the weights under FSDP2; the output head (and any layer whose sizes
    are not multiples of 16, which float8 matmuls need) stays as it is. Emulated on CPU."""
    # quiet while importing: its optional CUDA kernels fail to load on a CPU machine, and it
    # registers types torch's pytree warns about
    with quiet_loggers("torchao", "torch.utils._pytree"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    emulate = device.type != "cuda"
    config = Float8LinearConfig(emulate=emulate,
                                enable_fsdp_float8_all_gather=fsdp and not emulate)

    def wanted(module: nn.Module, fqn: str) -> bool:
        return (fqn.startswith("blocks.") and module.in_features % 16 == 0
                and module.out_features % 16 == 0)

    convert_to_float8_training(model, config=config, module_filter_fn=wanted)


def parallelize(model: nn.Module, cfg: Config, info: DistInfo, device: torch.device,
                precision: str) -> tuple[nn.Module, str]:
    """Apply float8, TP, AC, compile and data parallelism. Returns (module to train, dp mode
    used)."""
    pcfg = cfg.parallel
    dp = resolve_dp(pcfg, info)
    if pcfg.float8:  # (check_device_settings refused where it cannot run, before the data)
        apply_float8(model, device, dp in ("fsdp", "hsdp"))
    mesh = build_mesh(dp, pcfg, info, device) if dp in ("fsdp", "hsdp") or info.tp > 1 else None
    if info.tp > 1:
        apply_tp(model, mesh["tp"])
    if info.cp > 1:
        model.cp_mesh = mesh["cp"]
    apply_activation_checkpointing(model, pcfg)
    if wants_compile(pcfg, device):
        budget = pcfg.activation_checkpointing == "budget"
        apply_compile(model, pcfg.ac_budget if budget else 1.0)
    if dp in ("fsdp", "hsdp"):
        # the gradients are averaged over the context-parallel ranks too: they shard with dp
        shard = mesh["shard", "cp"]._flatten("shard_cp") if info.cp > 1 else mesh["shard"]
        dp_mesh = shard if dp == "fsdp" else mesh["replicate", shard.mesh_dim_names[0]]
        bf16 = precision == "bf16" and pcfg.param_dtype != "fp32"
        apply_fsdp(model, dp_mesh, torch.bfloat16 if bf16 else None, torch.float32)
        return model, dp
    if dp == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids), dp
    return model, dp


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return getattr(model, "module", model)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
