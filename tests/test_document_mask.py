"""data.document_mask / data.document_positions: attention (and optionally RoPE positions) stay
inside each document packed into a window.

The acceptance: a window packing three documents gives, token for token, the logits and losses
of running each document through the same model on its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cli import assert_one_line_error, kiln_here, write_config

from kiln.config import ModelConfig
from kiln.data.tokens import TokenWriter
from kiln.errors import KilnError
from kiln.model import Transformer, document_ids, document_mask, document_positions

EOS = 0
TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 128, "vocab_size": 300,
        "max_seq_len": 64}
SHAPES = {
    "llama": {},
    "olmo2-gqa": {"norm_placement": "reordered", "qk_norm": True, "n_kv_heads": 2},
}


def build(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **kw})).eval()


def packed(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One window [1, sum(lengths)] of random non-EOS ids, each document but the last ending
    in EOS; and each document's [start, end)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (sum(lengths),), generator=g)
    spans, a = [], 0
    for i, n in enumerate(lengths):
        if i < len(lengths) - 1:
            ids[a + n - 1] = EOS
        spans.append((a, a + n))
        a += n
    return ids[None], spans


def test_document_ids_positions_and_mask_by_hand():
    t = torch.tensor([[5, 0, 7, 8, 0, 0, 9, 0],
                      [0, 3, 4, 5, 6, 7, 8, 9]])
    d = document_ids(t, EOS)
    assert d.tolist() == [[0, 0, 1, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(d).tolist() == [[0, 1, 0, 1, 2, 0, 0, 1],
                                              [0, 0, 1, 2, 3, 4, 5, 6]]
    m = document_mask(d)
    assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool
    same = d[:, :, None] == d[:, None, :]
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(m[:, 0], same & causal)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("restart", [True, False], ids=["positions-restart", "positions-offset"])
def test_packed_window_equals_each_document_run_alone(shape, restart):
    model = build(**shape)
    x, spans = packed([9, 14, 11], seed=1)  # 3 documents; the last one runs off the window
    assert len(spans) == 3 and int((x == EOS).sum()) == 2
    doc = document_ids(x, EOS)
    pos = document_positions(doc) if restart else None
    targets = torch.randint(1, TINY["vocab_size"], x.shape, generator=torch.Generator()
                            .manual_seed(2))
    with torch.no_grad():
        logits = model(x, doc_ids=doc, positions=pos)
        loss = F.cross_entropy(logits[0], targets[0], reduction="none")
        unmasked = model(x)
        for a, b in spans:
            # alone: the document from position 0 (restart) or at its offset in the window
            alone = model(x[:, a:b], positions=None if restart else torch.arange(a, b)[None])
            torch.testing.assert_close(logits[:, a:b], alone, rtol=0, atol=1e-5)
            ref = F.cross_entropy(alone[0], targets[0, a:b], reduction="none")
            torch.testing.assert_close(loss[a:b], ref, rtol=0, atol=1e-5)
    # the mask matters: later documents differ from the plain causal window
    assert (logits[:, spans[1][0]:] - unmasked[:, spans[1][0]:]).abs().max() > 1e-3


def test_batch_rows_with_different_layouts():
    model = build()
    x1, s1 = packed([5, 20, 7], seed=3)
    x2, s2 = packed([16, 16], seed=4)
    x = torch.cat([x1, x2])
    doc = document_ids(x, EOS)
    with torch.no_grad():
        both = model(x, doc_ids=doc, positions=document_positions(doc))
        for row, spans in ((0, s1), (1, s2)):
            for a, b in spans:
                torch.testing.assert_close(both[row:row + 1, a:b], model(x[row:row + 1, a:b]),
                                           rtol=0, atol=1e-5)


def test_per_token_positions_index_the_rope_tables():
    model = build()
    x = torch.randint(1, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(6))
    ar = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        plain = model(x)
        assert torch.equal(model(x, positions=ar), plain)  # 0 .. T-1 is the default, exactly
        # a different shift per row: RoPE is relative, so each row is unchanged (up to
        # rounding), which holds only if every token got its own row's position
        torch.testing.assert_close(model(x, positions=ar + torch.tensor([[5], [30]])), plain,
                                   rtol=0, atol=1e-5)
        # positions that are not a shift change the output (here: restarting without a mask)
        restart = torch.cat([torch.arange(12), torch.arange(12)]).expand(2, 24)
        assert (model(x, positions=restart)[:, 12:] - plain[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("with_positions", [False, True])
def test_without_eos_the_masked_path_equals_the_plain_one(with_positions):
    model = build(**SHAPES["olmo2-gqa"])
    x = torch.randint(1, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(5))
    doc = document_ids(x, EOS)
    assert doc.max() == 0
    pos = document_positions(doc) if with_positions else None
    if with_positions:
        assert torch.equal(pos, torch.arange(40).expand(2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x, doc_ids=doc, positions=pos), model(x), rtol=0,
                                   atol=1e-6)
        # and the fused-loss path
        t = torch.randint(1, TINY["vocab_size"], (2, 40))
        masked, plain = model(x, targets=t, doc_ids=doc), model(x, targets=t)
        torch.testing.assert_close(masked[0], plain[0], rtol=0, atol=1e-6)


def test_gradients_flow_and_do_not_cross_documents():
    model = build(tie_embeddings=False).train()
    # documents drawn from disjoint id ranges, so each embedding row belongs to one document
    x = torch.cat([torch.randint(1, 100, (10,)), torch.randint(100, 200, (12,)),
                   torch.randint(200, 300, (10,))])[None]
    x[0, 9] = x[0, 21] = EOS
    doc = document_ids(x, EOS)
    pos = document_positions(doc)
    targets = torch.randint(1, 300, x.shape)
    loss, ce = model(x, targets=targets, doc_ids=doc, positions=pos)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # the loss of the middle document alone touches no embedding of the other two
    model.zero_grad()
    logits = model(x, doc_ids=doc, positions=pos)
    F.cross_entropy(logits[0, 10:22], targets[0, 10:22]).backward()
    g = model.embed.weight.grad
    assert g[1:100].abs().max() == 0 and g[200:300].abs().max() == 0
    assert g[100:200].abs().max() > 0


def test_the_model_refuses_doc_ids_with_a_kv_cache_and_bad_shapes():
    from kiln.generate import KVCache

    model = build()
    x = torch.randint(1, 300, (1, 8))
    with pytest.raises(KilnError, match="KV cache"):
        model(x, KVCache.for_model(model, 1, 16), doc_ids=document_ids(x, EOS))
    with pytest.raises(KilnError, match="doc_ids has shape"):
        model(x, doc_ids=torch.zeros(1, 7, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Through `kiln train`


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> Path:
    """A kiln .bin (EOS id 0 in its sidecar) of random documents of 3 to 20 tokens, so every
    32-token window packs several documents."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("docs") / "docs.bin"
    w = TokenWriter(path, eos_token_id=EOS, vocab_size=512)
    for _ in range(1500):
        w.write(rng.integers(1, 512, int(rng.integers(3, 21))))
    w.close()
    return path


def test_kiln_train_with_document_mask_and_positions(short_docs, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", short_docs, run, trainer={"max_duration": 4,
                          "eval_interval": 2, "micro_batch_size": 4}, checkpoint={"interval": 4})
    r = kiln_here("train", config, "--data.document_mask=true", "--data.document_positions=true")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in records if "loss" in m]
    vals = [m["val_loss"] for m in records if "val_loss" in m]
    assert len(losses) == 4 and vals
    assert all(math.isfinite(v) for v in losses + vals), records
    saved = (run / "config.yaml").read_text()
    assert "document_mask: true" in saved and "document_positions: true" in saved
    # the same run without the mask (same seed, weights, data order) logs other losses: the
    # trainer really passed the documents to the model, in training and in evaluation
    r = kiln_here("train", config, f"--trainer.run_dir={tmp_path / 'plain'}")
    assert r.returncode == 0, r.stderr
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text()
             .splitlines()]
    assert abs([m["loss"] for m in plain if "loss" in m][0] - losses[0]) > 1e-4
    first_val = [m["val_loss"] for m in plain if "val_loss" in m][0]
    assert abs(first_val - vals[0]) > 1e-4


def test_document_positions_without_document_mask_is_refused(short_docs, tmp_path):
    config = write_config(tmp_path / "c.yaml", short_docs, tmp_path / "run")
    r = kiln_here("train", config, "--data.document_positions=true")
    assert_one_line_error(r, "data.document_positions", "data.document_mask")
    assert not (tmp_path / "run").exists()


def test_document_mask_needs_an_eos_id(tmp_path):
    tokens = tmp_path / "raw.npy"  # a bare .npy: no sidecar, so no EOS id
    np.save(tokens, np.random.default_rng(0).integers(1, 512, 4000).astype(np.uint16))
    config = write_config(tmp_path / "c.yaml", tokens, tmp_path / "run")
    r = kiln_here("train", config, "--data.document_mask=true")
    assert_one_line_error(r, "data.document_mask", "data.eos_token_id")
    r = kiln_here("train", config, "--data.document_mask=true", "--data.eos_token_id=0",
                  "--trainer.max_duration=1", "--trainer.eval_interval=0")
    assert r.returncode == 0, r.stderr
