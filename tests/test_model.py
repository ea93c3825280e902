import dataclasses
import math

import pytest
import torch

from kiln.config import ModelConfig, preset_model
from kiln.errors import KilnError
from kiln.model import Transformer, flops_per_token

TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 128, "vocab_size": 300,
        "max_seq_len": 64}


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


SHAPES = [
    {"norm": norm, "tie_embeddings": tie, "qk_norm": qk, "bias": bias, "n_kv_heads": kv}
    for norm in ("rmsnorm", "layernorm", "nonparametric_layernorm")
    for tie in (False, True)
    for qk in (False, True)
    for bias in (False, True)
    for kv in (None, 2, 1)
    if not (qk and norm == "nonparametric_layernorm")
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_num_params_equals_model_config_num_params(shape):
    cfg = tiny(**shape)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == cfg.num_params()


@pytest.mark.parametrize("name", ["tiny", "llama-150m", "olmo-1b", "olmo2-1b", "olmo-7b"])
def test_presets_param_count_on_meta_device(name):
    cfg = preset_model(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == cfg.num_params()
    if name == "olmo-1b":
        assert model.num_params() == 1_176_764_416


def test_state_dict_keys_follow_the_stable_format():
    cfg = tiny(qk_norm=True, bias=True, norm="layernorm", tie_embeddings=False)
    keys = set(build(cfg).state_dict())
    expected = {"embed.weight", "lm_head.weight", "final_norm.weight", "final_norm.bias"}
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        for n in ("attn_norm", "mlp_norm", "attn.q_norm", "attn.k_norm"):
            expected |= {p + n + ".weight", p + n + ".bias"}
        for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            expected |= {p + n + ".weight", p + n + ".bias"}
    assert keys == expected


def test_nonparametric_norm_has_no_parameters_and_no_rope_in_state_dict():
    model = build(tiny(norm="nonparametric_layernorm"))
    model(torch.zeros(1, 4, dtype=torch.long))  # builds the rope cache
    keys = set(model.state_dict())
    assert not any("norm" in k for k in keys)
    assert not any("rope" in k or "cos" in k or "sin" in k for k in keys)


def test_tied_weights_are_one_parameter_and_survive_to_empty():
    cfg = tiny(tie_embeddings=True)
    model = build(cfg)
    assert model.lm_head.weight is model.embed.weight
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    assert meta.lm_head.weight is meta.embed.weight
    meta.init_weights()
    assert meta.lm_head.weight is meta.embed.weight
    assert len(list(meta.parameters())) == len(list(model.parameters()))


def test_qk_norm_normalises_the_whole_projection():
    cfg = tiny(qk_norm=True, n_kv_heads=2)
    attn = build(cfg).blocks[0].attn
    assert attn.q_norm.weight.shape == (cfg.n_heads * cfg.head_dim,)
    assert attn.k_norm.weight.shape == (cfg.kv_heads * cfg.head_dim,)


@pytest.mark.parametrize("placement", ["pre", "reordered"])
def test_changing_a_future_token_never_changes_earlier_logits(placement):
    model = build(tiny(norm_placement=placement, qk_norm=True, n_kv_heads=2))
    torch.manual_seed(1)
    a = torch.randint(0, 300, (2, 16))
    b = a.clone()
    b[:, 10] = (b[:, 10] + 7) % 300
    la, lb = model(a), model(b)
    assert torch.equal(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_reordered_and_pre_placement_both_run_and_differ():
    tokens = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    pre = build(tiny(norm_placement="pre"), seed=0)
    reo = build(tiny(norm_placement="reordered"), seed=0)
    reo.load_state_dict(pre.state_dict())  # same weights, only the wiring differs
    lp, lr = pre(tokens), reo(tokens)
    assert lp.shape == lr.shape == (2, 8, tiny().padded_vocab_size)
    assert torch.isfinite(lp).all() and torch.isfinite(lr).all()
    assert not torch.allclose(lp, lr)


def test_meta_build_to_empty_init_weights_gives_documented_std():
    cfg = tiny(n_layers=4, init_std=0.02)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    out = model(torch.randint(0, 300, (2, 8)))
    assert torch.isfinite(out).all()
    trunc = 0.9866  # std of a normal truncated at +-3 sigma, in sigmas
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert p.std().item() == pytest.approx(out_std * trunc, rel=0.1), name
            assert p.abs().max() <= 3 * out_std
        elif name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif p.ndim == 2:
            assert p.std().item() == pytest.approx(cfg.init_std * trunc, rel=0.1), name
            assert p.abs().max() <= 3 * cfg.init_std


def test_init_is_reproducible_from_the_global_seed():
    a, b = build(tiny(), seed=3), build(tiny(), seed=3)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_biases_start_at_zero():
    model = build(tiny(bias=True, norm="layernorm"))
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert biases and all(torch.all(b == 0) for b in biases)


def test_gqa_matches_multi_head_with_explicitly_repeated_kv_heads():
    gqa_cfg = tiny(n_kv_heads=2, qk_norm=False)
    gqa = build(gqa_cfg)
    mha = build(dataclasses.replace(gqa_cfg, n_kv_heads=None))
    sd = gqa.state_dict()
    rep, hd = gqa_cfg.n_heads // gqa_cfg.kv_heads, gqa_cfg.head_dim
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            w = sd[k].view(gqa_cfg.kv_heads, hd, -1)  # one block of rows per kv head
            sd[k] = w.repeat_interleave(rep, dim=0).reshape(gqa_cfg.n_heads * hd, -1)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_max_seq_len_raises():
    model = build(tiny(max_seq_len=16))
    with pytest.raises(KilnError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_invalid_shape_raises_kiln_error():
    with pytest.raises(KilnError):
        Transformer(tiny(n_heads=5))


def test_flops_per_token_is_the_palm_formula():
    cfg = preset_model("olmo-1b")
    n = cfg.num_params(include_embeddings=False)
    head = cfg.d_model * cfg.padded_vocab_size
    expected = 6 * n + 6 * head + 12 * cfg.n_layers * cfg.d_model * 4096
    assert flops_per_token(cfg, 4096) == expected
    # tying does not remove the head matmul
    assert flops_per_token(dataclasses.replace(cfg, tie_embeddings=False), 4096) == expected
