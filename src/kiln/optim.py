"""AdamW with sensible parameter groups (the LR schedule lives in kiln.schedule)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters into decayed and non-decayed groups.

    By default only the weight matrices of Linear layers decay; norms, biases and the
    embedding do not (decaying an embedding row pulls rarely seen tokens towards zero).
    """
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embed_ids:
            (decay if cfg.decay_embeddings else no_decay).append(p)
        elif p.ndim < 2:
            (decay if cfg.decay_norms_and_biases else no_decay).append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over each tensor: measured 27 ms vs 144 ms for
    foreach per step at the CPU peer shape) where torch has one for the device, else foreach."""
    fused = {p.device.type for p in model.parameters()} <= {"cuda", "cpu"}
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs
    )


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set betas/eps/weight decay from the config (loading a state dict restores the old ones)."""
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = tuple(cfg.betas)
        group["eps"] = cfg.eps
        if i == 0:  # param_groups() puts the decayed group first
            group["weight_decay"] = cfg.weight_decay
