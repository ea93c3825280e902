"""Fused, chunked output layer + cross entropy: the training loss without the full logits.

The plain path (trainer.fused_loss=false) computes ``logits = hidden @ weight.T`` for all N tokens,
upcasts them to fp32 and takes ``F.cross_entropy`` (plus kiln's z-loss,
``z_loss * mean(logsumexp(logits) ** 2)``). Autograd then keeps, for the backward pass, the
logits in the compute dtype and their fp32 copy, and the backward makes a softmax and a
gradient of the same size: several ``N x V`` tensors. With N = 8 x 2048 tokens and V = 50304
one fp32 ``N x V`` tensor is 3.1 GiB.

:func:`linear_cross_entropy` walks the tokens in chunks of ``chunk_size``. For each chunk it
makes the logits (``chunk x V``, in the compute dtype: bf16 under autocast), their fp32 copy,
the loss terms, and right away the gradient of the loss with respect to those logits,

    d loss / d logits = (softmax * (1 + 2 * z_loss * lse) - onehot(target)) / N,

which it multiplies out into the gradient for the chunk's hidden states (``chunk x d``) and
adds into the gradient for the weight (``V x d``, kept in fp32). The chunk's logits are then
dropped. What stays for the backward pass is ``grad_hidden`` [N, d] and ``grad_weight``
[V, d], the size of the inputs themselves; backward only scales them by the incoming
gradient. Peak extra memory is about two chunks of logits (fp32 copy + compute-dtype grad)
plus one fp32 ``V x d`` buffer, independent of N. The default chunk (:data:`CHUNK_BYTES`)
keeps one fp32 chunk of logits near 128 MiB: 667 tokens for V = 50304, 261 for V = 128256,
and never fewer than 64 tokens, so the matmuls stay big enough to run at full speed.

The arithmetic is the plain path's: logits in the compute dtype, softmax math in fp32, mean
over tokens (fp64 inputs keep fp64 throughout). kiln has no ignore index (every target is a
real token), so neither has this.
Double backward is not supported (nothing in kiln needs it).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BYTES = 128 * 2**20
"""Default chunk: as many tokens as make one fp32 chunk of logits about this big."""


def default_chunk_size(vocab: int) -> int:
    return max(64, CHUNK_BYTES // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, z_loss: float,
                chunk_size: int, grad_enabled: bool) -> tuple[Tensor, Tensor, Tensor]:
        dev = hidden.device.type
        dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                 else torch.promote_types(hidden.dtype, weight.dtype))
        # (forward runs under no_grad, and needs_input_grad ignores the caller's grad mode)
        need_h, need_w = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        acc = torch.promote_types(dtype, torch.float32)  # softmax math and sums: fp32 or fp64
        n = hidden.size(0)
        w = weight.to(dtype)
        ce_tok = torch.empty(n, dtype=acc, device=hidden.device)  # per token, for logging
        z_sum = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        # equal chunks (2048 tokens by 667 would leave a slow 47-token tail), and one logits
        # buffer reused by every chunk instead of a fresh [chunk, V] allocation each time
        chunk_size = -(-n // -(-n // chunk_size))
        buf = torch.empty(min(n, chunk_size), w.size(0), dtype=acc, device=hidden.device)
        with torch.autocast(dev, enabled=False):
            for start in range(0, n, chunk_size):
                h = hidden[start:start + chunk_size].to(dtype)
                t = targets[start:start + chunk_size]
                logits = buf[:h.size(0)]
                if dtype == acc:
                    torch.mm(h, w.t(), out=logits)
                else:
                    logits.copy_(h @ w.t())
                target_logit = logits.gather(1, t[:, None]).squeeze(1)
                # logsumexp by hand, so the same chunk turns into the softmax in place
                m = logits.amax(dim=-1, keepdim=True)
                e = logits.sub_(m).exp_()
                s = e.sum(dim=-1)
                lse = m.squeeze(1) + s.log()
                ce_tok[start:start + chunk_size] = lse - target_logit
                if z_loss > 0:
                    z_sum += (lse * lse).sum()
                if not (need_h or need_w):
                    continue
                # d loss / d logits = (softmax * (1 + 2 z lse) - onehot) / n
                grad = e.mul_(((1 + 2 * z_loss * lse) / (n * s))[:, None])
                grad.scatter_add_(1, t[:, None], grad.new_full((t.numel(), 1), -1 / n))
                grad = grad.to(dtype)
                if need_h:
                    grad_h[start:start + chunk_size] = grad @ w
                if need_w and grad_w.dtype == dtype:
                    grad_w.addmm_(grad.t(), h)
                elif need_w:
                    grad_w += grad.t() @ h
        return _finish(ctx, ce_tok, z_sum, z_loss, grad_h,
                       grad_w.to(weight.dtype) if need_w else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_ce: Tensor, _grad_tok: Tensor):
        return (*_scaled(ctx, grad_loss), None, None, None, None)


def _finish(ctx, ce_tok: Tensor, z_sum: Tensor, z_loss: float, grad_h: Tensor | None,
            grad_w: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ce, per-token ce) from the per-token terms; the gradients kept for backward."""
    n = ce_tok.numel()
    ce = ce_tok.sum() / n
    loss = ce + z_loss * (z_sum / n) if z_loss > 0 else ce.clone()
    ctx.save_for_backward(grad_h, grad_w)
    ctx.mark_non_differentiable(ce, ce_tok)
    return loss, ce, ce_tok


def _scaled(ctx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The kept gradients of the hidden states and the head, times the incoming gradient."""
    grad_h, grad_w = ctx.saved_tensors
    gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
    gw = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
    return gh, gw


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                         z_loss: float = 0.0, chunk_size: int | None = None,
                         per_token: bool = False) -> tuple[Tensor, ...]:
    """``(loss, ce)`` of ``logits = hidden @ weight.T`` against ``targets``, never holding the
    logits of more than ``chunk_size`` tokens (default :func:`default_chunk_size`).

    hidden [N, d] (the final hidden states, tokens flattened; any strides), weight [V, d] (the
    lm_head weight, tied to the embedding or not), targets [N] (int64 token ids).
    ``ce`` is the mean cross entropy (fp32, no grad: for logging), ``loss`` is
    ``ce + z_loss * mean(logsumexp(logits) ** 2)`` (the same tensor value as ``ce`` when
    z_loss is 0): exactly the plain path's pair before its loss_norm scaling. With
    ``per_token`` a third tensor [N] holds each token's cross entropy (no grad: for logging
    per source of a mixture).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, d] and targets [N]; got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    if hidden.size(0) == 0:
        raise ValueError("linear_cross_entropy needs at least one token")
    chunk = chunk_size if chunk_size is not None else default_chunk_size(weight.size(0))
    loss, ce, tok = _LinearCrossEntropy.apply(hidden, weight, targets, float(z_loss),
                                              max(1, chunk), torch.is_grad_enabled())
    return (loss, ce, tok) if per_token else (loss, ce)


# --------------------------------------------------------------------------------------------
# Over vocabulary shards (tensor parallelism)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The same fused, chunked loss with the head split by vocabulary over a process group:
    each rank holds ``weight`` rows [start, start + V_local) and every rank the same hidden
    states and targets. Per chunk the softmax's max, its sum and the target's logit are
    combined over the group (three all-reduces of one number per token); the gradient for the
    hidden states is each rank's part, summed over the group once at the end. The loss and
    every gradient are those of the unsplit loss, to the order of the sums."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, group, start: int,
                z_loss: float, chunk_size: int, grad_enabled: bool):
        import torch.distributed as dist

        dev = hidden.device.type
        dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                 else torch.promote_types(hidden.dtype, weight.dtype))
        need_h, need_w = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        acc = torch.promote_types(dtype, torch.float32)
        n, v_local = hidden.size(0), weight.size(0)
        w = weight.to(dtype)
        ce_tok = torch.empty(n, dtype=acc, device=hidden.device)
        z_sum = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h \
            else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        chunk_size = -(-n // -(-n // chunk_size))
        with torch.autocast(dev, enabled=False):
            for lo in range(0, n, chunk_size):
                h = hidden[lo:lo + chunk_size].to(dtype)
                local_t = targets[lo:lo + chunk_size] - start
                mine = (local_t >= 0) & (local_t < v_local)
                idx = local_t.clamp(0, v_local - 1)[:, None]
                logits = (h @ w.t()).to(acc)
                target_logit = torch.where(mine, logits.gather(1, idx).squeeze(1), 0)
                m = logits.amax(dim=-1)
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
                e = logits.sub_(m[:, None]).exp_()
                s = e.sum(dim=-1)
                dist.all_reduce(s, group=group)
                dist.all_reduce(target_logit, group=group)
                lse = m + s.log()
                ce_tok[lo:lo + chunk_size] = lse - target_logit
                if z_loss > 0:
                    z_sum += (lse * lse).sum()
                if not (need_h or need_w):
                    continue
                grad = e.mul_(((1 + 2 * z_loss * lse) / (n * s))[:, None])
                grad.scatter_add_(1, idx, torch.where(mine, -1 / n, 0.0)[:, None].to(acc))
                grad = grad.to(dtype)
                if need_h:
                    grad_h[lo:lo + chunk_size] = grad @ w
                if need_w:
                    grad_w += grad.t() @ h
        if need_h:  # every rank's vocabulary contributes to each hidden state's gradient
            dist.all_reduce(grad_h, group=group)
        return _finish(ctx, ce_tok, z_sum, z_loss, grad_h,
                       grad_w.to(weight.dtype) if need_w else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_ce: Tensor, _grad_tok: Tensor):
        return (*_scaled(ctx, grad_loss), None, None, None, None, None, None)


def vocab_parallel_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, group,
                                 start: int, *, z_loss: float = 0.0,
                                 chunk_size: int | None = None, per_token: bool = False
                                 ) -> tuple[Tensor, ...]:
    """:func:`linear_cross_entropy` with ``weight`` this rank's rows [start, start + V_local)
    of the head, split over ``group`` (tensor parallelism); the same ``(loss, ce)`` on every
    rank of the group."""
    chunk = chunk_size if chunk_size is not None else default_chunk_size(weight.size(0))
    loss, ce, tok = _VocabParallelCrossEntropy.apply(
        hidden, weight, targets, group, int(start), float(z_loss), max(1, chunk),
        torch.is_grad_enabled())
    return (loss, ce, tok) if per_token else (loss, ce)
