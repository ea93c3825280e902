"""kiln.losses.linear_cross_entropy against the plain path (F.linear + fp32 F.cross_entropy +
z-loss, as Trainer.micro_loss computes it)."""

import pytest
import torch
import torch.nn.functional as F

from kiln.config import ModelConfig
from kiln.losses import default_chunk_size, linear_cross_entropy
from kiln.model import Transformer

N, D, V = 50, 32, 97


def plain(hidden, weight, targets, z_loss=0.0):
    """Trainer.micro_loss's (loss, ce), before its loss_norm scaling."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp64 stays fp64
    ce = F.cross_entropy(logits, targets)
    loss = ce
    if z_loss > 0:
        z = torch.logsumexp(logits, dim=-1)
        loss = ce + z_loss * (z * z).mean()
    return loss, ce


def close(actual, expected, rtol=1e-6):
    """Within rtol, plus an atol of rtol times the tensor's largest entry (for entries that
    are near zero only because of cancellation)."""
    assert actual.dtype == expected.dtype
    atol = rtol * expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def inputs(seed=0, n=N, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g, dtype=dtype)
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, V, (n,), generator=g)
    return hidden, weight, targets


def both(fn, hidden, weight, scale=1.0):
    """(loss, ce, grad hidden, grad weight) of fn on fresh leaf copies."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, ce = fn(h, w)
    (loss * scale).backward()
    return loss.detach(), ce.detach(), h.grad, w.grad


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [1, 7, 16, 50, 1000])  # 7, 16 do not divide 50; 1000 > N
def test_matches_plain_path_fp32(z_loss, chunk):
    hidden, weight, targets = inputs()
    ref = both(lambda h, w: plain(h, w, targets, z_loss), hidden, weight, scale=0.37)
    got = both(lambda h, w: linear_cross_entropy(h, w, targets, z_loss=z_loss, chunk_size=chunk),
               hidden, weight, scale=0.37)
    for a, b in zip(got, ref):
        close(a, b)
    if z_loss == 0:
        assert torch.equal(got[0], got[1])
    else:
        assert got[0] > got[1]


def test_fp64_is_exact_to_fp64_rounding():
    hidden, weight, targets = inputs(1, dtype=torch.float64)
    ref = both(lambda h, w: plain(h, w, targets, 1e-3), hidden, weight)
    got = both(lambda h, w: linear_cross_entropy(h, w, targets, z_loss=1e-3, chunk_size=9),
               hidden, weight)
    for a, b in zip(got, ref):
        close(a, b, rtol=1e-12)


def test_only_input_sized_tensors_are_kept_for_backward():
    hidden, weight, targets = inputs()
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss, ce = linear_cross_entropy(h, w, targets, chunk_size=8)
    assert [tuple(t.shape) for t in loss.grad_fn.saved_tensors] == [(N, D), (V, D)]
    assert not ce.requires_grad


def test_noncontiguous_hidden_and_targets():
    hidden, weight, targets = inputs(2)
    base = hidden.t().contiguous().requires_grad_()  # [D, N]
    t2 = torch.stack([targets, targets], 1)
    loss, _ = linear_cross_entropy(base.t(), weight, t2[:, 0], chunk_size=16)
    loss.backward()
    h = hidden.clone().requires_grad_()
    plain(h, weight, targets)[0].backward()
    close(base.grad.t(), h.grad)


def test_weight_or_hidden_without_grad_and_no_grad_mode():
    hidden, weight, targets = inputs(3)
    ref = both(lambda h, w: plain(h, w, targets, 1e-2), hidden, weight)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, targets, z_loss=1e-2, chunk_size=8)[0].backward()
    close(h.grad, ref[2])
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, targets, z_loss=1e-2, chunk_size=8)[0].backward()
    close(w.grad, ref[3])
    with torch.no_grad(), torch.profiler.profile() as prof:  # eval: no gradient work at all
        loss, ce = linear_cross_entropy(hidden.requires_grad_(), w, targets, z_loss=1e-2,
                                        chunk_size=8)
    assert loss.grad_fn is None
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::mm") == 7  # 50 / 8
    close(loss, ref[0])
    close(ce, ref[1])


@pytest.mark.parametrize("tie", [False, True])
def test_whole_model_gradients_match(tie):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=64, vocab_size=300,
                      max_seq_len=16, tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, 300, (3, 13))
    x, y = tokens[:, :-1], tokens[:, 1:]

    logits = model(x).float().view(-1, cfg.padded_vocab_size)  # Trainer.micro_loss's path
    z = torch.logsumexp(logits, dim=-1)
    ce_ref = F.cross_entropy(logits, y.reshape(-1))
    (ce_ref + 1e-3 * (z * z).mean()).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    loss, ce = model(x, targets=y, z_loss=1e-3)
    loss.backward()
    close(ce, ce_ref.detach())
    assert (model.lm_head.weight is model.embed.weight) == tie
    for name, p in model.named_parameters():
        close(p.grad, ref[name])


def test_autocast_bf16_matches_plain_autocast():
    hidden, weight, targets = inputs(4, n=64)

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, ce = fn(h, w)
        loss.backward()
        return loss, h.grad, w.grad

    ref = run(lambda h, w: plain(h, w, targets, 1e-2))
    got = run(lambda h, w: linear_cross_entropy(h, w, targets, z_loss=1e-2, chunk_size=24))
    exact = both(lambda h, w: plain(h, w, targets, 1e-2), hidden, weight)
    assert [t.dtype for t in got] == [torch.float32] * 3
    for a, b, e in zip(got, ref, (exact[0], exact[2], exact[3])):
        close(a.detach(), b.detach(), rtol=2e-2)
        assert (a - e).abs().max() > 0  # really ran in bf16


def test_bf16_inputs_get_bf16_grads():
    hidden, weight, targets = inputs(5, dtype=torch.bfloat16)
    got = both(lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=16), hidden, weight)
    ref = both(lambda h, w: plain(h, w, targets), hidden, weight)
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        close(a, b, rtol=2e-2)


def test_under_torch_compile():
    hidden, weight, targets = inputs(6)

    @torch.compile(backend="aot_eager")
    def step(h, w, t):
        loss, ce = linear_cross_entropy(torch.tanh(h), w, t, z_loss=1e-2, chunk_size=16)
        return loss * 0.5, ce

    got = both(lambda h, w: step(h, w, targets), hidden, weight)
    ref = both(lambda h, w: (lambda lc: (lc[0] * 0.5, lc[1]))(plain(torch.tanh(h), w, targets,
                                                                    1e-2)), hidden, weight)
    for a, b in zip(got, ref):
        close(a, b)


def test_default_chunk_size_and_bad_shapes():
    assert default_chunk_size(50304) == 667
    assert default_chunk_size(128256) == 261
    assert default_chunk_size(10**7) == 64
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        linear_cross_entropy(hidden[None], weight, targets)
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        linear_cross_entropy(hidden, weight, targets[:-1])


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_training_with_the_fused_loss_follows_the_plain_one(pydoc_tokens, tmp_path, z_loss):
    """Whole `kiln train` runs (tied head, z-loss, window loss_norm): the fused path's losses
    and final weights are the plain path's, to fp32 rounding over the steps."""
    import json

    from safetensors.torch import load_file
    from test_cli import kiln_here, write_config

    runs = {}
    for fused in (True, False):
        run = tmp_path / f"fused-{fused}"
        config = write_config(tmp_path / f"{fused}.yaml", pydoc_tokens, run,
                              model={"tie_embeddings": True},
                              optim={"z_loss": z_loss, "loss_norm": "window"},
                              trainer={"max_duration": 4, "eval_interval": 0,
                                       "fused_loss": fused})
        r = kiln_here("train", config)
        assert r.returncode == 0, r.stderr
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text()
                  .splitlines() if '"loss"' in line]
        runs[fused] = losses, load_file(str(run / "checkpoints" / "step4" / "model.safetensors"))
    (lf, wf), (lp, wp) = runs[True], runs[False]
    assert len(lf) == 4 and lf == pytest.approx(lp, rel=1e-5)
    for k in wp:
        torch.testing.assert_close(wf[k], wp[k], rtol=1e-4, atol=1e-4)  # Adam: ~lr/30
