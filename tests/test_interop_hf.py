"""Hugging Face interop: kiln checkpoints export to native Llama / OLMo / OLMo-2 classes that
compute the same logits, and HF folders import back bit-exactly. CPU, fp32, offline."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from kiln import checkpoint as ckpt  # noqa: E402
from kiln.config import Config, DataConfig, ModelConfig, config_from_dict  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.generate import generate  # noqa: E402
from kiln.interop import hf as khf  # noqa: E402
from kiln.model import Transformer  # noqa: E402

ARCH_SHAPES = {
    # llama: grouped-query attention, biases, and a vocabulary with padding rows
    "llama": dict(norm="rmsnorm", n_kv_heads=2, bias=True, vocab_size=500, norm_eps=1e-6),
    "olmo": dict(norm="nonparametric_layernorm"),
    "olmo2": dict(norm="rmsnorm", norm_placement="reordered", qk_norm=True, norm_eps=1e-6,
                  rope_theta=500000.0),
}


def model_cfg(arch: str, tied: bool, **over) -> ModelConfig:
    kw = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=96, vocab_size=512,
              max_seq_len=64, tie_embeddings=tied)
    kw.update(ARCH_SHAPES[arch])
    kw.update(over)
    return ModelConfig(**kw)


@pytest.fixture(scope="module")
def tokenizer_path(pydoc_tokens) -> Path:
    return pydoc_tokens.parent / "tokenizer.json"


@pytest.fixture(scope="module")
def eos_id(tokenizer_path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path)).token_to_id("<|endoftext|>")


def make_checkpoint(run: Path, mc: ModelConfig, tokenizer: Path | None = None,
                    eos: int | None = None, sharded: bool = False, seed: int = 0,
                    boost_padding: bool = False) -> tuple[Path, Transformer]:
    """A real kiln checkpoint of a random model whose norms and biases are not at their init
    values (so a misplaced norm weight would show). boost_padding: make the padding rows of the
    output head win the argmax, as only kiln's restriction to the real vocabulary stops them."""
    torch.manual_seed(seed)
    model = Transformer(mc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
        if boost_padding:
            model.lm_head.weight[mc.vocab_size:] *= 100
    model.eval()
    cfg = Config(model=mc, data=DataConfig(seq_len=32, eos_token_id=eos))
    trainer = {"step": 1, "tokens_seen": 0}
    if sharded:
        tmp = ckpt.temp_dir(run, 1)
        tmp.mkdir()
        ckpt.save_sharded_state({"model": model.state_dict()}, tmp)
        path = ckpt.save(run, 1, model=None, trainer=trainer, config_yaml=cfg.to_yaml(),
                         tokenizer=tokenizer, tmp=tmp)
    else:
        path = ckpt.save(run, 1, model=model.state_dict(), trainer=trainer,
                         config_yaml=cfg.to_yaml(), tokenizer=tokenizer)
    return path, model


def load_hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def safetensors_contents(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_nothing_left(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(".tmp-")]


def one_line_error(fn, *args, match: str) -> KilnError:
    with pytest.raises(KilnError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return info.value


# --------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["llama", "olmo", "olmo2"])
def test_export_loads_as_native_class_with_same_logits(arch, tied, tmp_path, tokenizer_path,
                                                       eos_id):
    mc = model_cfg(arch, tied)
    _, model = make_checkpoint(tmp_path / "run", mc, tokenizer_path, eos_id)
    assert khf.infer_arch(mc) == arch
    out = khf.export_hf(tmp_path / "run", tmp_path / "hf")  # RUN_DIR: its latest checkpoint

    hf = load_hf_model(out)
    assert type(hf).__name__ == khf.HF_CLASSES[arch]
    assert type(hf).__module__.startswith("transformers.models.")  # native, no remote code
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == mc.padded_vocab_size
    assert config["eos_token_id"] == eos_id
    assert hf.config.rope_parameters["rope_theta"] == mc.rope_theta
    names = set(safetensors_contents(out))
    assert ("lm_head.weight" in names) != tied
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}

    tokens = torch.randint(0, mc.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "olmo2"])
def test_greedy_generation_matches_kiln(arch, tmp_path, tokenizer_path, eos_id):
    # llama: vocab 500 padded to 512, so HF must be kept off the padding rows as kiln is
    mc = model_cfg(arch, tied=False)
    _, model = make_checkpoint(tmp_path / "run", mc, tokenizer_path, eos_id, seed=3,
                               boost_padding=True)
    out = khf.export_hf(tmp_path / "run", tmp_path / "hf")
    hf = load_hf_model(out)
    if mc.padded_vocab_size > mc.vocab_size:  # the padding rows really would win
        with torch.no_grad():
            assert hf(torch.tensor([[1, 2, 3]])).logits[0, -1].argmax() >= mc.vocab_size
    for seed in range(3):
        prompt = torch.randint(0, mc.vocab_size, (1, 5),
                               generator=torch.Generator().manual_seed(seed))
        ours = generate(model, prompt[0].tolist(), 30, greedy=True, eos_token_id=eos_id)
        with torch.no_grad():
            seq = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=30)
        assert seq[0, prompt.shape[1]:].tolist() == ours
        assert len(ours) > 3


def test_exported_tokenizer_matches_kiln_tokenizer(tmp_path, tokenizer_path, eos_id):
    from tokenizers import Tokenizer

    make_checkpoint(tmp_path / "run", model_cfg("olmo", True), tokenizer_path, eos_id)
    out = khf.export_hf(tmp_path / "run", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    kiln_tok = Tokenizer.from_file(str(tokenizer_path))
    texts = ["The for statement is used to iterate over the elements of a sequence.",
             "def f(x):\n    return x ** 2  # squares<|endoftext|>"]
    for text in texts:
        ids = kiln_tok.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok(text)["input_ids"] == kiln_tok.encode(text).ids
        assert tok.decode(ids) == kiln_tok.decode(ids, skip_special_tokens=False)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == eos_id
    assert tok.pad_token == "<|padding|>"
    assert tok.model_max_length == 64
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos_id and gen["pad_token_id"] == tok.pad_token_id


def test_sharded_export_writes_index_loads_and_imports(tmp_path, tokenizer_path, eos_id):
    mc = model_cfg("llama", tied=False)
    src, model = make_checkpoint(tmp_path / "run", mc, tokenizer_path, eos_id)
    out = khf.export_hf(src, tmp_path / "hf", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    n = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                       for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == {f.name for f in files}
    contents = safetensors_contents(out)
    assert set(index["weight_map"]) == set(contents)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in contents.values())
    for f in files:  # every shard within the limit unless it is one oversized tensor
        with safe_open(str(f), framework="pt") as h:
            keys = list(h.keys())
        assert len(keys) == 1 or f.stat().st_size <= 40_000 + 4096

    hf = load_hf_model(out)
    tokens = torch.randint(0, mc.vocab_size, (1, 16))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-5

    back = khf.import_hf(out, tmp_path / "imported")
    original, imported = load_file(str(src / "model.safetensors")), load_file(
        str(back / "model.safetensors"))
    assert original.keys() == imported.keys()
    for k in original:
        assert torch.equal(original[k], imported[k]), k


def test_sharded_kiln_checkpoint_exports(tmp_path, tokenizer_path, eos_id):
    mc = model_cfg("olmo2", tied=True)
    src, model = make_checkpoint(tmp_path / "run", mc, tokenizer_path, eos_id, sharded=True)
    assert ckpt.is_sharded(src)
    out = khf.export_hf(src, tmp_path / "hf")
    assert "lm_head.weight" not in safetensors_contents(out)
    hf = load_hf_model(out)
    tokens = torch.randint(0, mc.vocab_size, (2, 16))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-5
    assert not list(tmp_path.glob("**/full.pt"))


def test_trained_checkpoint_exports(pydoc_tokens, tmp_path, eos_id):
    from kiln.trainer import Trainer

    run = tmp_path / "run"
    cfg = {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 96,
                  "vocab_size": 512, "max_seq_len": 64, "norm": "rmsnorm",
                  "norm_placement": "reordered", "qk_norm": True, "tie_embeddings": False},
        "data": {"paths": [str(pydoc_tokens)], "seq_len": 32, "prefetch": 2},
        "trainer": {"run_dir": str(run), "global_batch_size": 4, "micro_batch_size": 4,
                    "max_duration": 2, "device": "cpu"},
        "checkpoint": {"interval": 0},
        "log": {"console": False},
    }
    Trainer(config_from_dict(cfg)).fit()
    out = khf.export_hf(run, tmp_path / "hf")
    path = ckpt.resolve(run)
    mc = config_from_dict(ckpt.read_meta(path)[1]).model
    model = Transformer(mc)
    ckpt.load_into(path, model, None, tied=mc.tie_embeddings)
    hf = load_hf_model(out)
    assert type(hf).__name__ == "Olmo2ForCausalLM"
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-5
    # config.yaml leaves data.eos_token_id unset (the sidecar has it): the tokenizer's is used
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos_id
    assert (out / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------------------------
# Import and round trips


def test_import_then_export_reproduces_every_tensor(tmp_path, tokenizer_path, eos_id):
    for arch, tied in (("llama", False), ("olmo", True), ("olmo2", False)):
        mc = model_cfg(arch, tied)
        make_checkpoint(tmp_path / f"run-{arch}", mc, tokenizer_path, eos_id)
        first = khf.export_hf(tmp_path / f"run-{arch}", tmp_path / f"hf1-{arch}")
        back = khf.import_hf(first, tmp_path / f"kiln-{arch}")
        assert ckpt.is_complete(back) and ckpt.resolve(back) == back
        trainer = json.loads((back / "trainer.json").read_text())
        assert trainer["step"] == 0 and trainer["source"].startswith("hf:")
        cfg = config_from_dict(ckpt.read_meta(back)[1])
        assert cfg.data.eos_token_id == eos_id
        assert (back / "tokenizer.json").is_file() and not (back / "optim.pt").exists()
        second = khf.export_hf(back, tmp_path / f"hf2-{arch}")

        a, b = safetensors_contents(first), safetensors_contents(second)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        c1 = json.loads((first / "config.json").read_text())
        c2 = json.loads((second / "config.json").read_text())
        assert c1 == c2


def test_hf_written_model_imports_exactly(tmp_path):
    """A model saved by transformers itself (Llama with biases and GQA, bf16) imports, computes
    the same logits in kiln, and exports back to the very same tensors."""
    config = transformers.LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0}, rms_norm_eps=1e-5,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False, eos_token_id=7,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "src")
    mc, state = khf.load_hf(tmp_path / "src")
    assert (mc.vocab_size, mc.pad_vocab_multiple, mc.padded_vocab_size) == (384, 128, 384)
    assert mc.bias and mc.kv_heads == 1 and mc.rope_theta == 20000.0 and mc.norm_eps == 1e-5
    model = Transformer(mc).eval()
    model.load_state_dict(state)
    tokens = torch.randint(0, 384, (2, 20))
    with torch.no_grad():
        assert (model(tokens) - hf.eval()(tokens).logits).abs().max().item() < 1e-5

    hf.to(torch.bfloat16).save_pretrained(tmp_path / "src16")
    back = khf.import_hf(tmp_path / "src16", tmp_path / "kiln")
    assert config_from_dict(ckpt.read_meta(back)[1]).data.eos_token_id == 7
    out = khf.export_hf(back, tmp_path / "out")
    a, b = safetensors_contents(tmp_path / "src16"), safetensors_contents(out)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
    ca = json.loads((tmp_path / "src16" / "config.json").read_text())
    cb = json.loads((out / "config.json").read_text())
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "rms_norm_eps", "attention_bias", "mlp_bias",
                "tie_word_embeddings", "rope_parameters", "eos_token_id", "dtype"):
        assert ca[key] == cb[key], key
    assert load_hf_model(out).config.rope_parameters["rope_theta"] == 20000.0


def test_odd_vocab_imports_with_exact_size(tmp_path):
    config = transformers.OlmoConfig(vocab_size=301, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     tie_word_embeddings=True, pad_token_id=1, eos_token_id=0)
    transformers.OlmoForCausalLM(config).save_pretrained(tmp_path / "src")
    mc, state = khf.load_hf(tmp_path / "src")
    assert mc.pad_vocab_multiple == 1 and mc.padded_vocab_size == 301
    assert mc.norm == "nonparametric_layernorm" and mc.tie_embeddings
    assert state["lm_head.weight"] is state["embed.weight"]


# --------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("over,arch,match", [
    (dict(norm="layernorm"), None, "layernorm"),
    (dict(norm="rmsnorm", norm_placement="reordered", qk_norm=False), None, "qk_norm=false"),
    (dict(norm="rmsnorm", qk_norm=True), None, "QK-norm"),
    (dict(norm="rmsnorm", qk_norm=True), "llama", "QK-norm"),
    (dict(norm="nonparametric_layernorm", bias=True), None, "bias"),
    (dict(norm="nonparametric_layernorm", norm_eps=1e-6), None, "eps"),
    (dict(norm="rmsnorm", n_kv_heads=None), "olmo", "non-parametric LayerNorm"),
])
def test_export_refuses_shapes_without_hf_equivalent(over, arch, match, tmp_path):
    base = dict(d_model=64, n_layers=1, n_heads=4, mlp_hidden_size=96, vocab_size=512,
                max_seq_len=64)
    mc = ModelConfig(**{**base, **over})
    make_checkpoint(tmp_path / "run", mc)
    one_line_error(khf.export_hf, tmp_path / "run", tmp_path / "hf", arch, match=match)
    assert_nothing_left(tmp_path, "hf")


def test_export_refuses_existing_output(tmp_path):
    make_checkpoint(tmp_path / "run", model_cfg("olmo", True))
    (tmp_path / "hf").mkdir()
    one_line_error(khf.export_hf, tmp_path / "run", tmp_path / "hf", match="exists")


@pytest.fixture
def hf_dir(tmp_path, tokenizer_path, eos_id) -> Path:
    make_checkpoint(tmp_path / "run", model_cfg("olmo2", False), tokenizer_path, eos_id)
    return khf.export_hf(tmp_path / "run", tmp_path / "hf")


def test_import_refuses_truncated_file(hf_dir, tmp_path):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    one_line_error(khf.import_hf, hf_dir, tmp_path / "out", match="model.safetensors")
    assert_nothing_left(tmp_path, "out")
    f.write_bytes(b"\x00garbage" * 10)
    one_line_error(khf.import_hf, hf_dir, tmp_path / "out", match="truncated or damaged")
    assert_nothing_left(tmp_path, "out")


def test_import_refuses_missing_tensor(hf_dir, tmp_path):
    state = load_file(str(hf_dir / "model.safetensors"))
    del state["model.layers.1.self_attn.k_norm.weight"]
    save_file(state, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    one_line_error(khf.import_hf, hf_dir, tmp_path / "out",
                   match="model.layers.1.self_attn.k_norm.weight")
    assert_nothing_left(tmp_path, "out")


def test_import_refuses_shape_mismatch(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf_dir / "config.json").write_text(json.dumps(config))
    one_line_error(khf.import_hf, hf_dir, tmp_path / "out", match=r"mlp\..*_proj.weight.*\[")
    assert_nothing_left(tmp_path, "out")


def test_import_refuses_missing_shard_and_pickles(hf_dir, tmp_path):
    sharded = khf.export_hf(tmp_path / "run", tmp_path / "hf-sharded", max_shard_size=30_000)
    sorted(sharded.glob("model-*.safetensors"))[-1].unlink()
    one_line_error(khf.import_hf, sharded, tmp_path / "out", match="is missing")
    assert_nothing_left(tmp_path, "out")
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    one_line_error(khf.import_hf, hf_dir, tmp_path / "out", match="re-save them as safetensors")
    assert_nothing_left(tmp_path, "out")


def test_import_refuses_existing_output(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    one_line_error(khf.import_hf, hf_dir, tmp_path / "out", match="exists")


@pytest.mark.parametrize("change,match", [
    ({"model_type": "mistral"}, "model_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
    ({"clip_qkv": 8.0}, "clip_qkv"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 32}, "head_dim"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_hf_config_refusals_name_the_field(change, match):
    base = khf.kiln_to_hf_config(model_cfg("olmo2", False), "olmo2")
    one_line_error(khf.hf_to_kiln_config, {**base, **change}, match=match)


def test_llama_bias_mismatch_refused():
    base = khf.kiln_to_hf_config(model_cfg("llama", False), "llama")
    assert khf.hf_to_kiln_config(base).bias
    one_line_error(khf.hf_to_kiln_config, {**base, "mlp_bias": False}, match="mlp_bias")


def test_configs_round_trip():
    for arch in ("llama", "olmo", "olmo2"):
        for tied in (True, False):
            mc = model_cfg(arch, tied, vocab_size=512)
            back = khf.hf_to_kiln_config(khf.kiln_to_hf_config(mc, arch, 0, None, 1))
            for f in ("d_model", "n_layers", "n_heads", "kv_heads", "hidden_size",
                      "padded_vocab_size", "max_seq_len", "rope_theta", "norm", "norm_eps",
                      "norm_placement", "qk_norm", "tie_embeddings", "bias", "init_std"):
                assert getattr(back, f) == getattr(mc, f), (arch, f)


# --------------------------------------------------------------------------------------------
# CLI entry points


def test_cli_entry_points(tmp_path, tokenizer_path, eos_id, capsys):
    make_checkpoint(tmp_path / "run", model_cfg("llama", True), tokenizer_path, eos_id)
    p = argparse.ArgumentParser()
    khf.add_export_arguments(p)
    args = p.parse_args([str(tmp_path / "run"), str(tmp_path / "hf"), "--arch", "llama",
                         "--max-shard-size", "50KB"])
    assert khf.run_export(args) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert "LlamaForCausalLM" in capsys.readouterr().out

    p = argparse.ArgumentParser()
    khf.add_import_hf_arguments(p)
    assert khf.run_import_hf(p.parse_args([str(tmp_path / "hf"), str(tmp_path / "ck")])) == 0
    assert ckpt.is_complete(tmp_path / "ck")

    assert khf.parse_size("5GB") == 5 * 10**9 and khf.parse_size("2GiB") == 2 * 2**30
    assert khf.parse_size(123) == 123
    one_line_error(khf.parse_size, "lots", match="not a size")


def test_training_from_hf_weights_starts_at_the_hf_models_loss(pydoc_tokens, tmp_path):
    """init.from=hf:DIR: the first logged loss is the HF model's loss on that same batch."""
    import torch.nn.functional as F
    from test_train import losses, tiny_cfg
    from transformers import LlamaConfig, LlamaForCausalLM

    from kiln.config import config_from_dict
    from kiln.trainer import Trainer

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg = tiny_cfg(pydoc_tokens, tmp_path / "run", trainer__max_duration=10,
                   model__tie_embeddings=False, model__n_kv_heads=2, model__norm_eps=1e-6,
                   init__from=f"hf:{tmp_path / 'hf'}")
    trainer = Trainer(config_from_dict(cfg))
    assert any("Hugging Face" in n for n in trainer.plan.notes)
    first = trainer.train_data.batch(trainer.loader.permutation(0)[:8])
    with torch.no_grad():
        logits = hf(input_ids=first[:, :-1]).logits
        hf_loss = F.cross_entropy(logits.float().reshape(-1, 512), first[:, 1:].reshape(-1))
    trainer.fit()
    kiln_first = losses(tmp_path / "run")[1]
    assert kiln_first == pytest.approx(hf_loss.item(), abs=1e-5)
    assert len(losses(tmp_path / "run")) == 10
