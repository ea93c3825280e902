"""The decoder-only transformer (OLMo / Llama family), in one readable file.

Shape comes from :class:`kiln.config.ModelConfig` and nothing else. Parameter names are a
stable format (checkpoints and Hugging Face interop rely on them)::

    embed.weight                                  [padded_vocab, d_model]
    blocks.{i}.attn_norm.{weight,bias}            (none for nonparametric_layernorm)
    blocks.{i}.attn.{q,k,v,o}_proj.{weight,bias}  (bias only when cfg.bias)
    blocks.{i}.attn.{q,k}_norm.{weight,bias}      (only when cfg.qk_norm)
    blocks.{i}.mlp_norm.{weight,bias}
    blocks.{i}.mlp.{gate,up,down}_proj.{weight,bias}
    final_norm.{weight,bias}
    lm_head.weight                                [padded_vocab, d_model] (embed.weight if tied)

Initialisation (:meth:`Transformer.init_weights`):

* the embedding and every Linear weight: truncated normal, mean 0, std ``init_std``, cut at
  +-3 std;
* the residual output projections ``o_proj`` and ``down_proj``: the same with std
  ``init_std / sqrt(2 * n_layers)`` (GPT-2): each block adds two such outputs to the residual
  stream, so this keeps its variance from growing with depth;
* biases 0, norm weights 1.

Randomness comes from torch's global RNG, so the caller seeds it. ``__init__`` only runs
``init_weights`` when not on the meta device; a model built under ``torch.device("meta")``
must be given ``to_empty(device=...)`` and then ``init_weights()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.losses import linear_cross_entropy

if TYPE_CHECKING:
    from kiln.generate import KVCache


class Norm(nn.Module):
    """rmsnorm, layernorm, or nonparametric_layernorm (no parameters at all, as OLMo-1)."""

    def __init__(self, kind: str, dim: int, eps: float):
        super().__init__()
        self.kind, self.dim, self.eps = kind, dim, eps
        if kind not in ("rmsnorm", "layernorm", "nonparametric_layernorm"):
            raise KilnError(f"unknown model.norm {kind!r}; use rmsnorm, layernorm or "
                            "nonparametric_layernorm")
        self.weight = nn.Parameter(torch.ones(dim)) if kind != "nonparametric_layernorm" else None
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rmsnorm":
            # Statistics in fp32 even under bf16 (as HF Llama/OLMo2); the weight is applied after
            # casting back.
            dtype = x.dtype
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * xf.to(dtype)
        # F.layer_norm already runs in fp32 under autocast.
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings, HF Llama/OLMo "rotate_half" layout: pairs are (i, i + hd/2).


def rope_cos_sin(head_dim: int, theta: float, length: int, device: torch.device
                 ) -> tuple[Tensor, Tensor]:
    """cos and sin tables [length, head_dim] in fp32 (bf16 angles lose position precision)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                         / head_dim)
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = t[:, None] * inv_freq[None, :]  # elementwise, so autocast cannot lower it to bf16
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, hd] by the tables [T, hd] (or [B, 1, T, hd]: per-token positions);
    computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Documents packed into one window (data.document_mask / data.document_positions)


def document_ids(tokens: Tensor, eos_id: int) -> Tensor:
    """[B, T] tokens -> [B, T] long: which document of its row each token belongs to (0, 1, ..).
    A token belongs to the document that ends at the next EOS: the EOS is the last token of its
    document and the token after it starts the next one (an exclusive cumsum of the EOS flags).
    """
    is_eos = (tokens == eos_id).long()
    return is_eos.cumsum(1) - is_eos


def document_positions(doc_ids: Tensor) -> Tensor:
    """[B, T] document ids -> [B, T] long: each token's index inside its document, i.e. RoPE
    positions that restart at 0 where a document starts. The row's first document (which may
    have begun before the window) also counts from 0 at the window's first token."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(first, idx, 0).cummax(1).values  # start index of each token's document
    return idx - start


def document_mask(doc_ids: Tensor) -> Tensor:
    """[B, T] document ids -> [B, 1, T, T] bool attention mask (True = may attend): causal and
    within the same document. It costs B * T * T bytes (0.5 GiB for 32 windows of 4096)."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril_()
    return (doc_ids[:, :, None] == doc_ids[:, None, :]).logical_and_(causal)[:, None]


@dataclass
class ContextShard:
    """This rank's part of every training window under context parallelism (parallel.cp = N):
    the window's T tokens are cut into 2N chunks and rank r takes chunks r and 2N-1-r, one
    early and one late, so that causal attention costs every rank the same.

    ``index`` [T / N]: the window positions of this rank's tokens; ``keys`` [T]: the window
    positions of the keys and values gathered from the group, in the order the gather puts
    them (rank 0's tokens, rank 1's, ...)."""

    group: Any
    index: Tensor
    keys: Tensor

    @classmethod
    def of(cls, group, rank: int, size: int, seq_len: int, device) -> ContextShard:
        chunk = seq_len // (2 * size)

        def mine(r: int) -> Tensor:
            return torch.cat([torch.arange(r * chunk, (r + 1) * chunk),
                              torch.arange((2 * size - 1 - r) * chunk, (2 * size - r) * chunk)])

        keys = torch.cat([mine(r) for r in range(size)])
        return cls(group, mine(rank).to(device), keys.to(device))

    def mask(self, doc_ids: Tensor | None) -> Tensor:
        """[B | 1, 1, T_local, T] bool: causal at window positions (and, given the full
        window's doc_ids [B, T], within each document)."""
        allowed = self.keys[None, :] <= self.index[:, None]
        if doc_ids is None:
            return allowed[None, None]
        same = doc_ids[:, self.index][:, :, None] == doc_ids[:, self.keys][:, None, :]
        return (same & allowed)[:, None]


class _GatherTokens(torch.autograd.Function):
    """[B, H, T_local, hd] -> [B, H, T, hd]: every rank's tokens of a context-parallel group,
    in rank order; the backward sums the gradients over the group and keeps this rank's."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.size(2)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, :, ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def _local(x: Tensor) -> Tensor:
    """This rank's part of a DTensor (tensor parallelism); a plain tensor as it is."""
    return x.to_local() if hasattr(x, "to_local") else x


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, kv_heads, T, hd] -> [B, kv_heads * n_rep, T, hd]; query head h uses kv head h//n_rep."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


# --------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        # OLMo-2 normalises the whole q / k projection (all heads together), not each head.
        self.q_norm = Norm(cfg.norm, q_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = Norm(cfg.norm, kv_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                kv: tuple[Tensor, Tensor] | None = None, start: int = 0,
                doc_mask: Tensor | None = None, cp_group=None) -> Tensor:
        """kv: this layer's (k, v) cache buffers [B, kv_heads, max_len, hd]; the new keys and
        values are written at positions [start, start + T) and attention sees [0, start + T).
        doc_mask: [B, 1, T, T] bool from :func:`document_mask` (no cache), replacing the plain
        causal mask. cp_group (context parallelism): the queries are this rank's tokens, the
        keys and values are gathered from every rank of the group, and doc_mask is the
        [B | 1, 1, T_local, T] mask at the tokens' window positions (:class:`ContextShard`)."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:  # (under tensor parallelism: over every rank's heads)
            q, k = _local(self.q_norm(q)), _local(self.k_norm(k))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cp_group is not None:  # every rank's keys and values (rotated at their positions)
            k, v = _GatherTokens.apply(k, cp_group), _GatherTokens.apply(v, cp_group)

        mask, causal = None, True
        if doc_mask is not None:
            # Causal AND same document, as an explicit SDPA mask: correct on every device, but
            # it materialises [B, 1, T, T] and keeps CUDA off the flash kernel. NOTE: a faster
            # CUDA path would plug in here: flex_attention with a document BlockMask, or
            # flash-attn's varlen kernel with cu_seqlens from the EOS positions; both skip the
            # masked-out blocks. Not built (it needs a GPU to test).
            mask, causal = doc_mask, False
        if kv is not None:
            k_buf, v_buf = kv
            k_buf[:, :, start:start + T] = k
            v_buf[:, :, start:start + T] = v
            k = k_buf[:, :, :start + T].to(q.dtype)
            v = v_buf[:, :, :start + T].to(q.dtype)
            if start > 0:
                causal = False
                if T > 1:
                    # SDPA's is_causal aligns the mask top-left, which is wrong when the queries
                    # are the last T of start + T keys: query i may see keys 0 .. start + i.
                    qpos = torch.arange(start, start + T, device=x.device)
                    mask = torch.arange(start + T, device=x.device)[None, :] <= qpos[:, None]
        rep = self.n_heads // self.kv_heads
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden_size, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.hidden_size, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.reordered = cfg.norm_placement == "reordered"
        self.attn_norm = Norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                kv: tuple[Tensor, Tensor] | None = None, start: int = 0,
                doc_mask: Tensor | None = None, cp_group=None) -> Tensor:
        if self.reordered:  # OLMo-2: norm the sublayer's output before adding it
            h = x + self.attn_norm(self.attn(x, cos, sin, kv, start, doc_mask, cp_group))
            return h + self.mlp_norm(self.mlp(h))
        h = x + self.attn(self.attn_norm(x), cos, sin, kv, start, doc_mask, cp_group)
        return h + self.mlp(self.mlp_norm(h))


# --------------------------------------------------------------------------------------------
# The model


def _trunc_normal(weight: Tensor, std: float) -> None:
    """Truncated normal init. A sharded (DTensor) weight is drawn whole on the CPU, one tensor
    at a time, and each rank keeps its shard: a sharded model gets exactly the weights a
    single-process run with the same seed gets, and never holds more than one full tensor."""
    if hasattr(weight, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = torch.empty(weight.shape, dtype=weight.dtype)
        nn.init.trunc_normal_(full, 0.0, std, -3 * std, 3 * std)
        shard = distribute_tensor(full.to(weight.device_mesh.device_type), weight.device_mesh,
                                  weight.placements)
        weight.copy_(shard)
        return
    if weight.device.type != "cpu":  # same numbers on every device: draw on the CPU
        full = torch.empty(weight.shape, dtype=weight.dtype)
        nn.init.trunc_normal_(full, 0.0, std, -3 * std, 3 * std)
        weight.copy_(full)
        return
    nn.init.trunc_normal_(weight, 0.0, std, -3 * std, 3 * std)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = Norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        # No bias on the head: it would be a vocab-sized parameter ModelConfig does not count.
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self._tie()
        # cos/sin tables: a plain attribute, not a buffer, so they stay out of state_dict and
        # are not turned into uninitialised memory by to_empty(); rebuilt lazily in _rope().
        self._rope_cache: tuple[Tensor, Tensor] | None = None
        self.tp_mesh = None  # set by kiln.parallel.apply_tp: the head works on vocab shards
        self.cp_mesh = None  # set by kiln.parallel.parallelize: context parallelism
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    def _tie(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _apply(self, fn, *args, **kwargs):
        # Module._apply (behind .to(), .cuda(), to_empty()) may replace each Parameter with a new
        # one per module, which silently unties lm_head from embed; tie them again afterwards.
        super()._apply(fn, *args, **kwargs)
        self._tie()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """The scheme in the module docstring. Safe to call after to_empty() from meta."""
        self._tie()
        self._rope_cache = None
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        _trunc_normal(self.embed.weight, std)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if m.weight is self.embed.weight:
                    continue  # tied head: already initialised as the embedding
                s = out_std if name.endswith(("o_proj", "down_proj")) else std
                _trunc_normal(m.weight, s)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Norm):
                m.reset_parameters()

    def num_params(self) -> int:
        """Parameters, tied ones counted once (parameters() de-duplicates)."""
        return sum(p.numel() for p in self.parameters())

    def _rope(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        c = self._rope_cache
        if c is None or c[0].device != device or c[0].shape[0] < length:
            n = max(length, self.cfg.max_seq_len)
            c = self._rope_cache = rope_cos_sin(self.cfg.head_dim, self.cfg.rope_theta, n, device)
        return c

    def forward(self, tokens: Tensor, cache: KVCache | None = None, *,
                targets: Tensor | None = None, z_loss: float = 0.0, per_token: bool = False,
                doc_ids: Tensor | None = None, positions: Tensor | None = None,
                logits_at: Tensor | None = None, cp: ContextShard | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        """tokens [B, T] -> logits [B, T, padded_vocab_size]. With a cache, the tokens sit at
        positions cache.length ..; their keys/values are appended and cache.length advances.

        With targets [B, T] (training) it returns ``(loss, ce)`` (with ``per_token``, also
        each token's cross entropy) from :func:`kiln.losses.linear_cross_entropy` instead,
        which never makes the full logits.
        The loss is computed here, inside forward, so that DDP / FSDP2 hooks see it and the
        head's weight is the gathered one.

        Packed documents (training windows, no cache): ``doc_ids`` [B, T] (from
        :func:`document_ids`) keeps attention inside each document (causal AND same id);
        ``positions`` [B, T] (e.g. :func:`document_positions`, each in [0, max_seq_len)) gives
        every token its own RoPE position instead of 0 .. T-1. Either may be given alone.

        ``logits_at`` [K] (indices into the B*T flattened positions) returns only those
        positions' logits [K, padded_vocab_size]: evaluation scores a few continuation tokens
        per sequence and skips the output layer everywhere else.

        ``cp`` (context parallelism, training): ``tokens``, ``targets`` and ``positions`` are
        this rank's tokens of each window (:class:`ContextShard`), ``doc_ids`` the whole
        window's; attention sees the whole window."""
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise KilnError(f"sequence of {start + T} tokens is longer than model.max_seq_len="
                            f"{self.cfg.max_seq_len}; shorten the input or raise max_seq_len")
        if cache is not None:
            if doc_ids is not None or positions is not None:
                raise KilnError("doc_ids / positions are for training windows; generation with "
                                "a KV cache runs unmasked: pass neither with a cache")
            cache.check(B, start + T)
        for name, t in (("doc_ids", doc_ids if cp is None else None), ("positions", positions)):
            if t is not None and t.shape != tokens.shape:
                raise KilnError(f"{name} has shape {list(t.shape)}, tokens {list(tokens.shape)}; "
                                "they must match")
        if cp is not None and positions is None:
            positions = cp.index.expand(B, T)  # the tokens' places in the window
        cos, sin = self._rope(start + max(T, self.cfg.max_seq_len if cp else 0), tokens.device)
        if positions is None:
            cos, sin = cos[start:start + T], sin[start:start + T]
        else:  # gather each token's row of the tables: [B, T, hd] -> [B, 1, T, hd] (all heads)
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        if cp is not None:
            doc_mask = cp.mask(doc_ids)
        else:
            doc_mask = document_mask(doc_ids) if doc_ids is not None else None
        group = cp.group if cp is not None else None
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache.layer(i) if cache is not None else None, start,
                      doc_mask, group)
        if cache is not None:
            cache.length = start + T
        x = self.final_norm(x)
        if self.tp_mesh is not None:
            return self._vocab_parallel_head(x, targets, z_loss, per_token, logits_at)
        if targets is not None:
            return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight,
                                        targets.reshape(-1), z_loss=z_loss,
                                        per_token=per_token)
        if logits_at is not None:
            return self.lm_head(x.flatten(0, 1)[logits_at])
        return self.lm_head(x)

    def _vocab_parallel_head(self, x: Tensor, targets: Tensor | None, z_loss: float,
                             per_token: bool, logits_at: Tensor | None):
        """The output layer under tensor parallelism: `x` is this rank's slice of the tokens
        (sequence parallel), the head's weight its slice of the vocabulary. The tokens are
        gathered, and the loss is computed over the vocabulary shards (the logits are gathered
        only when asked for)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        from kiln.losses import vocab_parallel_cross_entropy

        mesh = self.tp_mesh
        full = DTensor.from_local(x, mesh, [Shard(1)]).redistribute(mesh, [Replicate()])
        h = full.to_local().flatten(0, 1)
        w = _local(self.lm_head.weight)
        if targets is not None:
            return vocab_parallel_cross_entropy(
                h, w, targets.reshape(-1), mesh.get_group(), mesh.get_local_rank() * w.size(0),
                z_loss=z_loss, per_token=per_token)
        if logits_at is not None:
            h = h[logits_at]
        local = F.linear(h, w)
        logits = DTensor.from_local(local, mesh, [Shard(-1)]).full_tensor()
        return logits if logits_at is not None else logits.view(*x.shape[:1], -1,
                                                                 logits.size(-1))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM formula used for MFU:

    ``6 * N + 6 * d_model * padded_vocab + 12 * n_layers * d_model * seq_len``

    N is the non-embedding parameter count: each weight does a multiply-add (2 FLOPs) per token
    forward and twice that backward. The lm_head is counted separately because its matmul is
    real work even when its weight is tied to the (lookup-only) embedding. The last term is the
    attention scores and weighted sum (QK^T and AV, 2 * 2 * d_model * seq_len per layer forward,
    x3 for backward), over the full seq_len as PaLM does (causal masking is not discounted).
    """
    n = cfg.num_params(include_embeddings=False)
    head = cfg.d_model * cfg.padded_vocab_size
    return float(6 * n + 6 * head + 12 * cfg.n_layers * cfg.d_model * seq_len)
