"""Float8 training through torchao, emulated on CPU: the blocks' linear layers compute in
float8 with dynamic per-tensor scales, the head stays as it is; the loss follows bf16's, a run
resumes exactly, and under tensor parallelism (real gloo ranks) it is one process's."""

from __future__ import annotations

import pytest
import torch
from test_distributed import torchrun, write
from test_train import final_weights, losses, tiny_cfg, train

from kiln.config import config_from_dict
from kiln.trainer import Trainer

pytest.importorskip("torchao", reason="pip install -e '.[float8]' (the test extra has it)")


def cfg(tokens, run, **kw):
    return tiny_cfg(tokens, run, **{"trainer__max_duration": 5, "checkpoint__interval": 3,
                                    "trainer__precision": "bf16", **kw})


def test_float8_follows_bf16_and_resumes_exactly(pydoc_tokens, tmp_path):
    train(cfg(pydoc_tokens, tmp_path / "bf16"))
    trainer = Trainer(config_from_dict(cfg(pydoc_tokens, tmp_path / "f8",
                                           parallel__float8=True)))
    kinds = {name: type(m).__name__ for name, m in trainer.module.named_modules()
             if isinstance(m, torch.nn.Linear)}
    assert kinds["blocks.0.attn.q_proj"] == "Float8Linear"
    assert kinds["blocks.1.mlp.down_proj"] == "Float8Linear"
    assert kinds["lm_head"] == "Linear"  # the head is not converted
    trainer.fit()
    bf16, f8 = losses(tmp_path / "bf16"), losses(tmp_path / "f8")
    assert f8[5] == pytest.approx(bf16[5], rel=0.02)
    assert f8 != bf16  # it did compute in float8
    split = tmp_path / "split"
    train(cfg(pydoc_tokens, split, parallel__float8=True, trainer__hard_stop=3))
    train(cfg(pydoc_tokens, split, parallel__float8=True))
    a, b = final_weights(split), final_weights(tmp_path / "f8")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_float8_with_tensor_parallelism_equals_one_process(pydoc_tokens, tmp_path):
    """tp=2 over real gloo ranks: each rank's float8 matmuls on its shard of the weights, the
    scales taken over the whole (sharded) tensors, so the losses are one process's."""
    fp32 = dict(trainer__precision="fp32", parallel__float8=True)
    train(cfg(pydoc_tokens, tmp_path / "one", **fp32))
    train(cfg(pydoc_tokens, tmp_path / "plain", trainer__precision="fp32"))
    config = write(cfg(pydoc_tokens, tmp_path / "tp", parallel__tp=2, **fp32),
                   tmp_path / "c.yaml")
    r = torchrun(config)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = losses(tmp_path / "tp"), losses(tmp_path / "one")
    assert got.keys() == want.keys()
    assert all(got[s] == pytest.approx(want[s], rel=1e-5) for s in want), (got, want)
    assert want != losses(tmp_path / "plain")  # float8 did change the arithmetic
