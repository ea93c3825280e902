"""Hugging Face transformers interop: export kiln checkpoints as native Llama / OLMo / OLMo-2
models, and import such models as kiln checkpoints.

Export writes a folder ``AutoModelForCausalLM.from_pretrained`` loads with no custom code::

    config.json                 LlamaForCausalLM | OlmoForCausalLM | Olmo2ForCausalLM
    generation_config.json      eos / bos / pad ids (and the padded vocabulary rows suppressed)
    model.safetensors           or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    tokenizer.json              the checkpoint's tokenizer, with tokenizer_config.json and
    tokenizer_config.json       special_tokens_map.json so AutoTokenizer loads it
    special_tokens_map.json

Which HF class a kiln shape maps to (:func:`infer_arch`)::

    llama   norm=rmsnorm,                 norm_placement=pre,       qk_norm=false  (bias ok)
    olmo    norm=nonparametric_layernorm, norm_placement=pre,       norm_eps=1e-5, bias=false
    olmo2   norm=rmsnorm,                 norm_placement=reordered, qk_norm=true,  bias=false

Anything else (parametric LayerNorm, reordered norms without QK-norm, ...) has no faithful HF
equivalent and is refused. Tensor names map one to one (RoPE uses the same rotate_half layout,
so q/k need no permutation); HF's ``vocab_size`` is kiln's ``padded_vocab_size`` so the shapes
match, and the padding ids are listed in ``suppress_tokens`` so HF generation never samples
them, as kiln's ``generate`` does not.

transformers itself is optional: nothing here imports it (only the tests and users do).
This module imports torch lazily too, so the CLI can build its parser cheaply.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.config import Config, DataConfig, ModelConfig
from kiln.errors import KilnError, one_line, warn

if TYPE_CHECKING:  # torch is imported where it is used: `kiln --help` stays fast
    import torch

ARCHS = ("llama", "olmo", "olmo2")
HF_CLASSES = {"llama": "LlamaForCausalLM", "olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM"}
OLMO_LAYERNORM_EPS = 1e-5  # OlmoLayerNorm hard-codes it
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "<|pad|>", "[PAD]")

# Stored by some older HF checkpoints; recomputed from the config, never a real weight.
_IGNORED_HF_TENSORS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------------------------
# Which HF class fits


def infer_arch(model_cfg: ModelConfig) -> str:
    """The HF architecture ("llama", "olmo" or "olmo2") that computes what this kiln shape
    computes; KilnError naming the reason when there is none."""
    m = model_cfg
    if m.norm == "layernorm":
        raise KilnError(
            "model.norm=layernorm (LayerNorm with weight and bias) has no Hugging Face "
            "equivalent in Llama/OLMo/OLMo-2; only rmsnorm (llama, olmo2) and "
            "nonparametric_layernorm (olmo) models can be exported"
        )
    if m.norm == "nonparametric_layernorm":
        arch = "olmo"
    elif m.norm_placement == "reordered":
        arch = "olmo2"
    else:
        arch = "llama"
    check_exportable(m, arch)
    return arch


def check_exportable(model_cfg: ModelConfig, arch: str) -> None:
    """Refuse (KilnError with the reason) a shape the HF class for `arch` cannot express."""
    m = model_cfg
    if arch not in ARCHS:
        raise KilnError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)}")
    cls = HF_CLASSES[arch]

    def refuse(reason: str) -> None:
        raise KilnError(f"cannot export as {arch} ({cls}): {reason}")

    if m.norm == "layernorm":
        refuse("model.norm=layernorm (LayerNorm with weight and bias) has no Hugging Face "
               "equivalent; only rmsnorm and nonparametric_layernorm models can be exported")
    if arch == "llama":
        if m.norm != "rmsnorm":
            refuse(f"Llama uses RMSNorm but model.norm={m.norm}; use --arch olmo for "
                   "nonparametric_layernorm")
        if m.norm_placement != "pre":
            refuse("Llama normalises sublayer inputs (norm_placement=pre) but this model uses "
                   "norm_placement=reordered; use --arch olmo2 (needs qk_norm=true)")
        if m.qk_norm:
            refuse("Llama has no QK-norm but model.qk_norm=true; use --arch olmo2 (needs "
                   "norm_placement=reordered)")
    elif arch == "olmo":
        if m.norm != "nonparametric_layernorm":
            refuse(f"OLMo uses a non-parametric LayerNorm but model.norm={m.norm}")
        if m.norm_placement != "pre":
            refuse("OLMo normalises sublayer inputs (norm_placement=pre) but this model uses "
                   "norm_placement=reordered")
        if m.qk_norm:
            refuse("OLMo has no QK-norm but model.qk_norm=true")
        if m.norm_eps != OLMO_LAYERNORM_EPS:
            refuse(f"OlmoLayerNorm's eps is fixed at {OLMO_LAYERNORM_EPS:g} but "
                   f"model.norm_eps={m.norm_eps:g}")
        if m.bias:
            refuse("OLMo's MLP has no biases but model.bias=true")
    else:  # olmo2
        if m.norm != "rmsnorm":
            refuse(f"OLMo-2 uses RMSNorm but model.norm={m.norm}")
        if m.norm_placement != "reordered":
            refuse("OLMo-2 normalises sublayer outputs (norm_placement=reordered) but this "
                   "model uses norm_placement=pre; use --arch llama (without qk_norm)")
        if not m.qk_norm:
            refuse("OLMo-2 always applies QK-norm but model.qk_norm=false; a reordered-norm "
                   "model without QK-norm has no Hugging Face equivalent")
        if m.bias:
            refuse("OLMo-2's MLP has no biases but model.bias=true")


# --------------------------------------------------------------------------------------------
# Configs


def kiln_to_hf_config(model_cfg: ModelConfig, arch: str, eos_token_id: int | None = None,
                      bos_token_id: int | None = None, pad_token_id: int | None = None,
                      dtype: str = "float32") -> dict[str, Any]:
    """config.json for the native HF class of `arch` (checked with :func:`check_exportable`).

    vocab_size is the padded vocabulary (the tensors' row count). RoPE is written both as
    transformers 5's ``rope_parameters`` and as the older top-level ``rope_theta``."""
    m = model_cfg
    check_exportable(m, arch)
    cfg: dict[str, Any] = {
        "architectures": [HF_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": m.padded_vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.hidden_size,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init_std,
        "rope_theta": float(m.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rope_theta)},
        "attention_bias": bool(m.bias),
        "attention_dropout": 0.0,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if arch == "llama":
        cfg.update(rms_norm_eps=m.norm_eps, mlp_bias=bool(m.bias), head_dim=m.head_dim,
                   pretraining_tp=1)
    elif arch == "olmo":
        cfg.update(clip_qkv=None)
    else:
        cfg.update(rms_norm_eps=m.norm_eps)
    return cfg


def _rope_theta(hf: dict[str, Any]) -> float:
    params = None
    for key in ("rope_parameters", "rope_scaling"):
        value = hf.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise KilnError(f"config.json field {key}={value!r} is not a mapping; kiln "
                            "supports plain RoPE only")
        rope_type = value.get("rope_type", value.get("type", "default"))
        if rope_type not in (None, "default"):
            raise KilnError(f"config.json field {key}.rope_type={rope_type!r} (RoPE scaling) "
                            "is not supported: kiln implements plain RoPE only")
        factor = value.get("partial_rotary_factor")
        if factor not in (None, 1, 1.0):
            raise KilnError(f"config.json field {key}.partial_rotary_factor={factor} is not "
                            "supported: kiln rotates the whole head")
        if params is None:
            params = value
    factor = hf.get("partial_rotary_factor")
    if factor not in (None, 1, 1.0):
        raise KilnError(f"config.json field partial_rotary_factor={factor} is not supported: "
                        "kiln rotates the whole head")
    if params is not None and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    if hf.get("rope_theta") is not None:
        return float(hf["rope_theta"])
    return 10000.0


def hf_to_kiln_config(hf_config: dict[str, Any]) -> ModelConfig:
    """The kiln ModelConfig of a Llama / OLMo / OLMo-2 config.json (as a dict); KilnError naming
    the field when the model uses something kiln's Transformer cannot compute."""
    hf = hf_config
    mt = hf.get("model_type")
    if mt not in ARCHS:
        raise KilnError(f"config.json model_type={mt!r} is not supported; kiln imports "
                        f"{', '.join(ARCHS)} models")

    def need(key: str) -> int:
        value = hf.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise KilnError(f"config.json field {key}={value!r} is missing or not a positive "
                            "integer")
        return value

    d, n_layers, n_heads = need("hidden_size"), need("num_hidden_layers"), need(
        "num_attention_heads")
    inter, vocab = need("intermediate_size"), need("vocab_size")
    kv = hf.get("num_key_value_heads") or n_heads
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise KilnError(f"config.json field hidden_act={act!r} is not supported: kiln's MLP is "
                        "SwiGLU (silu)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != d // n_heads:
        raise KilnError(f"config.json field head_dim={head_dim} differs from hidden_size / "
                        f"num_attention_heads = {d // n_heads}; kiln derives head_dim from them")
    if hf.get("clip_qkv") is not None:
        raise KilnError(f"config.json field clip_qkv={hf['clip_qkv']} is not supported: kiln "
                        "does not clip q/k/v")
    for key in ("sliding_window", "use_sliding_window"):
        if hf.get(key):
            raise KilnError(f"config.json field {key}={hf[key]!r} is not supported: kiln "
                            "attends to the whole causal context")
    attn_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if mt == "llama":
        if attn_bias != mlp_bias:
            raise KilnError(f"config.json fields attention_bias={attn_bias} and mlp_bias="
                            f"{mlp_bias} differ; kiln's model.bias puts biases on both or neither")
        bias = attn_bias
    else:
        if attn_bias:
            raise KilnError(f"config.json field attention_bias=true is not supported for {mt}: "
                            "kiln's model.bias also adds MLP biases, which OLMo has not")
        bias = False
    theta = _rope_theta(hf)
    common = dict(
        d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=None if kv == n_heads else kv,
        mlp_hidden_size=inter, vocab_size=vocab, pad_vocab_multiple=128 if vocab % 128 == 0 else 1,
        max_seq_len=int(hf.get("max_position_embeddings") or 2048), rope_theta=theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), bias=bias,
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    if mt == "llama":
        mc = ModelConfig(**common, norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                         norm_placement="pre", qk_norm=False)
    elif mt == "olmo":
        mc = ModelConfig(**common, norm="nonparametric_layernorm", norm_eps=OLMO_LAYERNORM_EPS,
                         norm_placement="pre", qk_norm=False)
    else:
        mc = ModelConfig(**common, norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                         norm_placement="reordered", qk_norm=True)
    mc.validate()
    return mc


# --------------------------------------------------------------------------------------------
# Tensor names


def _hf_name(name: str, arch: str) -> str:
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "final_norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.([a-z_]+)\.(.+)", name)
    if m is None:
        raise KilnError(f"kiln tensor {name!r} has no Hugging Face name")
    i, part, rest = m.groups()
    pre = f"model.layers.{i}."
    if part == "attn":
        return pre + "self_attn." + rest
    if part == "mlp":
        return pre + "mlp." + rest
    if part == "attn_norm":
        return pre + ("post_attention_layernorm." if arch == "olmo2" else "input_layernorm.") + rest
    if part == "mlp_norm":
        return pre + ("post_feedforward_layernorm." if arch == "olmo2"
                      else "post_attention_layernorm.") + rest
    raise KilnError(f"kiln tensor {name!r} has no Hugging Face name")


def tensor_layout(model_cfg: ModelConfig, arch: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(kiln name, HF name, shape) of every stored tensor, in model order; a tied output head
    is not listed (stored once, as the embedding, in both formats)."""
    import torch

    from kiln.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model_cfg.tie_embeddings:
            continue
        out.append((name, _hf_name(name, arch), tuple(t.shape)))
    return out


# --------------------------------------------------------------------------------------------
# Export


def _kiln_to_hf_state(state: dict[str, torch.Tensor], mc: ModelConfig, arch: str,
                      where: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    layout = tensor_layout(mc, arch)
    known = {k for k, _, _ in layout} | {"lm_head.weight"}
    for kname, hname, shape in layout:
        t = state.get(kname)
        if t is None:
            raise KilnError(f"{where} has no tensor {kname!r} that the checkpoint's config.yaml "
                            "needs; the checkpoint is damaged or was written by another model")
        if tuple(t.shape) != shape:
            raise KilnError(f"{where}: tensor {kname} is {list(t.shape)} but the checkpoint's "
                            f"config.yaml says {list(shape)}; the checkpoint is damaged")
        out[hname] = t.detach().to("cpu").contiguous()
    extra = [k for k in state if k not in known]
    if extra:
        raise KilnError(f"{where} has tensor {extra[0]!r} that the checkpoint's config.yaml does "
                        "not describe; the checkpoint is damaged or was written by another model")
    return out


def parse_size(value: str | int) -> int:
    """Bytes from 5GB / 500MB / 2GiB / 1234 (GB = 10**9, GiB = 2**30, as Hugging Face)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), re.IGNORECASE)
        if m is None:
            raise KilnError(f"--max-shard-size {value!r} is not a size; write e.g. 5GB, 500MB "
                            "or a number of bytes")
        unit = (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
                 "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        n = int(float(m.group(1)) * scale)
    if n < 1:
        raise KilnError(f"--max-shard-size {value!r} must be at least 1 byte")
    return n


def _write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int
                   ) -> list[str]:
    """model.safetensors, or shards of at most max_shard_size bytes (a larger single tensor
    gets a shard of its own) plus model.safetensors.index.json. Returns the file names."""
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    sizes = {k: t.numel() * t.element_size() for k, t in state.items()}
    total = sum(sizes.values())
    if total <= max_shard_size:
        save_file(state, str(folder / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = []
    cur: dict[str, torch.Tensor] = {}
    cur_size = 0
    for k, t in state.items():
        if cur and cur_size + sizes[k] > max_shard_size:
            shards.append(cur)
            cur, cur_size = {}, 0
        cur[k] = t
        cur_size += sizes[k]
    if cur:
        shards.append(cur)
    n = len(shards)
    weight_map: dict[str, str] = {}
    names = []
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
        names.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def _special_tokens(tok, eos_id: int | None, vocab: int
                    ) -> dict[str, tuple[str | None, int | None]]:
    """{"eos"|"bos"|"pad": (token string or None, id or None)} from a `tokenizers.Tokenizer`
    (or None)."""
    found: dict[str, tuple[str | None, int | None]] = {}
    for role, names in (("eos", EOS_CANDIDATES), ("bos", BOS_CANDIDATES),
                        ("pad", PAD_CANDIDATES)):
        found[role] = (None, None)
        if role == "eos" and eos_id is not None:
            if not 0 <= eos_id < vocab:
                raise KilnError(f"data.eos_token_id={eos_id} is outside the vocabulary "
                                f"(0..{vocab - 1}); fix data.eos_token_id in the checkpoint's "
                                "config.yaml")
            found[role] = (tok.id_to_token(eos_id) if tok is not None else None, eos_id)
            continue
        if tok is None:
            continue
        for name in names:
            i = tok.token_to_id(name)
            if i is not None and i < vocab:
                found[role] = (name, i)
                break
    return found


def export_hf(src: str | Path, out_dir: str | Path, arch: str | None = None,
              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, verify: str = "full") -> Path:
    """Write the kiln checkpoint `src` (a checkpoint folder, or a RUN_DIR meaning its latest
    checkpoint; unsharded or sharded) as a Hugging Face model folder `out_dir`.

    `arch` defaults to :func:`infer_arch`. Weights keep the checkpoint's dtype. The folder
    appears only when complete: it is written under a hidden name beside it and renamed.
    Every file read is verified against the checkpoint's manifest (`verify`); a tokenizer that
    fails is left out with a warning (the weights do not need it)."""
    from kiln import checkpoint as ckpt
    from kiln.config import config_from_dict
    from kiln.data.tokenizers import load_tokenizer

    out = Path(out_dir)
    path = ckpt.resolve(src, ckpt.WEIGHTS_ONLY)  # weights need no more
    cfg = config_from_dict(ckpt.read_config_dict(path, verify))
    mc = cfg.model
    if arch is None:
        arch = infer_arch(mc)
    check_exportable(mc, arch)
    max_shard_size = parse_size(max_shard_size)
    tok = tok_bytes = None
    if (path / "tokenizer.json").is_file():
        try:
            tok_bytes = ckpt.read_part(path, "tokenizer.json", verify)
            tok = load_tokenizer(path / "tokenizer.json", tok_bytes)
        except KilnError as e:
            warn(f"exporting the weights without the tokenizer: {e}")
            tok = tok_bytes = None
    special = _special_tokens(tok, cfg.data.eos_token_id, mc.padded_vocab_size)

    with ckpt.staged_folder(out) as staging:
        state = ckpt.read_weights(path, verify)
        hf_state = _kiln_to_hf_state(state, mc, arch, ckpt.weights_path(path))
        del state
        dtypes = {t.dtype for t in hf_state.values()}
        dtype = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
        eos, bos, pad = (special[r][1] for r in ("eos", "bos", "pad"))
        config = kiln_to_hf_config(mc, arch, eos, bos, pad, dtype=dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen: dict[str, Any] = {}
        for role, i in (("bos", bos), ("eos", eos), ("pad", pad)):
            if i is not None:
                gen[f"{role}_token_id"] = i
        if mc.padded_vocab_size > mc.vocab_size:  # kiln never samples the padding rows
            gen["suppress_tokens"] = list(range(mc.vocab_size, mc.padded_vocab_size))
        (staging / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_weights(hf_state, staging, max_shard_size)
        if tok_bytes is not None:
            (staging / "tokenizer.json").write_bytes(tok_bytes)
            tokens = {f"{r}_token": special[r][0] for r in ("bos", "eos", "pad")
                      if special[r][0] is not None}
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast",
                       "model_max_length": mc.max_seq_len,
                       "clean_up_tokenization_spaces": False, **tokens}
            (staging / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
            (staging / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# Import


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KilnError(f"cannot read {path}: {one_line(e)}") from e
    if not isinstance(data, dict):
        raise KilnError(f"{path} is not a JSON object")
    return data


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory."""
    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise KilnError(f"{d} is not a Hugging Face model directory (no config.json)")
    return _read_json(d / "config.json")


def _weight_files(d: Path) -> dict[str, str] | None:
    """{HF tensor name: file} from the index, or None for a single model.safetensors."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise KilnError(f"{index} has no weight_map; the index is damaged")
        return {str(k): str(v) for k, v in wm.items()}
    if (d / "model.safetensors").is_file():
        return None
    if any(d.glob("pytorch_model*.bin")) or any(d.glob("*.bin")):
        raise KilnError(f"{d} holds pytorch_model.bin weights, which kiln does not read "
                        "(unpickling is unsafe); re-save them as safetensors: "
                        "model.save_pretrained(dir, safe_serialization=True)")
    raise KilnError(f"{d} has no model.safetensors or model.safetensors.index.json; it is not "
                    "a Hugging Face model folder")


def load_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(kiln ModelConfig, kiln state dict) of a Hugging Face Llama / OLMo / OLMo-2 folder with
    safetensors weights (single file or index-sharded). Every tensor the config implies must be
    present with its shape; a tied head is returned as the embedding tensor itself."""
    from safetensors import SafetensorError, safe_open

    d = Path(hf_dir)
    if not d.is_dir():
        raise KilnError(f"Hugging Face model folder {str(d)!r} does not exist")
    if not (d / "config.json").is_file():
        raise KilnError(f"{d} has no config.json; it is not a Hugging Face model folder")
    hf_cfg = _read_json(d / "config.json")
    mc = hf_to_kiln_config(hf_cfg)
    arch = hf_cfg["model_type"]
    weight_map = _weight_files(d)
    layout = tensor_layout(mc, arch)

    handles: dict[str, Any] = {}

    def open_file(fname: str):
        if fname not in handles:
            f = d / fname
            if not f.is_file():
                raise KilnError(f"{f} is missing (listed in model.safetensors.index.json); "
                                "copy the complete model folder")
            try:
                h = safe_open(str(f), framework="pt")
                handles[fname] = (h, set(h.keys()))
            except (SafetensorError, OSError) as e:
                raise KilnError(f"cannot read {f}: {one_line(e)}; the file is truncated or "
                                "damaged") from e
        return handles[fname]

    if weight_map is None:
        _, keys = open_file("model.safetensors")
        weight_map = {k: "model.safetensors" for k in sorted(keys)}
    else:
        for fname in sorted(set(weight_map.values())):
            open_file(fname)  # every shard must open, even one holding only ignored tensors

    state: dict[str, torch.Tensor] = {}
    expected = {h for _, h, _ in layout}
    for kname, hname, shape in layout:
        fname = weight_map.get(hname)
        if fname is None:
            raise KilnError(f"{d} has no tensor {hname!r}, which config.json implies; the model "
                            "folder is incomplete or its config.json does not match it")
        f, keys = open_file(fname)
        where = d / fname
        try:
            if hname not in keys:
                raise KilnError(f"{where} has no tensor {hname!r} (the index says it has); the "
                                "file is damaged")
            got = tuple(f.get_slice(hname).get_shape())
            if got != shape:
                raise KilnError(f"tensor {hname} in {where} is {list(got)} but config.json "
                                f"implies {list(shape)}; the weights do not match config.json")
            state[kname] = f.get_tensor(hname)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise KilnError(f"cannot read tensor {hname} from {where}: {one_line(e)}; the file "
                            "is truncated or damaged") from e
    for hname in weight_map:
        if hname in expected or _IGNORED_HF_TENSORS.match(hname):
            continue
        if hname == "lm_head.weight" and mc.tie_embeddings:
            continue  # a tied head saved anyway: HF ignores it too
        raise KilnError(f"{d} has tensor {hname!r} that kiln's {arch} model has no place for; "
                        "the model uses a feature kiln does not support")
    if mc.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return mc, state


def _hf_eos(d: Path, hf_cfg: dict[str, Any], vocab: int) -> int | None:
    sources = []
    if (d / "generation_config.json").is_file():
        sources.append(_read_json(d / "generation_config.json"))
    sources.append(hf_cfg)
    for src in sources:
        eos = src.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if isinstance(eos, int) and not isinstance(eos, bool) and 0 <= eos < vocab:
            return eos
    return None


def import_hf(hf_dir: str | Path, out_checkpoint: str | Path) -> Path:
    """Write a Hugging Face Llama / OLMo / OLMo-2 folder as a complete kiln checkpoint folder
    (weights, config.yaml, trainer.json at step 0, tokenizer.json when the folder has one; no
    optimizer state). Usable with ``kiln generate``, ``kiln export hf`` and ``init.from``."""
    from safetensors.torch import save_file

    from kiln import checkpoint as ckpt
    from kiln.config import config_from_dict

    d = Path(hf_dir)
    out = Path(out_checkpoint)
    if out.exists() or out.is_symlink():
        raise KilnError(f"{out} exists; choose a new output folder")
    mc, state = load_hf(d)
    eos = _hf_eos(d, _read_json(d / "config.json"), mc.padded_vocab_size)
    cfg = Config(model=mc, data=DataConfig(eos_token_id=eos, seq_len=min(1024, mc.max_seq_len)))
    config_yaml = cfg.to_yaml()
    config_from_dict(cfg.to_dict())  # what readers of the checkpoint will do: must validate
    trainer = {"step": 0, "tokens_seen": 0, "data": {"epoch": 0, "tokens_in_epoch": 0},
               "schedule": {"segments": [], "warmup_end": 0}, "total_steps": 0,
               "tokens_per_step": 0, "source": "hf:" + str(d.resolve())}
    with ckpt.staged_folder(out) as staging:
        save_file(ckpt.dedupe_tied(state), str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        (staging / "config.yaml").write_text(config_yaml)
        (staging / "trainer.json").write_text(json.dumps(trainer, indent=1))
        if (d / "tokenizer.json").is_file():
            shutil.copyfile(d / "tokenizer.json", staging / "tokenizer.json")
        ckpt.write_manifest(staging, 0)
    return out


# --------------------------------------------------------------------------------------------
# CLI: kiln export hf SRC OUT / kiln import hf HF_DIR OUT_CHECKPOINT


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint folder, or a run directory (its latest)")
    parser.add_argument("out", help="new folder for the Hugging Face model")
    parser.add_argument("--arch", choices=ARCHS, default=None,
                        help="HF class: llama, olmo or olmo2 (default: inferred from the model "
                        "config)")
    parser.add_argument("--max-shard-size", default="5GiB",
                        help="largest safetensors file before the weights are split into "
                        "shards with an index (e.g. 5GB, 500MB; default 5GiB)")
    from kiln.checkpoint import add_verify_argument

    add_verify_argument(parser)


def run_export(args: argparse.Namespace, *_: Any) -> int:
    out = export_hf(args.src, args.out, arch=args.arch,
                    max_shard_size=parse_size(args.max_shard_size), verify=args.verify)
    config = json.loads((out / "config.json").read_text())
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out} ({config['architectures'][0]}): {', '.join(files)}")
    if not (out / "tokenizer.json").is_file():
        print("note: the checkpoint has no usable tokenizer.json, so none was exported; copy "
              "the tokenizer files into the folder to use AutoTokenizer")
    return 0


def add_import_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face model folder (Llama, OLMo or OLMo-2, "
                        "safetensors weights)")
    parser.add_argument("out_checkpoint", help="new kiln checkpoint folder")


def run_import_hf(args: argparse.Namespace, *_: Any) -> int:
    out = import_hf(args.hf_dir, args.out_checkpoint)
    print(f"wrote kiln checkpoint {out}; use it with `kiln generate {out}`, "
          f"`kiln export hf {out} OUT` or init.from: {out}")
    return 0
