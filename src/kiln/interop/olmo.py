"""Import OLMo (allenai/OLMo, ``ai2-olmo``) unsharded training checkpoints as kiln checkpoints.

``kiln import olmo OLMO_DIR OUT`` reads an OLMo ``stepN-unsharded/`` folder::

    config.yaml   OLMo's TrainConfig (model, optimizer, scheduler, batch size, duration, ...)
    model.pt      torch.save of the model state dict (transformer.wte.weight, ...)
    optim.pt      torch.save of the optimizer state dict (AdamW moments, step counts, groups)
    train.pt      torch.save of the trainer state: global_step, global_train_tokens_seen, rng, ...

and writes OUT as a complete kiln checkpoint folder (model.safetensors, optim.pt in kiln's
layout, trainer.json, config.yaml, tokenizer.json when OLMo's tokenizer file is installed), so
``init.from=OUT`` continues the OLMo run: same weights, same Adam moments and step counts, and
with the counters kept (``init.load_schedule_position=true``, the default) the same step
number and the same learning rate at every step.

Tensors (OLMo -> kiln; ``d`` = d_model, ``kv`` = kv heads x head dim, ``h`` = SwiGLU hidden)::

    transformer.wte.weight                    embed.weight (rows = embedding_size)
    transformer.blocks.{i}.att_proj.{w,b}     rows [0, d) attn.q_proj, [d, d+kv) attn.k_proj,
                                              [d+kv, d+2kv) attn.v_proj (block_type sequential)
    transformer.blocks.{i}.{q,k,v}_proj.*     attn.{q,k,v}_proj (block_type llama)
    transformer.blocks.{i}.attn_out.*         attn.o_proj
    transformer.blocks.{i}.ff_proj.{w,b}      rows [0, h) mlp.up_proj, [h, 2h) mlp.gate_proj
                                              (OLMo's SwiGLU: x, gate = x.chunk(2);
                                              silu(gate) * x)
    transformer.blocks.{i}.ff_out.*           mlp.down_proj
    transformer.blocks.{i}.attn_norm.*        attn_norm
    transformer.blocks.{i}.ff_norm.*          mlp_norm
    transformer.blocks.{i}.{q,k}_norm.*       attn.{q,k}_norm
    transformer.ln_f.*                        final_norm
    transformer.ff_out.weight                 lm_head.weight (untied only)
    transformer.block_groups.{g}.{j}.*        as transformer.blocks.{g * block_group_size + j}.*

Adam's ``exp_avg`` and ``exp_avg_sq`` are split exactly like the weight they belong to; each
piece keeps the parameter's ``step``. optim.pt may key its state by index (DDP:
``optimizer.state_dict()``, names in each group's ``param_names``) or by name (FSDP full
optimizer state dict); both are read.

Config (OLMo ``config.yaml`` -> kiln ``Config``; a field missing from the file takes OLMo's
default)::

    model.d_model / n_layers / n_heads        model.d_model / n_layers / n_heads
    model.n_kv_heads, multi_query_attention   model.n_kv_heads (MQA: 1)
    model.mlp_hidden_size (fused width F)     model.mlp_hidden_size = F / 2
      or mlp_ratio * d_model                  model.mlp_ratio = mlp_ratio (same convention)
    model.vocab_size                          model.vocab_size
    model.embedding_size                      model.pad_vocab_multiple, chosen so that
                                              padded_vocab_size == embedding_size
    model.max_sequence_length (T)             model.max_seq_len = T; data.seq_len = T - 1 and
                                              data.stride = T (OLMo's rows, back to back)
    model.rope_theta                          model.rope_theta
    model.layer_norm_eps                      model.norm_eps
    model.layer_norm_type default|low_precision
      + layer_norm_with_affine false          model.norm = nonparametric_layernorm
      + affine, with layer-norm bias          model.norm = layernorm
    model.layer_norm_type rms + affine, no LN bias
                                              model.norm = rmsnorm
    model.attention_layer_norm                model.qk_norm (needs attention_layer_norm_with_affine)
    model.norm_after                          model.norm_placement = reordered (else pre; OLMo's
                                              llama block ignores norm_after: pre)
    model.weight_tying                        model.tie_embeddings
    model.include_bias                        model.bias
    model.init_std                            model.init_std
    model.eos_token_id                        data.eos_token_id
    optimizer.learning_rate / betas / eps     optim.lr / betas / eps
    optimizer.weight_decay                    optim.weight_decay
    optimizer.decay_norm_and_bias             optim.decay_norms_and_biases
    optimizer.decay_embeddings                optim.decay_embeddings
    optimizer.no_decay_norm_and_bias (legacy) both of the above = not it (as OLMo's train.py)
    max_grad_norm                             optim.grad_clip (null: 0, no clipping)
    softmax_auxiliary_loss                    optim.z_loss = auxiliary_loss_multiplier (else 0)
    (loss summed, divided by B x T tokens)    optim.loss_norm = window
    scheduler cosine_with_warmup              schedule cosine, warmup t_warmup, final_lr_fraction
              linear_with_warmup              alpha_f (linear); constant; constant_with_warmup
              constant, constant_with_warmup  -> constant with warmup. trainer.json gets OLMo's
                                              exact curve as segments: warmup from warmup_min_lr
                                              (default 0.1 x lr) to lr over t_warmup, then the
                                              decay to alpha_f x lr at t_max (or max_duration),
                                              then held to max_duration
              inverse_sqrt_with_warmup        schedule constant with warmup t_warmup; trainer.json
                                              gets the warmup, then lr x sqrt(t_warmup / step)
                                              to max_duration, point for point as OLMo
    scheduler.units tokens                    converted to steps when t_warmup / t_max are whole
                                              multiples of tokens_per_step
    global_train_batch_size                   trainer.global_batch_size
    device_train_microbatch_size              trainer.micro_batch_size (or a divisor)
    max_duration (steps, or "NT" tokens)      trainer.max_duration in steps
    seed                                      trainer.seed
    data.memmap_dtype                         data.dtype (for OLMo's raw .npy token files)

Refused (one-line KilnError naming the OLMo field; nothing is written), because kiln's model
would compute something else: ``alibi``; ``rope: false`` (learned absolute positions);
``clip_qkv``; ``activation_type`` other than swiglu; ``block_type`` other than sequential /
llama; ``scale_logits``; ``embedding_layer_norm``; dropout > 0 (kiln trains without dropout);
a layer norm with weight but no bias (``bias_for_layer_norm`` / ``include_bias`` false with
parametric LayerNorm), an RMSNorm with a bias or without a weight; ``attention_layer_norm``
without affine or with a non-parametric block norm; ``include_bias`` with an untied output
head (kiln's head has no bias); an unknown model field with a non-empty value. Optimizer
state is carried only from AdamW (``optimizer.name: lionw`` is refused unless
``--no-optimizer``).

Not reproduced but not refused (training-only, listed by the CLI when they differ from
kiln's behaviour): ``max_grad_norm_ratio`` and ``grad_clip_warmup_*`` (kiln clips to a fixed
norm), ``selective_updates``, schedulers kiln has no shape for (the schedule in trainer.json
is then empty, and a run continuing its step counter is refused until it names a schedule:
``schedule.restart=true`` or ``init.load_schedule_position=false``),
``rope_full_precision: false`` and ``low_precision`` layer norms (kiln computes these in fp32,
a difference only under bf16 autocast), the data order (the continued run starts its data at
the beginning; OLMo's epoch and instance counters are kept in trainer.json under ``olmo``).

train.pt pickles ``pathlib.PosixPath`` (checkpoint lists) and NumPy's RNG state (an ndarray),
which ``torch.load(weights_only=True)`` refuses by default; it is read with exactly these
globals allowed (:data:`TRAIN_PT_GLOBALS`). model.pt and optim.pt need nothing beyond
weights_only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    Duration,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainerConfig,
    config_from_dict,
)
from kiln.errors import KilnError, one_line
from kiln.safeload import load_pt
from kiln.schedule import LRSchedule, Segment

# OLMo's ModelConfig defaults (ai2-olmo 0.6.0, olmo/config.py): used for fields a config.yaml
# leaves out (OLMo itself writes every field, older versions fewer).
OLMO_MODEL_DEFAULTS: dict[str, Any] = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "clip_qkv": None, "n_layers": 12,
    "mlp_ratio": 4, "mlp_hidden_size": None, "activation_type": "swiglu",
    "block_type": "sequential", "block_group_size": 1, "alibi": False, "alibi_bias_max": 8.0,
    "rope": False, "rope_full_precision": True, "rope_theta": 10000, "flash_attention": False,
    "attention_dropout": 0.1, "multi_query_attention": None, "attention_layer_norm": False,
    "residual_dropout": 0.1, "embedding_dropout": 0.1, "embedding_layer_norm": False,
    "layer_norm_type": "default", "layer_norm_with_affine": True, "layer_norm_eps": 1e-5,
    "attention_layer_norm_with_affine": True, "max_sequence_length": 1024,
    "include_bias": True, "bias_for_layer_norm": None, "scale_logits": False,
    "vocab_size": 50257, "embedding_size": 50304, "weight_tying": True, "eos_token_id": 50256,
    "pad_token_id": 50256, "init_device": None, "init_fn": "normal", "init_std": 0.02,
    "init_cutoff_factor": None, "precision": None, "scale_emb_init": False,
    "emb_init_std": None, "norm_after": False,
}
# Fields that only affect initialisation, speed or bookkeeping, never the computed function.
_INERT_MODEL_FIELDS = {"init_device", "init_fn", "init_cutoff_factor", "precision",
                       "scale_emb_init", "emb_init_std", "flash_attention", "pad_token_id",
                       "alibi_bias_max", "block_group_size", "rope_full_precision"}

OLMO_OPTIM_DEFAULTS: dict[str, Any] = {
    "name": "lionw", "learning_rate": 1e-4, "weight_decay": 0.01, "betas": [0.9, 0.95],
    "eps": 1e-5, "no_decay_norm_and_bias": None, "selective_updates": False,
    "decay_norm_and_bias": False, "decay_embeddings": False,
}
OLMO_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "name": "cosine_with_warmup", "units": "steps", "t_warmup": 100, "t_max": None,
    "alpha_f": 0.1, "grad_clip_warmup_steps": None, "grad_clip_warmup_factor": None,
    "warmup_min_lr": None,
}
OLMO_TRAIN_DEFAULTS: dict[str, Any] = {
    "seed": 6198, "max_duration": 10000, "global_train_batch_size": 512,
    "device_train_microbatch_size": 16, "max_grad_norm": None, "max_grad_norm_ratio": None,
    "precision": None, "softmax_auxiliary_loss": False, "auxiliary_loss_multiplier": 1e-4,
}

_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.", "module.")
_BLOCK_GROUP = re.compile(r"^transformer\.block_groups\.(\d+)\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# Config


@dataclass
class Converted:
    """Everything the config conversion decides, beyond the Config itself."""

    config: Config
    schedule: LRSchedule
    total_steps: int
    tokens_per_step: int
    block_type: str
    block_group_size: int
    notes: list[str] = field(default_factory=list)


def _section(raw: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    sec = raw.get(name)
    if sec is None:
        sec = {}
    if not isinstance(sec, dict):
        raise KilnError(f"OLMo config field {name!r} is not a mapping; is this an OLMo "
                        "config.yaml?")
    return {**defaults, **sec}


def _refuse(field_name: str, value: Any, why: str) -> KilnError:
    return KilnError(f"cannot import this OLMo checkpoint: {field_name}={value!r}: {why}")


def _pad_multiple(vocab: int, embedding: int) -> int:
    """A pad_vocab_multiple m with ceil(vocab / m) * m == embedding (nice values first)."""
    if embedding == vocab:
        return 1
    for m in (128, 64, 256, 32, 512, 1024, 16, 8):
        if embedding % m == 0 and embedding - vocab < m:
            return m
    return embedding  # one multiple covering everything: ceil(vocab / E) * E == E


def _max_steps(max_duration: Any, step: int, tokens: int, tokens_per_step: int) -> int | None:
    """OLMo's Trainer.max_steps: an int or "N" is steps, "NT" tokens (from the current
    position), "Nep" epochs (unknown here: needs the dataset size)."""
    if isinstance(max_duration, bool):
        return None
    if isinstance(max_duration, (int, float)):
        return int(max_duration)
    if isinstance(max_duration, str):
        text = max_duration.strip()
        try:
            if text.endswith("T"):
                remaining = max(int(float(text[:-1].strip())) - tokens, 0)
                return step + math.ceil(remaining / tokens_per_step)
            if text.endswith("ep"):
                return None
            return int(float(text))
        except ValueError:
            return None
    return None


def _norm_kind(m: dict[str, Any]) -> str:
    ln_type = str(m["layer_norm_type"])
    affine = bool(m["layer_norm_with_affine"])
    ln_bias = m["bias_for_layer_norm"]
    ln_bias = bool(m["include_bias"] if ln_bias is None else ln_bias)
    if ln_type in ("default", "low_precision"):
        if not affine:
            return "nonparametric_layernorm"
        if not ln_bias:
            raise _refuse("model.bias_for_layer_norm", m["bias_for_layer_norm"],
                          "a LayerNorm with a weight but no bias (bias_for_layer_norm / "
                          "include_bias false) has no kiln equivalent; kiln's layernorm "
                          "always has a bias")
        return "layernorm"
    if ln_type == "rms":
        if not affine:
            raise _refuse("model.layer_norm_with_affine", False,
                          "an RMSNorm without a weight has no kiln equivalent")
        if ln_bias:
            raise _refuse("model.bias_for_layer_norm", m["bias_for_layer_norm"],
                          "an RMSNorm with a bias (bias_for_layer_norm / include_bias true) "
                          "has no kiln equivalent; set bias_for_layer_norm: false only if "
                          "the checkpoint has no norm biases")
        return "rmsnorm"
    raise _refuse("model.layer_norm_type", ln_type, "kiln knows default, low_precision and rms")


def _check_model_semantics(m: dict[str, Any]) -> None:
    """Refuse every OLMo model feature kiln's Transformer does not compute."""
    if m["alibi"]:
        raise _refuse("model.alibi", True, "kiln uses RoPE only (no ALiBi attention biases)")
    if not m["rope"]:
        raise _refuse("model.rope", False, "learned absolute position embeddings "
                      "(transformer.wpe) are not supported; kiln uses RoPE")
    if m["clip_qkv"] is not None:
        raise _refuse("model.clip_qkv", m["clip_qkv"], "kiln does not clamp q/k/v, so its "
                      "outputs would differ")
    if str(m["activation_type"]) != "swiglu":
        raise _refuse("model.activation_type", m["activation_type"], "kiln's MLP is SwiGLU only")
    if str(m["block_type"]) not in ("sequential", "llama"):
        raise _refuse("model.block_type", m["block_type"],
                      "only sequential and llama blocks have kiln equivalents")
    if m["scale_logits"]:
        raise _refuse("model.scale_logits", True, "kiln does not scale logits by "
                      "1/sqrt(d_model)")
    if m["embedding_layer_norm"]:
        raise _refuse("model.embedding_layer_norm", True, "kiln has no norm after the "
                      "embedding")
    for name in ("attention_dropout", "residual_dropout", "embedding_dropout"):
        if float(m[name] or 0.0) > 0.0:
            raise _refuse(f"model.{name}", m[name], "kiln trains without dropout; set it to "
                          "0 in config.yaml to continue this run without dropout")
    unknown = [k for k, v in m.items() if k not in OLMO_MODEL_DEFAULTS and v not in
               (None, False, 0, 0.0, "", [], {})]
    if unknown:
        raise _refuse(f"model.{unknown[0]}", m[unknown[0]], "kiln does not know this OLMo "
                      "model field, so it cannot promise the same model")


def _kv_heads(m: dict[str, Any]) -> int:
    n_heads = int(m["n_heads"])
    mqa, n_kv = m["multi_query_attention"], m["n_kv_heads"]
    if str(m["block_type"]) == "llama":  # OLMoLlamaBlock sizes k/v by multi_query_attention
        kv = 1 if mqa else n_heads
        if n_kv is not None and int(n_kv) != kv:
            raise _refuse("model.n_kv_heads", n_kv, "OLMo's llama block ignores n_kv_heads "
                          "(it uses multi_query_attention), so this config is inconsistent")
        return kv
    if n_kv is None:
        return 1 if mqa else n_heads
    if mqa is not None and int(n_kv) != (1 if mqa else n_heads):
        raise _refuse("model.multi_query_attention", mqa, "contradicts model.n_kv_heads")
    return int(n_kv)


def _convert(olmo_cfg: dict[str, Any], step: int = 0, tokens: int = 0) -> Converted:
    if not isinstance(olmo_cfg, dict) or not isinstance(olmo_cfg.get("model"), dict):
        raise KilnError("OLMo config.yaml has no model section; pass the config.yaml of an "
                        "OLMo checkpoint folder (stepN-unsharded/config.yaml)")
    m = _section(olmo_cfg, "model", OLMO_MODEL_DEFAULTS)
    o = _section(olmo_cfg, "optimizer", OLMO_OPTIM_DEFAULTS)
    s = _section(olmo_cfg, "scheduler", OLMO_SCHEDULER_DEFAULTS)
    t = {**OLMO_TRAIN_DEFAULTS, **{k: olmo_cfg[k] for k in OLMO_TRAIN_DEFAULTS
                                   if k in olmo_cfg}}
    notes: list[str] = []
    _check_model_semantics(m)

    # -- model
    d_model, n_heads = int(m["d_model"]), int(m["n_heads"])
    if d_model % n_heads:
        raise _refuse("model.n_heads", n_heads, f"does not divide d_model={d_model}")
    kv_heads = _kv_heads(m)
    norm = _norm_kind(m)
    qk_norm = bool(m["attention_layer_norm"])
    if qk_norm and not m["attention_layer_norm_with_affine"]:
        raise _refuse("model.attention_layer_norm_with_affine", False,
                      "kiln's QK-norm always has a weight")
    if qk_norm and norm == "nonparametric_layernorm":
        raise _refuse("model.attention_layer_norm", True, "kiln's QK-norm is the block norm "
                      "with a weight, but this model's block norms are non-parametric")
    tied = bool(m["weight_tying"])
    bias = bool(m["include_bias"])
    if bias and not tied:
        raise _refuse("model.include_bias", True, "with weight_tying false the output head "
                      "(transformer.ff_out) has a bias, and kiln's output head has none")
    fused = int(m["mlp_hidden_size"]) if m["mlp_hidden_size"] is not None else int(
        m["mlp_ratio"] * d_model)
    if fused % 2:
        raise _refuse("model.mlp_hidden_size", fused, "SwiGLU needs an even fused width")
    vocab = int(m["vocab_size"])
    embedding = int(m["embedding_size"] or vocab)
    if embedding < vocab:
        raise _refuse("model.embedding_size", embedding, f"is smaller than vocab_size={vocab}")
    block_type = str(m["block_type"])
    reordered = bool(m["norm_after"]) and block_type == "sequential"
    if m["norm_after"] and block_type == "llama":
        notes.append("model.norm_after is ignored by OLMo's llama block: imported with "
                     "norm_placement=pre, as OLMo computes it")
    if not m["rope_full_precision"] or str(m["layer_norm_type"]) == "low_precision":
        notes.append("rope_full_precision=false / low_precision layer norms: kiln computes "
                     "RoPE and norms in fp32 (identical in fp32, slightly different under bf16)")
    mc = ModelConfig(
        d_model=d_model, n_layers=int(m["n_layers"]), n_heads=n_heads,
        n_kv_heads=None if kv_heads == n_heads else kv_heads,
        mlp_ratio=float(m["mlp_ratio"]), mlp_hidden_size=fused // 2,
        vocab_size=vocab, pad_vocab_multiple=_pad_multiple(vocab, embedding),
        max_seq_len=int(m["max_sequence_length"]), rope_theta=float(m["rope_theta"]),
        norm=norm, norm_eps=float(m["layer_norm_eps"]),
        norm_placement="reordered" if reordered else "pre", qk_norm=qk_norm,
        tie_embeddings=tied, bias=bias, init_std=float(m["init_std"]),
    )
    assert mc.padded_vocab_size == embedding

    # -- optimizer
    if str(o["name"]) != "adamw":
        notes.append(f"optimizer.name={o['name']}: kiln continues with AdamW")
    decay_nb, decay_emb = bool(o["decay_norm_and_bias"]), bool(o["decay_embeddings"])
    if o.get("no_decay_norm_and_bias") is not None:  # legacy: OLMo's train.py rewrites it so
        decay_nb = decay_emb = not bool(o["no_decay_norm_and_bias"])
    if o.get("selective_updates"):
        notes.append("optimizer.selective_updates=true is not reproduced (kiln updates every "
                     "entry each step)")
    if t["max_grad_norm_ratio"] is not None:
        notes.append("max_grad_norm_ratio (adaptive clipping) is not reproduced; "
                     "optim.grad_clip uses max_grad_norm")
    if s.get("grad_clip_warmup_steps") is not None and s.get("grad_clip_warmup_factor"):
        notes.append("scheduler.grad_clip_warmup_* is not reproduced")
    z_loss = 0.0
    if t["softmax_auxiliary_loss"]:
        z_loss = float(t["auxiliary_loss_multiplier"] if t["auxiliary_loss_multiplier"]
                       is not None else 1e-4)
    betas = [float(b) for b in o["betas"]]
    lr = float(o["learning_rate"])
    optim = OptimConfig(lr=lr, betas=betas, eps=float(o["eps"]),
                        weight_decay=float(o["weight_decay"]), decay_norms_and_biases=decay_nb,
                        decay_embeddings=decay_emb,
                        grad_clip=float(t["max_grad_norm"] or 0.0), z_loss=z_loss,
                        loss_norm="window")

    # -- counters, duration, schedule
    gbs = int(t["global_train_batch_size"])
    tokens_per_step = gbs * mc.max_seq_len
    max_steps = _max_steps(t["max_duration"], step, tokens, tokens_per_step)
    sched_cfg, schedule, note = _schedule(s, lr, step, tokens, tokens_per_step, max_steps)
    if note:
        notes.append(note)
    total = max_steps if max_steps is not None else max(schedule.end, step)
    if max_steps is None:
        notes.append(f"max_duration={t['max_duration']!r} cannot be turned into steps here; "
                     "set trainer.max_duration for the continued run")
    micro = int(t["device_train_microbatch_size"] or 8)
    micro = math.gcd(gbs, micro) if gbs % micro else micro
    precision = str(t["precision"] or "")
    # OLMo's instances are max_sequence_length tokens, back to back; kiln's windows are
    # seq_len + 1 tokens, stride apart: the same rows
    data = DataConfig(seq_len=mc.max_seq_len - 1, stride=mc.max_seq_len,
                      eos_token_id=int(m["eos_token_id"]), dtype=_data_dtype(olmo_cfg))
    trainer = TrainerConfig(global_batch_size=gbs, micro_batch_size=micro,
                            max_duration=Duration(float(max(total, 1)), "steps"),
                            seed=int(t["seed"] if t["seed"] is not None else 0),
                            precision="fp32" if precision == "fp32" else "auto")
    cfg = Config(model=mc, data=data, optim=optim, schedule=sched_cfg, trainer=trainer,
                 checkpoint=CheckpointConfig())
    cfg = config_from_dict(cfg.to_dict())  # what readers of the checkpoint do: must validate
    return Converted(cfg, schedule, total, tokens_per_step, block_type,
                     int(m["block_group_size"] or 1), notes)


def _data_dtype(olmo_cfg: dict[str, Any]) -> str | None:
    data = olmo_cfg.get("data")
    dtype = data.get("memmap_dtype") if isinstance(data, dict) else None
    return dtype if dtype in ("uint16", "uint32") else None


def _schedule(s: dict[str, Any], lr: float, step: int, tokens: int, tokens_per_step: int,
              max_steps: int | None) -> tuple[ScheduleConfig, LRSchedule, str | None]:
    """OLMo's scheduler as a kiln ScheduleConfig plus the exact curve as segments.

    OLMo sets the LR of the step that brings global_step to s to get_lr(lr, s, max_steps),
    kiln uses schedule.lr(s) for the same step: the segments reproduce get_lr point for point.
    """
    name = str(s["name"])
    alpha = float(s["alpha_f"])
    empty = LRSchedule([])
    shapes = {"cosine_with_warmup": "cosine", "linear_with_warmup": "linear",
              "constant": "constant", "constant_with_warmup": "constant",
              "inverse_sqrt_with_warmup": "inv_sqrt"}
    if name not in shapes:
        return (ScheduleConfig(final_lr_fraction=alpha), empty,
                f"scheduler.name={name} has no kiln shape: trainer.json has no schedule, so a "
                "continued run lays the new config's schedule from the current step")
    warmup = 0 if name == "constant" else s["t_warmup"]
    # OLMo's inverse square root ignores t_max: it decays to the end of the run
    t_max = s["t_max"] if name not in ("constant", "inverse_sqrt_with_warmup") else None
    end = max_steps
    if str(s.get("units", "steps")) == "tokens":
        ok = tokens == step * tokens_per_step and int(float(warmup)) % tokens_per_step == 0 and (
            t_max is None or int(float(t_max)) % tokens_per_step == 0)
        if not ok:
            return (ScheduleConfig(final_lr_fraction=alpha), empty,
                    "scheduler.units=tokens with t_warmup / t_max that are not whole steps: "
                    "trainer.json has no schedule, so a continued run lays the new config's "
                    "schedule from the current step")
        warmup = int(float(warmup)) // tokens_per_step
        t_max = None if t_max is None else int(float(t_max)) // tokens_per_step
    w = int(float(warmup))
    if t_max is not None:
        end = int(float(t_max))
    # kiln's config has no inverse-square-root shape: the exact curve lives in trainer.json's
    # segments, and a continuation that reshapes it (--extend-to, a new max_duration) lays a
    # constant tail from the LR of that moment
    cfg = ScheduleConfig(name=shapes[name] if shapes[name] != "inv_sqrt" else "constant",
                         warmup=Duration(float(w), "steps"),
                         final_lr_fraction=alpha if shapes[name] in ("cosine", "linear") else 1.0)
    if end is None:
        if shapes[name] == "constant":
            end = max(step, w)
        else:
            return (cfg, empty, "the schedule's end (scheduler.t_max / max_duration) is "
                    "unknown: trainer.json has no schedule; set trainer.max_duration")
    w_min = float(s["warmup_min_lr"]) if s.get("warmup_min_lr") is not None else 0.1 * lr
    segs = []
    if w > 0:
        segs.append(Segment("linear", 0, w, w_min, lr))
    if shapes[name] == "constant":
        segs.append(Segment("constant", w, max(end, w), lr, lr))
    elif shapes[name] == "inv_sqrt":  # lr * sqrt(w / step) after warmup, as OLMo computes it
        tail = Segment("inv_sqrt", w, max(end, w), lr, lr, timescale=float(w))
        tail.lr_end = tail.lr(tail.end)
        segs.append(tail)
    else:
        segs.append(Segment(shapes[name], w, end, lr, lr * alpha))
    return cfg, LRSchedule(segs, warmup_end=w), None


def olmo_to_kiln_config(olmo_cfg: dict[str, Any]) -> Config:
    """The kiln Config of an OLMo TrainConfig (a config.yaml read as a dict): the model shape,
    AdamW hyperparameters, the schedule and batch shape. Raises KilnError naming the OLMo
    field when the model computes something kiln's Transformer cannot (see module docstring).
    """
    return _convert(olmo_cfg).config


# --------------------------------------------------------------------------------------------
# Reading OLMo's files


TRAIN_PT_GLOBALS = (
    "pathlib.PosixPath", "pathlib._local.PosixPath",  # checkpoint lists (Python >= 3.13 name)
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",  # NumPy 2 / 1
    "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",  # np.random.get_state()
)
"""The only non-tensor globals allowed when unpickling train.pt (weights_only=True): the
checkpoint paths and NumPy RNG state OLMo's trainer state holds. Each is a plain data type or
NumPy's array constructor; nothing that can run arbitrary code."""


def _train_pt_globals() -> list[tuple[Any, str]]:
    """(object, pickled name) for each of TRAIN_PT_GLOBALS, for torch's safe_globals."""
    import pathlib

    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    objects = {"PosixPath": pathlib.PosixPath, "_reconstruct": _reconstruct,
               "ndarray": np.ndarray, "dtype": np.dtype,
               "UInt32DType": type(np.dtype(np.uint32))}
    return [(objects[name.rsplit(".", 1)[1]], name) for name in TRAIN_PT_GLOBALS]


def _load_pt(path: Path, extra_globals: list[tuple[Any, str]] | None = None) -> Any:
    if not path.is_file():
        raise KilnError(f"{path} does not exist; an OLMo unsharded checkpoint folder holds "
                        "config.yaml, model.pt, optim.pt and train.pt")
    return load_pt(path, extra_globals, mmap=True)


def _normalize(name: str, group_size: int) -> str:
    for p in _PREFIXES:
        name = name.replace(p, "")
    g = _BLOCK_GROUP.match(name)
    if g:
        layer = int(g.group(1)) * group_size + int(g.group(2))
        name = f"transformer.blocks.{layer}." + name[g.end():]
    return name


def read_config(olmo_dir: str | Path) -> dict[str, Any]:
    path = Path(olmo_dir) / "config.yaml"
    if not path.is_file():
        raise KilnError(f"{path} does not exist; pass an OLMo unsharded checkpoint folder "
                        "(stepN-unsharded/ with config.yaml, model.pt, optim.pt, train.pt)")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise KilnError(f"cannot read {path}: {one_line(e)[:200]}") from None
    if not isinstance(raw, dict):
        raise KilnError(f"{path} is not an OLMo TrainConfig (not a mapping)")
    return raw


def read_train_state(olmo_dir: str | Path, olmo_cfg: dict[str, Any]) -> dict[str, int]:
    """global_step, tokens seen, epoch and examples seen from train.pt (as OLMo reads them)."""
    path = Path(olmo_dir) / "train.pt"
    state = _load_pt(path, _train_pt_globals())
    if not isinstance(state, dict) or "global_step" not in state:
        raise KilnError(f"{path} has no global_step; is it an OLMo train.pt?")
    step = int(state["global_step"])
    m = _section(olmo_cfg, "model", OLMO_MODEL_DEFAULTS)
    gbs = int(olmo_cfg.get("global_train_batch_size", OLMO_TRAIN_DEFAULTS[
        "global_train_batch_size"]))
    data_step = int(state.get("global_data_step", step))
    tokens = int(state.get("global_train_tokens_seen",
                           data_step * gbs * int(m["max_sequence_length"])))
    examples = int(state.get("global_train_examples_seen_this_epoch",
                             state.get("global_train_examples_seen", data_step * gbs)))
    return {"global_step": step, "global_train_tokens_seen": tokens,
            "epoch": int(state.get("epoch") or 0),
            "global_train_examples_seen_this_epoch": examples}


# --------------------------------------------------------------------------------------------
# Tensor layout


Piece = tuple[str, int, int]  # kiln name, first row, end row (of the OLMo tensor's dim 0)


def tensor_plan(mc: ModelConfig, block_type: str = "sequential") -> dict[str, list[Piece]]:
    """OLMo tensor name -> the kiln parameters it becomes, as row ranges of its dim 0."""
    d, kv, h = mc.d_model, mc.kv_heads * mc.head_dim, mc.hidden_size
    v = mc.padded_vocab_size
    norm_p = {"rmsnorm": ("weight",), "layernorm": ("weight", "bias"),
              "nonparametric_layernorm": ()}[mc.norm]
    lin_p = ("weight", "bias") if mc.bias else ("weight",)
    plan: dict[str, list[Piece]] = {"transformer.wte.weight": [("embed.weight", 0, v)]}
    for i in range(mc.n_layers):
        o, k = f"transformer.blocks.{i}.", f"blocks.{i}."
        for p in norm_p:
            plan[o + "attn_norm." + p] = [(k + "attn_norm." + p, 0, d)]
            plan[o + "ff_norm." + p] = [(k + "mlp_norm." + p, 0, d)]
            if mc.qk_norm:
                plan[o + "q_norm." + p] = [(k + "attn.q_norm." + p, 0, d)]
                plan[o + "k_norm." + p] = [(k + "attn.k_norm." + p, 0, kv)]
        for p in lin_p:
            if block_type == "llama":
                plan[o + "q_proj." + p] = [(k + "attn.q_proj." + p, 0, d)]
                plan[o + "k_proj." + p] = [(k + "attn.k_proj." + p, 0, kv)]
                plan[o + "v_proj." + p] = [(k + "attn.v_proj." + p, 0, kv)]
            else:
                plan[o + "att_proj." + p] = [(k + "attn.q_proj." + p, 0, d),
                                             (k + "attn.k_proj." + p, d, d + kv),
                                             (k + "attn.v_proj." + p, d + kv, d + 2 * kv)]
            plan[o + "attn_out." + p] = [(k + "attn.o_proj." + p, 0, d)]
            plan[o + "ff_proj." + p] = [(k + "mlp.up_proj." + p, 0, h),
                                        (k + "mlp.gate_proj." + p, h, 2 * h)]
            plan[o + "ff_out." + p] = [(k + "mlp.down_proj." + p, 0, d)]
    for p in norm_p:
        plan["transformer.ln_f." + p] = [("final_norm." + p, 0, d)]
    if not mc.tie_embeddings:
        plan["transformer.ff_out.weight"] = [("lm_head.weight", 0, v)]
    return plan


def _expected_shape(pieces: list[Piece], kiln: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The shape the OLMo tensor must have: its pieces stacked on dim 0."""
    return (pieces[-1][2],) + tuple(kiln[pieces[0][0]].shape[1:])


def _split(t: torch.Tensor, pieces: list[Piece]) -> dict[str, torch.Tensor]:
    return {name: t[a:b] for name, a, b in pieces}


def _olmo_model_state(olmo_dir: Path, group_size: int) -> dict[str, torch.Tensor]:
    path = olmo_dir / "model.pt"
    if not path.is_file() and (olmo_dir / "model.safetensors").is_file():
        raise KilnError(f"{olmo_dir} has model.safetensors (OLMo's pickled-key safetensors) "
                        "but no model.pt; kiln reads model.pt only (it never unpickles keys)")
    state = _load_pt(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise KilnError(f"{path} is not a model state dict (name -> tensor)")
    return {_normalize(k, group_size): v for k, v in state.items()}


def _olmo_optim_state(olmo_dir: Path, group_size: int
                      ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """(normalized parameter name -> {step, exp_avg, exp_avg_sq}, param groups)."""
    path = olmo_dir / "optim.pt"
    osd = _load_pt(path)
    if not isinstance(osd, dict) or "state" not in osd or "param_groups" not in osd:
        raise KilnError(f"{path} is not an optimizer state dict (no state / param_groups)")
    id_to_name: dict[Any, str] = {}
    for g in osd["param_groups"]:
        params, names = g.get("params", []), g.get("param_names")
        for j, pid in enumerate(params):
            if isinstance(pid, str):
                id_to_name[pid] = pid
            elif names is not None and j < len(names):
                id_to_name[pid] = names[j]
            else:
                raise KilnError(f"{path} keys its state by index but its param_groups have "
                                "no param_names; kiln cannot tell which tensor is which")
    out: dict[str, dict[str, Any]] = {}
    for key, st in osd["state"].items():
        name = id_to_name.get(key, key if isinstance(key, str) else None)
        if name is None:
            raise KilnError(f"{path} has state for parameter {key!r} that no param group "
                            "lists; the file is inconsistent")
        out[_normalize(name, group_size)] = st
    return out, list(osd["param_groups"])


# --------------------------------------------------------------------------------------------
# Import


def _olmo_tokenizer(olmo_cfg: dict[str, Any]) -> Path | None:
    """OLMo's tokenizer file when an installed package ships it (never downloads)."""
    from kiln.data.tokenizers import resolve_tokenizer

    tok = olmo_cfg.get("tokenizer")
    ident = tok.get("identifier") if isinstance(tok, dict) else None
    if not isinstance(ident, str) or not ident:
        return None
    name = Path(ident).name
    if not name.endswith(".json"):  # a hub id such as allenai/gpt-neox-olmo-dolma-v1_5
        name = ident.replace("/", "_") + ".json"
    try:
        return resolve_tokenizer(name)
    except KilnError:
        return None


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise KilnError(f"{out} exists; choose a new output folder")


def import_olmo(olmo_dir: str | Path, out_checkpoint: str | Path, *,
                load_optimizer: bool = True) -> Path:
    """Write an OLMo unsharded checkpoint folder as a complete kiln checkpoint folder.

    OUT gets model.safetensors, optim.pt (Adam moments and step counts, fused tensors split
    like their weights; skipped with ``load_optimizer=False``), trainer.json (step and tokens
    seen from train.pt, OLMo's LR curve as schedule segments), config.yaml (the converted
    Config) and tokenizer.json when OLMo's tokenizer file is installed. Everything is written
    beside OUT first and renamed into place at the end: on any error nothing is left.
    """
    from kiln import checkpoint as ckpt
    from kiln.model import Transformer
    from kiln.optim import build_optimizer

    d = Path(olmo_dir)
    out = Path(out_checkpoint)
    if not d.is_dir():
        raise KilnError(f"OLMo checkpoint folder {d} does not exist")
    _check_out(out)
    olmo_cfg = read_config(d)
    _convert(olmo_cfg)  # refuse unsupported models before reading any tensor
    counters = read_train_state(d, olmo_cfg)
    step, tokens = counters["global_step"], counters["global_train_tokens_seen"]
    conv = _convert(olmo_cfg, step, tokens)
    cfg, mc = conv.config, conv.config.model
    opt_name = str(_section(olmo_cfg, "optimizer", OLMO_OPTIM_DEFAULTS)["name"])
    if load_optimizer and opt_name != "adamw":
        raise _refuse("optimizer.name", opt_name, "only AdamW state can be carried over; "
                      "pass --no-optimizer to import the weights and counters only")
    if load_optimizer and not (d / "optim.pt").is_file():
        raise KilnError(f"{d / 'optim.pt'} does not exist; pass --no-optimizer to import the "
                        "weights and counters only")

    # Weights: every OLMo tensor lands in exactly one place, with the right shape.
    plan = tensor_plan(mc, conv.block_type)
    with torch.device("meta"):
        model = Transformer(mc)
    model.to_empty(device="cpu")
    params = dict(model.named_parameters())  # a tied head appears once, as embed.weight
    targets = sorted(k for pieces in plan.values() for k, _, _ in pieces)
    assert targets == sorted(params), (targets, sorted(params))
    olmo_state = _olmo_model_state(d, conv.block_group_size)
    for name, pieces in plan.items():
        if name not in olmo_state:
            raise KilnError(f"{d / 'model.pt'} has no tensor {name!r}: the file is incomplete "
                            "or config.yaml does not describe this model")
        want = _expected_shape(pieces, params)
        if tuple(olmo_state[name].shape) != want:
            raise KilnError(f"{d / 'model.pt'}: {name} is {list(olmo_state[name].shape)} but "
                            f"config.yaml implies {list(want)}; config.yaml does not describe "
                            "this model")
    extra = sorted(set(olmo_state) - set(plan))
    if extra:
        raise KilnError(f"{d / 'model.pt'} has tensor {extra[0]!r} that the converted model "
                        "has no place for; config.yaml does not describe this model")
    with torch.no_grad():
        for name, pieces in plan.items():
            for kname, t in _split(olmo_state[name], pieces).items():
                params[kname].copy_(t.to(params[kname].dtype))
    del olmo_state

    optimizer = None
    if load_optimizer:
        optimizer = build_optimizer(model, cfg.optim)
        ostate, groups = _olmo_optim_state(d, conv.block_group_size)
        for name, pieces in plan.items():
            st = ostate.get(name)
            if st is None and ostate:
                raise KilnError(f"{d / 'optim.pt'} has no Adam state for {name!r}; the file "
                                "is incomplete (or pass --no-optimizer)")
            if st is not None:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    if key not in st:
                        raise KilnError(f"{d / 'optim.pt'}: the state of {name!r} has no "
                                        f"{key!r}; it is not AdamW state")
                want = _expected_shape(pieces, params)
                for key in ("exp_avg", "exp_avg_sq"):
                    if tuple(st[key].shape) != want:
                        raise KilnError(
                            f"{d / 'optim.pt'}: {key} of {name} is {list(st[key].shape)}, "
                            f"the weight is {list(want)}; the file holds sharded or foreign "
                            "state (write an unsharded OLMo checkpoint)")
            n_step = float(st["step"]) if st is not None else 0.0
            for kname, a, b in pieces:
                p = params[kname]
                optimizer.state[p] = {
                    "step": torch.tensor(n_step, dtype=torch.float32),
                    "exp_avg": (st["exp_avg"][a:b].to(p.dtype).clone() if st is not None
                                else torch.zeros_like(p)),
                    "exp_avg_sq": (st["exp_avg_sq"][a:b].to(p.dtype).clone() if st is not None
                                   else torch.zeros_like(p)),
                }
        if groups:
            g0 = groups[0]
            wd = max(float(g.get("weight_decay", 0.0)) for g in groups)
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = float(g0.get("lr", cfg.optim.lr))
                group["betas"] = tuple(float(b) for b in g0.get("betas", cfg.optim.betas))
                group["eps"] = float(g0.get("eps", cfg.optim.eps))
                group["weight_decay"] = wd if i == 0 else 0.0
        del ostate

    msd, osd = ckpt.gather_full_state(model, optimizer)
    trainer = {
        "step": step, "tokens_seen": tokens, "data": {"epoch": 0, "tokens_in_epoch": 0},
        "schedule": conv.schedule.state_dict(), "total_steps": conv.total_steps,
        "tokens_per_step": conv.tokens_per_step, "data_files": [],
        "source": "olmo:" + str(d.resolve()), "olmo": counters,
    }
    tokenizer = _olmo_tokenizer(olmo_cfg)
    with ckpt.staged_folder(out) as staging:
        # kiln.checkpoint.save writes RUN_DIR/checkpoints/step{N}/: write it inside the
        # staging folder, then lift its files up so the staging folder becomes OUT
        written = ckpt.save(staging, step, model=msd, trainer=trainer,
                            config_yaml=cfg.to_yaml(), optim=osd, tokenizer=tokenizer)
        for f in written.iterdir():
            os.rename(f, staging / f.name)
        shutil.rmtree(staging / "checkpoints")
    return out


def import_notes(olmo_dir: str | Path) -> list[str]:
    """What the import does not reproduce for this OLMo config (for the CLI summary)."""
    d = Path(olmo_dir)
    olmo_cfg = read_config(d)
    try:
        counters = read_train_state(d, olmo_cfg)
        return _convert(olmo_cfg, counters["global_step"],
                        counters["global_train_tokens_seen"]).notes
    except KilnError:
        return _convert(olmo_cfg).notes


# --------------------------------------------------------------------------------------------
# CLI: kiln import olmo OLMO_DIR OUT_CHECKPOINT


def add_import_olmo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("olmo_dir", help="OLMo unsharded checkpoint folder (stepN-unsharded/ "
                        "with config.yaml, model.pt, optim.pt, train.pt)")
    parser.add_argument("out_checkpoint", help="new kiln checkpoint folder")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="skip optim.pt (weights, counters and schedule only; continue "
                        "with init.load_optimizer=false)")


def run_import_olmo(args: argparse.Namespace, *_: Any) -> int:
    out = import_olmo(args.olmo_dir, args.out_checkpoint,
                      load_optimizer=not getattr(args, "no_optimizer", False))
    trainer = json.loads((out / "trainer.json").read_text())
    what = "weights, Adam state" if (out / "optim.pt").is_file() else "weights"
    print(f"wrote kiln checkpoint {out} ({what}, step {trainer['step']:,}, "
          f"{trainer['tokens_seen']:,} tokens seen); continue it with "
          f"--init.from={out} (its config.yaml is the converted OLMo config)")
    for note in import_notes(args.olmo_dir):
        print(f"note: {note}")
    return 0
