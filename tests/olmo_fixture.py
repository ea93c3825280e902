"""OLMo-layout unsharded checkpoints of tiny random models, for the import tests.

:func:`build_olmo_checkpoint` writes ``DIR/{config.yaml, model.pt, optim.pt, train.pt}`` the
way OLMo's ``FullCheckpointer`` does (ai2-olmo 0.6.0, olmo/checkpoint.py + olmo/train.py):

* model.pt: the model state dict, ``transformer.wte.weight``, ``transformer.blocks.{i}.
  att_proj.weight`` (q, k, v stacked on dim 0), ``ff_proj.weight`` (the SwiGLU input: first
  half the value, second half the gate), ``attn_out``, ``ff_out``, norms, ``transformer.ln_f``,
  ``transformer.ff_out.weight`` when untied;
* optim.pt: ``torch.optim.AdamW.state_dict()`` over OLMo's parameter groups (decayed Linear
  weights first, names sorted, then the rest with weight_decay 0; each group carries
  ``param_names``), state keyed by index as under DDP, or by name as FSDP writes it;
* train.pt: the trainer state, with the pathlib paths and NumPy RNG state OLMo pickles;
* config.yaml: a TrainConfig with every model field written out.

It returns an :class:`OlmoReference`, whose ``forward`` is OLMo's forward pass written
directly against those fused tensors (not kiln's model), and whose ``lr`` is OLMo's scheduler.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

MODEL_DEFAULTS: dict[str, Any] = {
    "d_model": 64, "n_heads": 4, "n_kv_heads": None, "clip_qkv": None, "n_layers": 2,
    "mlp_ratio": 4, "mlp_hidden_size": None, "activation_type": "swiglu",
    "block_type": "sequential", "block_group_size": 1, "alibi": False, "alibi_bias_max": 8.0,
    "rope": True, "rope_full_precision": True, "rope_theta": 10000, "flash_attention": False,
    "attention_dropout": 0.0, "multi_query_attention": None, "attention_layer_norm": False,
    "residual_dropout": 0.0, "embedding_dropout": 0.0, "embedding_layer_norm": False,
    "layer_norm_type": "default", "layer_norm_with_affine": False, "layer_norm_eps": 1e-5,
    "attention_layer_norm_with_affine": True, "max_sequence_length": 64,
    "include_bias": False, "bias_for_layer_norm": None, "scale_logits": False,
    "vocab_size": 500, "embedding_size": 512, "weight_tying": True, "eos_token_id": 0,
    "pad_token_id": 1, "init_device": None, "init_fn": "normal", "init_std": 0.02,
    "init_cutoff_factor": None, "precision": None, "scale_emb_init": False,
    "emb_init_std": None, "norm_after": False,
}


class OlmoReference:
    """OLMo's forward pass and LR schedule over the tensors a checkpoint holds."""

    def __init__(self, path: Path, config: dict[str, Any], state: dict[str, torch.Tensor],
                 optim: dict[str, Any], train: dict[str, Any]):
        self.path, self.config, self.state, self.optim, self.train = (
            path, config, state, optim, train)
        self.m = config["model"]

    # -- the model ---------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self.state.get(prefix + ".weight")
        b = self.state.get(prefix + ".bias")
        eps = self.m["layer_norm_eps"]
        if self.m["layer_norm_type"] == "rms":
            xf = x.float()
            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
            if w is not None:
                y = w * y + (b if b is not None else 0)
            return y
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, self.state[prefix + ".weight"], self.state.get(prefix + ".bias"))

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        B, nh, T, hs = x.size()
        x1, x2 = x.view(B, nh, T, 2, hs // 2).unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.m
        B, T = ids.shape
        d, H = m["d_model"], m["n_heads"]
        hd = d // H
        kv = m["n_kv_heads"] or (1 if m["multi_query_attention"] else H)
        if m["block_type"] == "llama":
            kv = 1 if m["multi_query_attention"] else H
        after = m["norm_after"] and m["block_type"] == "sequential"
        inv_freq = 1.0 / (m["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        freqs = torch.einsum("i , j -> i j", torch.arange(T, dtype=torch.float), inv_freq)
        pos = torch.cat((freqs, freqs), dim=-1)
        sin, cos = pos.sin()[None, None], pos.cos()[None, None]
        mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)

        x = self.state["transformer.wte.weight"][ids]
        for i in range(m["n_layers"]):
            p = f"transformer.blocks.{i}."
            h = x if after else self._norm(x, p + "attn_norm")
            if m["block_type"] == "llama":
                q, k, v = (self._linear(h, p + n) for n in ("q_proj", "k_proj", "v_proj"))
            else:
                q, k, v = self._linear(h, p + "att_proj").split((d, kv * hd, kv * hd), dim=-1)
            if m["attention_layer_norm"]:
                q, k = self._norm(q, p + "q_norm"), self._norm(k, p + "k_norm")
            q = q.view(B, T, H, hd).transpose(1, 2)
            k = k.view(B, T, kv, hd).transpose(1, 2)
            v = v.view(B, T, kv, hd).transpose(1, 2)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            k = k.repeat_interleave(H // kv, dim=1)
            v = v.repeat_interleave(H // kv, dim=1)
            att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd) + mask, dim=-1) @ v
            att = self._linear(att.transpose(1, 2).reshape(B, T, d), p + "attn_out")
            if after:
                att = self._norm(att, p + "attn_norm")
            x = x + att
            h = x if after else self._norm(x, p + "ff_norm")
            value, gate = self._linear(h, p + "ff_proj").chunk(2, dim=-1)
            h = self._linear(F.silu(gate) * value, p + "ff_out")
            if after:
                h = self._norm(h, p + "ff_norm")
            x = x + h
        x = self._norm(x, "transformer.ln_f")
        if m["weight_tying"]:
            return F.linear(x, self.state["transformer.wte.weight"])
        return self._linear(x, "transformer.ff_out")

    __call__ = forward

    # -- the optimizer and the schedule ------------------------------------------------------

    def adam_state(self, name: str) -> dict[str, torch.Tensor]:
        """The optim.pt state of the OLMo parameter `name` (either keying)."""
        state = self.optim["state"]
        if name in state:
            return state[name]
        for g in self.optim["param_groups"]:
            for pid, pname in zip(g["params"], g["param_names"]):
                if pname == name:
                    return state[pid]
        raise KeyError(name)

    def max_steps(self) -> int:
        md = self.config["max_duration"]
        return int(md) if not isinstance(md, str) else int(float(md))

    def lr(self, step: int) -> float:
        """olmo/optim.py's scheduler: the LR of the step that brings global_step to `step`."""
        s, lr = self.config["scheduler"], self.config["optimizer"]["learning_rate"]
        name, warm = s["name"], int(s["t_warmup"])
        max_steps = int(s["t_max"]) if s["t_max"] is not None else self.max_steps()
        eta_min = lr * s["alpha_f"]
        wmin = s["warmup_min_lr"] if s["warmup_min_lr"] is not None else lr * 0.10
        if name == "constant":
            return lr
        if step < warm:
            return wmin + (lr - wmin) * min(step, warm) / warm
        if name == "inverse_sqrt_with_warmup":  # no t_max, no alpha_f
            return lr * math.sqrt(warm / max(warm, step))
        if name == "constant_with_warmup":
            return lr
        if step >= max_steps:
            return eta_min
        frac = (step - warm) / (max_steps - warm)
        if name == "cosine_with_warmup":
            return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * frac)) / 2
        if name == "linear_with_warmup":
            return lr - (lr - eta_min) * frac
        raise ValueError(name)


def _param_names(m: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of an OLMo model's parameters, in OLMo's module order."""
    d, H = m["d_model"], m["n_heads"]
    hd = d // H
    kv = (m["n_kv_heads"] or (1 if m["multi_query_attention"] else H)) * hd
    if m["block_type"] == "llama":
        kv = (1 if m["multi_query_attention"] else H) * hd
    fused = m["mlp_hidden_size"] or m["mlp_ratio"] * d
    emb = m["embedding_size"] or m["vocab_size"]
    affine = m["layer_norm_with_affine"]
    ln_bias = m["include_bias"] if m["bias_for_layer_norm"] is None else m["bias_for_layer_norm"]
    lin_bias = m["include_bias"]

    def norm(prefix: str, size: int, with_affine: bool) -> list[tuple[str, tuple[int, ...]]]:
        if not with_affine:
            return []
        out = [(prefix + ".weight", (size,))]
        return out + [(prefix + ".bias", (size,))] if ln_bias else out

    def linear(prefix: str, n_out: int, n_in: int, bias: bool = lin_bias):
        out = [(prefix + ".weight", (n_out, n_in))]
        return out + [(prefix + ".bias", (n_out,))] if bias else out

    names = [("transformer.wte.weight", (emb, d))] + norm("transformer.ln_f", d, affine)
    for i in range(m["n_layers"]):
        p = f"transformer.blocks.{i}."
        if m["attention_layer_norm"]:
            names += norm(p + "k_norm", kv, m["attention_layer_norm_with_affine"])
            names += norm(p + "q_norm", d, m["attention_layer_norm_with_affine"])
        names += linear(p + "attn_out", d, d) + linear(p + "ff_out", d, fused // 2)
        if m["block_type"] == "llama":
            names += linear(p + "q_proj", d, d) + linear(p + "k_proj", kv, d)
            names += linear(p + "v_proj", kv, d)
        else:
            names += linear(p + "att_proj", d + 2 * kv, d)
        names += linear(p + "ff_proj", fused, d)
        names += norm(p + "attn_norm", d, affine) + norm(p + "ff_norm", d, affine)
    if not m["weight_tying"]:
        names += linear("transformer.ff_out", emb, d)
    return names


def _decays(name: str, o: dict[str, Any]) -> bool:
    """olmo/optim.py get_param_groups: Linear weights decay; biases and norm weights with
    decay_norm_and_bias; the embedding with decay_embeddings."""
    if name.endswith("bias"):
        return o["decay_norm_and_bias"]
    if name == "transformer.wte.weight":
        return o["decay_embeddings"]
    if any(f".{n}." in name for n in ("attn_norm", "ff_norm", "q_norm", "k_norm", "ln_f")):
        return o["decay_norm_and_bias"]
    return True


def build_olmo_checkpoint(path: str | Path, *, global_step: int = 30,
                          global_train_batch_size: int = 8, device_train_microbatch_size: int = 4,
                          max_duration: int | str = 100, optimizer: dict | None = None,
                          scheduler: dict | None = None, optim_keys: str = "index",
                          extra: dict | None = None, seed: int = 0,
                          **model: Any) -> OlmoReference:
    """Write a tiny random OLMo checkpoint folder at `path` (model fields as keywords, other
    TrainConfig fields in `extra`) and return its :class:`OlmoReference`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    m = {**MODEL_DEFAULTS, **model}
    o = {"name": "adamw", "learning_rate": 4e-3, "weight_decay": 0.1, "betas": [0.9, 0.95],
         "eps": 1e-8, "no_decay_norm_and_bias": None, "selective_updates": False,
         "decay_norm_and_bias": False, "decay_embeddings": False,
         "metrics_log_interval": None, "record_update_metrics": False, **(optimizer or {})}
    s = {"name": "cosine_with_warmup", "units": "steps", "t_warmup": 10, "t_max": None,
         "alpha_f": 0.1, "grad_clip_warmup_steps": None, "grad_clip_warmup_factor": None,
         "warmup_min_lr": None, **(scheduler or {})}
    config = {
        "run_name": "tiny", "seed": 6198, "epoch": None, "dry_run": False, "model": m,
        "optimizer": o, "scheduler": s,
        "data": {"paths": None, "memmap_dtype": "uint16", "datasets": None,
                 "pad_direction": "right", "num_workers": 0, "drop_last": True},
        "tokenizer": {"identifier": "gpt2", "truncate_direction": "right"},
        "save_folder": str(path.parent), "global_train_batch_size": global_train_batch_size,
        "device_train_batch_size": global_train_batch_size,
        "device_train_microbatch_size": device_train_microbatch_size,
        "max_duration": max_duration, "max_grad_norm": 1.0, "max_grad_norm_ratio": None,
        "precision": "amp_bf16", "softmax_auxiliary_loss": False,
        "auxiliary_loss_multiplier": 1e-4, **(extra or {}),
    }
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    state: dict[str, torch.Tensor] = {}
    for name, shape in _param_names(m):
        if name == "transformer.wte.weight":
            state[name] = randn(*shape, std=0.1)
        elif name.endswith(".bias"):
            state[name] = randn(*shape, std=0.05)
        elif len(shape) == 1:  # norm weight
            state[name] = 1.0 + randn(*shape, std=0.1)
        else:
            state[name] = randn(*shape, std=1.0 / math.sqrt(shape[1]))
    torch.save(state, path / "model.pt")

    # optim.pt: a real AdamW state dict over OLMo's parameter groups
    params = {n: torch.nn.Parameter(t.clone()) for n, t in state.items()}
    decay = sorted(n for n in params if _decays(n, o))
    no_decay = sorted(n for n in params if not _decays(n, o))
    common = {"sharded": False, "max_grad_norm": config["max_grad_norm"],
              "max_grad_norm_ratio": None}
    groups = [{"params": [params[n] for n in decay], "param_names": decay, **common}]
    if no_decay:
        groups.append({"params": [params[n] for n in no_decay], "param_names": no_decay,
                       "weight_decay": 0.0, **common})
    opt = torch.optim.AdamW(groups, lr=o["learning_rate"], betas=tuple(o["betas"]),
                            eps=o["eps"], weight_decay=o["weight_decay"])
    ref = OlmoReference(path, config, state, {}, {})
    for g in opt.param_groups:
        g["lr"] = ref.lr(global_step) if global_step else o["learning_rate"]
        g["initial_lr"] = o["learning_rate"]
    if global_step > 0:
        for p in params.values():
            opt.state[p] = {"step": torch.tensor(float(global_step)),
                            "exp_avg": randn(*p.shape, std=1e-3),
                            "exp_avg_sq": randn(*p.shape).abs() * 1e-6}
    osd = opt.state_dict()
    if optim_keys == "names":  # FSDP's full optimizer state dict: keyed by parameter name
        id_to_name = {pid: n for g in osd["param_groups"]
                      for pid, n in zip(g["params"], g["param_names"])}
        osd["state"] = {id_to_name[k]: v for k, v in osd["state"].items()}
        for g in osd["param_groups"]:
            g["params"] = list(g["param_names"])
    torch.save(osd, path / "optim.pt")

    seq = m["max_sequence_length"]
    random.seed(seed)
    np.random.seed(seed)
    train = {
        "epoch": 0, "global_step": global_step,
        "global_train_examples_seen_this_epoch": global_step * global_train_batch_size,
        "global_train_tokens_seen": global_step * global_train_batch_size * seq,
        "world_size": 1, "checkpoints": [], "unsharded_checkpoints": [path],
        "ephemeral_checkpoints": [],
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.random.get_rng_state()},
    }
    torch.save(train, path / "train.pt")
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    ref.optim, ref.train = osd, train
    return ref


if __name__ == "__main__":  # python tests/olmo_fixture.py OUT_DIR [model fields as k=v]
    import sys

    overrides = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in sys.argv[2:])}
    build_olmo_checkpoint(sys.argv[1], **overrides)
    print(f"wrote {sys.argv[1]}")
