"""kiln import olmo: OLMo unsharded checkpoints become kiln checkpoints that compute the same
logits and continue with the same Adam state, step and learning rate."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from olmo_fixture import build_olmo_checkpoint
from test_cli import assert_one_line_error, kiln_here
from test_continue import record_lr

from kiln import checkpoint as ckpt
from kiln.callbacks import Callback
from kiln.config import config_from_dict
from kiln.errors import KilnError
from kiln.interop.olmo import (
    add_import_olmo_arguments,
    import_olmo,
    olmo_to_kiln_config,
    run_import_olmo,
)
from kiln.model import Transformer
from kiln.schedule import LRSchedule
from kiln.start import plan_start
from kiln.trainer import Trainer

REAL = Path(__file__).parent / "data" / "olmo"  # written by OLMo itself (make_olmo_checkpoints.py)


def kiln_model(out: Path) -> Transformer:
    cfg = config_from_dict(ckpt.read_meta(out)[1])
    model = Transformer(cfg.model)
    ckpt.load_into(out, model, None, tied=cfg.model.tie_embeddings)
    return model.eval()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp"))


def split_like_olmo(name: str, t: torch.Tensor, d: int, kv: int, h: int
                    ) -> dict[str, torch.Tensor]:
    """The test's own statement of the layout: att_proj = [q; k; v], ff_proj = [value; gate]."""
    i = name.split(".")[2] if name.startswith("transformer.blocks.") else None
    kind = name.split(".")[-2] if i is not None else name
    leaf = name.split(".")[-1]
    b = f"blocks.{i}."
    if kind == "att_proj":
        return {b + "attn.q_proj." + leaf: t[:d], b + "attn.k_proj." + leaf: t[d:d + kv],
                b + "attn.v_proj." + leaf: t[d + kv:]}
    if kind == "ff_proj":
        return {b + "mlp.up_proj." + leaf: t[:h], b + "mlp.gate_proj." + leaf: t[h:]}
    simple = {"attn_out": "attn.o_proj", "ff_out": "mlp.down_proj", "attn_norm": "attn_norm",
              "ff_norm": "mlp_norm", "q_norm": "attn.q_norm", "k_norm": "attn.k_norm",
              "q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj"}
    if i is not None:
        return {b + simple[kind] + "." + leaf: t}
    top = {"transformer.wte.weight": "embed.weight", "transformer.ff_out.weight":
           "lm_head.weight", "transformer.ln_f.weight": "final_norm.weight",
           "transformer.ln_f.bias": "final_norm.bias"}
    return {top[name]: t}


VARIANTS = {
    "tied-nonparametric-ln": {},
    "untied-nonparametric-ln": dict(weight_tying=False),
    "untied-rms-qknorm-reordered-gqa": dict(
        layer_norm_type="rms", layer_norm_with_affine=True, attention_layer_norm=True,
        norm_after=True, weight_tying=False, n_kv_heads=2, rope_theta=500000,
        layer_norm_eps=1e-6),
    "tied-rms-qknorm": dict(layer_norm_type="rms", layer_norm_with_affine=True,
                            attention_layer_norm=True, mlp_hidden_size=96),
    "bias-layernorm-mqa": dict(include_bias=True, layer_norm_with_affine=True,
                               multi_query_attention=True, attention_layer_norm=True),
    "llama-block": dict(block_type="llama", layer_norm_type="rms",
                        layer_norm_with_affine=True, weight_tying=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_model_computes_olmos_logits(variant, tmp_path):
    ref = build_olmo_checkpoint(tmp_path / "olmo", **VARIANTS[variant])
    out = import_olmo(tmp_path / "olmo", tmp_path / "kiln")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json",
                                                     "model.safetensors", "optim.pt",
                                                     "trainer.json"]
    assert ckpt.is_complete(out) and ckpt.resolve(out) == out
    ids = torch.randint(0, 500, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = kiln_model(out)(ids)
    want = ref(ids)
    assert got.shape == want.shape == (3, 64, 512)  # padded to OLMo's embedding_size
    assert (got - want).abs().max().item() <= 1e-5
    assert leftovers(tmp_path) == []


def test_config_mapping():
    ref_cfg = yaml.safe_load(yaml.safe_dump({
        "model": dict(d_model=2048, n_heads=16, n_layers=16, mlp_ratio=8, mlp_hidden_size=None,
                      vocab_size=50280, embedding_size=50304, max_sequence_length=4096,
                      rope=True, rope_theta=500000, layer_norm_type="rms",
                      layer_norm_with_affine=True, attention_layer_norm=True,
                      norm_after=True, weight_tying=False, include_bias=False,
                      bias_for_layer_norm=False, layer_norm_eps=1e-6, eos_token_id=50279,
                      attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0),
        "optimizer": dict(name="adamw", learning_rate=4e-4, weight_decay=0.1,
                          betas=[0.9, 0.95], eps=1e-8),
        "scheduler": dict(name="cosine_with_warmup", t_warmup=2000, alpha_f=0.1),
        "global_train_batch_size": 512, "device_train_microbatch_size": 8,
        "max_duration": "1e12T", "max_grad_norm": 1.0, "softmax_auxiliary_loss": True,
        "auxiliary_loss_multiplier": 1e-5, "data": {"memmap_dtype": "uint32"}}))
    cfg = olmo_to_kiln_config(ref_cfg)
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.kv_heads) == (2048, 16, 16, 16)
    assert m.hidden_size == 8192 and m.mlp_hidden_size == 8192  # OLMo's 16384 fused / 2
    assert m.vocab_size == 50280 and m.padded_vocab_size == 50304
    assert (m.norm, m.norm_placement, m.qk_norm, m.tie_embeddings, m.bias) == (
        "rmsnorm", "reordered", True, False, False)
    assert (m.norm_eps, m.rope_theta, m.max_seq_len) == (1e-6, 500000.0, 4096)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == (
        4e-4, [0.9, 0.95], 1e-8, 0.1)
    assert cfg.optim.grad_clip == 1.0 and cfg.optim.z_loss == 1e-5
    assert (cfg.schedule.name, cfg.schedule.final_lr_fraction) == ("cosine", 0.1)
    assert cfg.schedule.warmup.value == 2000
    assert cfg.trainer.global_batch_size == 512 and cfg.trainer.micro_batch_size == 8
    assert cfg.trainer.max_duration.value == 476838  # ceil(1e12 / (512 * 4096)) steps
    assert (cfg.data.seq_len, cfg.data.stride) == (4095, 4096)  # OLMo's 4096-token rows
    assert (cfg.data.eos_token_id, cfg.data.dtype, cfg.optim.loss_norm) == (50279, "uint32",
                                                                            "window")
    # OLMo-1 style: non-parametric LayerNorm, tied, mlp_ratio convention kept
    ref_cfg["model"].update(layer_norm_type="default", layer_norm_with_affine=False,
                            attention_layer_norm=False, norm_after=False, weight_tying=True,
                            vocab_size=50280, embedding_size=50280)
    m = olmo_to_kiln_config(ref_cfg).model
    assert (m.norm, m.norm_placement, m.tie_embeddings, m.padded_vocab_size) == (
        "nonparametric_layernorm", "pre", True, 50280)


def test_continued_run_has_olmos_moments_step_and_lr(pydoc_tokens, tmp_path):
    step = 30
    ref = build_olmo_checkpoint(
        tmp_path / "olmo", global_step=step, vocab_size=512, embedding_size=512,
        layer_norm_type="rms", layer_norm_with_affine=True, attention_layer_norm=True,
        norm_after=True, weight_tying=False, n_kv_heads=2, optim_keys="names",
        scheduler={"t_warmup": 10, "t_max": 100}, max_duration=100)
    out = import_olmo(tmp_path / "olmo", tmp_path / "kiln")
    raw = yaml.safe_load((out / "config.yaml").read_text())  # the converted OLMo config
    raw["data"].update(paths=[str(pydoc_tokens)], dtype=None, val_fraction=0.0, prefetch=2)
    raw["trainer"].update(run_dir=str(tmp_path / "run"), device="cpu", hard_stop=step + 2)
    raw["checkpoint"].update(interval=0, save_final=False)
    raw["log"]["console"] = False
    raw["init"]["from"] = str(out)
    trainer = Trainer(config_from_dict(raw))

    # counters kept: OLMo's global_step and tokens seen
    assert trainer.step == step
    assert trainer.tokens_seen == ref.train["global_train_tokens_seen"]
    # before the first step, Adam's state is the file's, fused tensors split like the weights
    params = dict(trainer.module.named_parameters())
    d, kv, h = 64, 32, 128
    seen = set()
    for name in ref.state:
        st = ref.adam_state(name)
        for kname, want_avg in split_like_olmo(name, st["exp_avg"], d, kv, h).items():
            want_sq = split_like_olmo(name, st["exp_avg_sq"], d, kv, h)[kname]
            got = trainer.optimizer.state[params[kname]]
            assert torch.equal(got["exp_avg"], want_avg), kname
            assert torch.equal(got["exp_avg_sq"], want_sq), kname
            assert float(got["step"]) == step
            assert torch.equal(params[kname].detach(),
                               split_like_olmo(name, ref.state[name], d, kv, h)[kname]), kname
            seen.add(kname)
    assert seen == set(params)
    # the LR is OLMo's at every step, before and after this point
    for s in range(1, 121):
        assert trainer.schedule.lr(s) == pytest.approx(ref.lr(s), rel=1e-12, abs=1e-15), s
    lrs = record_lr(trainer)
    trainer.fit()
    assert list(lrs) == [step + 1, step + 2]
    assert list(lrs.values()) == pytest.approx([ref.lr(step + 1), ref.lr(step + 2)])


def test_an_inverse_sqrt_olmo_run_continues_on_olmos_curve(pydoc_tokens, tmp_path):
    """OLMo's inverse_sqrt_with_warmup has no kiln config shape: the import carries its exact
    curve as segments, and the continued run's LR is OLMo's at every step to the end."""
    step = 30
    ref = build_olmo_checkpoint(tmp_path / "olmo", global_step=step, max_duration=60,
                                vocab_size=512, embedding_size=512,
                                scheduler={"name": "inverse_sqrt_with_warmup", "t_warmup": 10})
    out = import_olmo(tmp_path / "olmo", tmp_path / "kiln")
    raw = yaml.safe_load((out / "config.yaml").read_text())
    raw["data"].update(paths=[str(pydoc_tokens)], dtype=None, val_fraction=0.0)
    raw["trainer"].update(run_dir=str(tmp_path / "run"), device="cpu", hard_stop=step + 2)
    raw["checkpoint"].update(interval=0, save_final=False)
    raw["log"]["console"] = False
    raw["init"]["from"] = str(out)
    cfg = config_from_dict(raw)
    assert plan_start(cfg).schedule.lr(step + 1) == ref.lr(step + 1)  # what --dry-run shows
    trainer = Trainer(cfg)
    for s in range(1, 61):
        assert trainer.schedule.lr(s) == pytest.approx(ref.lr(s), rel=1e-15, abs=0), s
    lrs = record_lr(trainer)
    trainer.fit()
    assert list(lrs.values()) == pytest.approx([ref.lr(step + 1), ref.lr(step + 2)], rel=1e-15)


def test_an_olmo_schedule_kiln_cannot_reproduce_is_not_continued_silently(pydoc_tokens,
                                                                          tmp_path):
    build_olmo_checkpoint(tmp_path / "olmo", global_step=30, max_duration=60, vocab_size=512,
                          embedding_size=512)
    olmo_cfg = tmp_path / "olmo" / "config.yaml"
    olmo_cfg.write_text(olmo_cfg.read_text().replace("cosine_with_warmup", "max_scheduler"))
    out = import_olmo(tmp_path / "olmo", tmp_path / "kiln")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["init"]["from"] = str(out)
    cfg["data"].update(paths=[str(pydoc_tokens)], dtype=None)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = kiln_here("train", tmp_path / "c.yaml", "--dry-run")
    assert_one_line_error(r, "holds no LR schedule to continue at step 30",
                          "--schedule.restart=true", "--init.load_schedule_position=false")
    r = kiln_here("train", tmp_path / "c.yaml", "--dry-run", "--schedule.restart=true")
    assert r.returncode == 0, r.stderr


def test_olmo_run_whose_cosine_ends_before_the_run_continues_on_olmos_curve(tmp_path):
    """OLMo wrote step5 of a run with t_max=30 < max_duration=50, then took 5 more steps on
    fixed rows (tests/make_olmo_checkpoints.py). kiln continues the import on the same rows:
    the LR is OLMo's at every step (cosine to 30, flat to 50), the run ends at 50, and after
    5 steps the weights are OLMo's."""
    src = REAL / "olmo2_tmax"
    ref = torch.load(src / "reference.pt", weights_only=True)
    out = import_olmo(src / "step5-unsharded", tmp_path / "kiln")
    olmo10 = ckpt.load(import_olmo(src / "continued-step10-unsharded", tmp_path / "olmo10"))
    raw = yaml.safe_load((out / "config.yaml").read_text())  # the converted OLMo config
    assert raw["optim"]["loss_norm"] == "window"
    assert (raw["data"]["seq_len"], raw["data"]["stride"]) == (15, 16)  # OLMo's 16-token rows
    raw["data"].update(paths=[str(src / "rows.npy")], prefetch=2)
    raw["trainer"].update(run_dir=str(tmp_path / "run"), device="cpu")
    raw["checkpoint"].update(interval=0, save_final=False)
    raw["log"].update(console=False, interval=1)
    raw["init"]["from"] = str(out)
    cfg = config_from_dict(raw)
    planned = plan_start(cfg).schedule  # what --dry-run and `kiln schedule` show
    trainer = Trainer(cfg)
    assert trainer.numbers.stop_step == 50  # OLMo's max_duration, not t_max
    lrs, at10 = {}, {}

    class Record(Callback):
        def on_log(self, t, metrics):
            lrs[metrics["step"]] = metrics["lr"]
            if metrics["step"] == 10:
                at10.update({k: v.detach().clone() for k, v in t.module.state_dict().items()})

    trainer.callbacks.append(Record())
    trainer.fit()
    assert sorted(lrs) == list(range(6, 51))
    for s in range(6, 51):
        want = float(ref["lr"][s - 1])
        assert lrs[s] == pytest.approx(want, rel=1e-12), s
        assert planned.lr(s) == pytest.approx(want, rel=1e-12), s
    assert lrs[50] == lrs[31] == pytest.approx(1e-3)  # alpha_f * lr, held after t_max
    worst = max((at10[k] - v).abs().max().item() for k, v in olmo10.model.items())
    assert worst <= 1e-6, worst


def test_dry_run_of_an_olmo_continuation_names_the_flat_tail(tmp_path):
    src = REAL / "olmo2_tmax"
    out = import_olmo(src / "step5-unsharded", tmp_path / "kiln")
    done = subprocess.run(
        [sys.executable, "-m", "kiln", "train", str(out / "config.yaml"), f"--init.from={out}",
         f"--data.paths=[{src / 'rows.npy'}]", f"--trainer.run_dir={tmp_path / 'run'}",
         "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ("the source's schedule continues unchanged; it ends at step 30 and holds 0.001 to "
            "step 50") in done.stdout


@pytest.mark.parametrize("variant", ["olmo2", "olmo1", "bias_groups"])
def test_files_written_by_olmo_itself(variant, tmp_path):
    """Checkpoints saved by OLMo's own FullCheckpointer after real AdamW steps (ai2-olmo 0.6.0,
    tests/make_olmo_checkpoints.py): same logits, Adam state and LR curve."""
    src = next((REAL / variant).glob("step*-unsharded"))
    ref = torch.load(REAL / variant / "reference.pt", weights_only=True)
    out = import_olmo(src, tmp_path / "kiln")
    with torch.no_grad():
        got = kiln_model(out)(ref["input_ids"])
    assert (got - ref["logits"]).abs().max().item() <= 1e-5

    c = ckpt.load(out)
    assert c.step == ref["global_step"]
    sched = LRSchedule.from_state(c.trainer["schedule"])
    assert [sched.lr(s) for s in range(1, len(ref["lr"]) + 1)] == pytest.approx(
        ref["lr"].tolist(), rel=1e-12, abs=1e-15)

    # kiln's optim.pt holds OLMo's moments, split like the weights
    olmo_cfg = yaml.safe_load((src / "config.yaml").read_text())["model"]
    cfg = config_from_dict(c.config).model
    d, kv, h = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.hidden_size
    osd = torch.load(src / "optim.pt", weights_only=True)
    names = {pid: n for g in osd["param_groups"] for pid, n in zip(g["params"],
                                                                     g["param_names"])}
    group = olmo_cfg.get("block_group_size", 1)
    kiln_state = c.optim["state"]
    for pid, st in osd["state"].items():
        name = names[pid]
        if ".block_groups." in name:  # transformer.block_groups.{g}.{j}. -> blocks.{g*size+j}.
            parts = name.split(".")
            layer = int(parts[2]) * group + int(parts[3])
            name = ".".join(["transformer", "blocks", str(layer)] + parts[4:])
        for kname, want in split_like_olmo(name, st["exp_avg"], d, kv, h).items():
            assert torch.equal(kiln_state[kname]["exp_avg"], want), kname
            want_sq = split_like_olmo(name, st["exp_avg_sq"], d, kv, h)[kname]
            assert torch.equal(kiln_state[kname]["exp_avg_sq"], want_sq), kname
            assert float(kiln_state[kname]["step"]) == float(st["step"])


# -- refusals ----------------------------------------------------------------------------------


def assert_refused(olmo_dir: Path, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "kiln"
    with pytest.raises(KilnError) as e:
        import_olmo(olmo_dir, out)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    assert not out.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("field, value, needles", [
    ("alibi", True, ["model.alibi", "RoPE"]),
    ("clip_qkv", 8.0, ["model.clip_qkv=8.0"]),
    ("rope", False, ["model.rope=False", "position"]),
    ("activation_type", "gelu", ["model.activation_type='gelu'", "SwiGLU"]),
    ("scale_logits", True, ["model.scale_logits"]),
    ("attention_dropout", 0.1, ["model.attention_dropout=0.1", "dropout"]),
    ("block_type", "moe", ["model.block_type='moe'"]),
    ("moe_num_experts", 8, ["model.moe_num_experts=8"]),
])
def test_unsupported_models_are_refused_in_one_line(field, value, needles, tmp_path):
    build_olmo_checkpoint(tmp_path / "olmo", **{field: value} if field != "alibi" else
                          {"alibi": True, "rope": False})
    assert_refused(tmp_path / "olmo", tmp_path, *needles)


def test_unsupported_norms_and_heads_are_refused(tmp_path):
    cases = [
        (dict(layer_norm_with_affine=True, bias_for_layer_norm=False), "bias_for_layer_norm"),
        (dict(layer_norm_type="rms", layer_norm_with_affine=True, include_bias=True,
              weight_tying=True, bias_for_layer_norm=True), "RMSNorm with a bias"),
        (dict(include_bias=True, weight_tying=False, layer_norm_with_affine=True),
         "model.include_bias"),
        (dict(attention_layer_norm=True), "model.attention_layer_norm"),
    ]
    for i, (model, needle) in enumerate(cases):
        build_olmo_checkpoint(tmp_path / f"olmo{i}", **model)
        assert_refused(tmp_path / f"olmo{i}", tmp_path, needle)


def test_truncated_model_pt_is_refused(tmp_path):
    build_olmo_checkpoint(tmp_path / "olmo")
    f = tmp_path / "olmo" / "model.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_refused(tmp_path / "olmo", tmp_path, "model.pt", "truncated")


def test_missing_tensor_is_refused(tmp_path):
    build_olmo_checkpoint(tmp_path / "olmo")
    f = tmp_path / "olmo" / "model.pt"
    state = torch.load(f, weights_only=True)
    del state["transformer.blocks.1.ff_proj.weight"]
    torch.save(state, f)
    assert_refused(tmp_path / "olmo", tmp_path, "transformer.blocks.1.ff_proj.weight")


def test_missing_adam_state_and_lion_are_refused_unless_no_optimizer(tmp_path):
    build_olmo_checkpoint(tmp_path / "olmo")
    f = tmp_path / "olmo" / "optim.pt"
    osd = torch.load(f, weights_only=True)
    del osd["state"][3]
    torch.save(osd, f)
    assert_refused(tmp_path / "olmo", tmp_path, "no Adam state", "--no-optimizer")
    out = import_olmo(tmp_path / "olmo", tmp_path / "weights", load_optimizer=False)
    assert not (out / "optim.pt").exists() and json.loads(
        (out / "trainer.json").read_text())["step"] == 30

    build_olmo_checkpoint(tmp_path / "lion", optimizer={"name": "lionw"})
    assert_refused(tmp_path / "lion", tmp_path, "optimizer.name='lionw'", "--no-optimizer")


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    build_olmo_checkpoint(tmp_path / "olmo")
    real_save = ckpt.save

    def save_then_fail(*args, **kwargs):
        real_save(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save", save_then_fail)
    assert_refused(tmp_path / "olmo", tmp_path, "No space left on device", "nothing was written")


def test_existing_output_is_refused(tmp_path):
    build_olmo_checkpoint(tmp_path / "olmo")
    (tmp_path / "kiln").mkdir()
    with pytest.raises(KilnError, match="exists"):
        import_olmo(tmp_path / "olmo", tmp_path / "kiln")


def test_step_zero_checkpoint_gives_fresh_adam_state(tmp_path):
    build_olmo_checkpoint(tmp_path / "olmo", global_step=0)
    out = import_olmo(tmp_path / "olmo", tmp_path / "kiln")
    state = ckpt.load(out).optim["state"]
    assert state and all(float(s["step"]) == 0 and not s["exp_avg"].any()
                         for s in state.values())


def test_cli_glue(tmp_path, capsys):
    build_olmo_checkpoint(tmp_path / "olmo", extra={"max_grad_norm_ratio": 2.0})
    parser = argparse.ArgumentParser()
    add_import_olmo_arguments(parser)
    args = parser.parse_args([str(tmp_path / "olmo"), str(tmp_path / "kiln")])
    assert run_import_olmo(args) == 0
    printed = capsys.readouterr().out
    assert "step 30" in printed and "--init.from=" in printed
    assert "max_grad_norm_ratio" in printed  # what is not reproduced is said
