import math

import pytest
import torch

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.generate import KVCache, filter_logits, generate
from kiln.model import Transformer

TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 128, "vocab_size": 300,
        "max_seq_len": 64}


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def build(cfg: ModelConfig | None = None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg or tiny()).eval()


PROMPTS = [[5], [1, 2, 3], [17, 250, 9, 4, 4, 4, 100], list(range(20))]


@pytest.mark.parametrize("shape", [
    {},
    {"n_kv_heads": 2, "qk_norm": True, "norm_placement": "reordered"},
    {"norm": "nonparametric_layernorm", "tie_embeddings": True},
])
def test_cached_and_uncached_greedy_generation_give_identical_tokens(shape):
    model = build(tiny(**shape))
    for prompt in PROMPTS:
        cached = generate(model, prompt, 12, greedy=True, use_cache=True)
        uncached = generate(model, prompt, 12, greedy=True, use_cache=False)
        assert len(cached) == 12
        assert cached == uncached


def test_kv_cache_logits_match_full_forward_logits():
    model = build(tiny(n_kv_heads=2, qk_norm=True))
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = KVCache.for_model(model, batch_size=2, max_len=24)
    # prefill on an empty cache (causal), a multi-token chunk onto a non-empty cache (explicit
    # mask), then one-token decode steps
    parts = [model(tokens[:, :8], cache), model(tokens[:, 8:13], cache)]
    parts += [model(tokens[:, t:t + 1], cache) for t in range(13, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_too_small_raises():
    model = build()
    cache = KVCache.for_model(model, batch_size=1, max_len=4)
    with pytest.raises(KilnError, match="KV cache"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


def test_temperature_zero_and_top_k_one_equal_greedy():
    model = build()
    prompt = [3, 1, 4, 1, 5]
    g = generate(model, prompt, 10, greedy=True)
    assert generate(model, prompt, 10, temperature=0.0) == g
    gen = torch.Generator().manual_seed(0)
    assert generate(model, prompt, 10, top_k=1, temperature=1.5, generator=gen) == g


def test_sampling_is_reproducible_with_a_generator():
    model = build()
    a = generate(model, [1, 2], 10, generator=torch.Generator().manual_seed(7))
    b = generate(model, [1, 2], 10, generator=torch.Generator().manual_seed(7))
    assert a == b


def test_sampling_never_draws_padded_vocab_rows():
    model = build()
    # make the padding rows (ids >= vocab_size) overwhelmingly likely
    def boost_padding(module, inputs, out):
        out = out.clone()
        out[..., 300:] += 100.0
        return out

    model.lm_head.register_forward_hook(boost_padding)
    assert model(torch.tensor([[1, 2, 3]]))[0, -1].argmax() >= 300
    assert model.cfg.padded_vocab_size > 300
    out = generate(model, [1, 2, 3], 20, temperature=2.0,
                   generator=torch.Generator().manual_seed(0))
    assert all(t < 300 for t in out)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    logits = probs.log()

    def kept(p):
        return set(torch.isfinite(filter_logits(logits, top_p=p)).nonzero().flatten().tolist())

    assert kept(0.4) == {1}          # 0.4 alone reaches 0.4
    assert kept(0.5) == {1, 3}       # 0.4 < 0.5, 0.7 >= 0.5
    assert kept(0.7) == {1, 3}
    assert kept(0.71) == {1, 3, 4}   # 0.85
    assert kept(0.9) == {1, 3, 4, 0}
    assert kept(0.01) == {1}         # always at least one
    assert kept(1.0) == {0, 1, 2, 3, 4}
    f = filter_logits(logits, top_p=0.5)
    kept_p = f.softmax(-1)
    assert math.isclose(kept_p[1].item(), 0.4 / 0.7, rel_tol=1e-5)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
    f = filter_logits(logits, top_k=2)
    assert torch.isfinite(f).tolist() == [[False, True, False, True], [True, True, False, False]]


def test_prompt_longer_than_max_seq_len_raises():
    model = build(tiny(max_seq_len=16))
    with pytest.raises(KilnError, match="max_seq_len"):
        generate(model, list(range(17)), 1)


def test_generation_never_exceeds_max_seq_len():
    model = build(tiny(max_seq_len=16))
    for use_cache in (True, False):
        assert len(generate(model, list(range(10)), 100, greedy=True, use_cache=use_cache)) == 6
        assert generate(model, list(range(16)), 5, use_cache=use_cache) == []


def test_eos_stops_generation():
    model = build()
    prompt = [7, 8, 9]
    free = generate(model, prompt, 10, greedy=True)
    eos = free[3]
    first = free.index(eos)
    out = generate(model, prompt, 10, greedy=True, eos_token_id=eos)
    assert out == free[: first + 1]
    assert out[-1] == eos


def test_prompt_may_be_a_tensor():
    model = build()
    assert generate(model, torch.tensor([1, 2, 3]), 5, greedy=True) == generate(
        model, [1, 2, 3], 5, greedy=True)
