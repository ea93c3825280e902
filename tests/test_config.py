"""Config loading: YAML + dot overrides, presets, validation messages."""

import pytest

from kiln.config import (
    Duration,
    config_from_dict,
    load_config,
    parse_overrides,
    preset_model,
    run_numbers,
)
from kiln.errors import KilnError


def test_overrides_are_yaml_parsed_into_typed_fields():
    cfg = config_from_dict(
        {"model": {"preset": "tiny"}},
        parse_overrides(["--optim.lr=3e-4", "--trainer.max_duration={value: 2e9, unit: tokens}",
                         "--optim.betas=[0.9, 0.99]", "--data.paths=a.bin"]),
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.trainer.max_duration == Duration(2e9, "tokens")
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.data.paths == ["a.bin"]


def test_override_wins_over_yaml_and_preset_fields_can_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  n_layers: 2\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["--optim.lr=5e-4", "--model.d_model=128"])
    assert cfg.optim.lr == 5e-4
    assert cfg.model.n_layers == 2 and cfg.model.d_model == 128
    assert cfg.model.vocab_size == preset_model("tiny").vocab_size


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(KilnError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        config_from_dict({}, parse_overrides(["--optim.lrr=1"]))
    with pytest.raises(KilnError, match=r"'traner'.*did you mean 'trainer'"):
        config_from_dict({"traner": {}})


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(KilnError, match=r"'optim.lr' expects a number, got 'fast'"):
        config_from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(KilnError, match=r"'trainer.global_batch_size' expects an integer"):
        config_from_dict({"trainer": {"global_batch_size": 2.5}})
    with pytest.raises(KilnError, match=r"'model.norm' expects one of 'rmsnorm'"):
        config_from_dict({"model": {"norm": "batchnorm"}})


def test_unknown_preset_is_refused_with_suggestion():
    with pytest.raises(KilnError, match=r"unknown preset 'olmo1b'.*did you mean 'olmo-1b'"):
        config_from_dict({"model": {"preset": "olmo1b"}})


def test_olmo_1b_preset_has_published_parameter_count():
    m = preset_model("olmo-1b")
    assert m.num_params() == 1_176_764_416
    assert m.padded_vocab_size == 50304 and m.tie_embeddings and m.max_seq_len == 4096


def test_cross_field_checks():
    with pytest.raises(KilnError, match="not divisible into micro-batches"):
        config_from_dict({"trainer": {"global_batch_size": 10, "micro_batch_size": 4}})
    with pytest.raises(KilnError, match="longer than model.max_seq_len"):
        config_from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 4096}})


def test_run_numbers_from_token_duration():
    cfg = config_from_dict({
        "data": {"seq_len": 128},
        "trainer": {"global_batch_size": 16, "micro_batch_size": 4,
                    "max_duration": {"value": 1e6, "unit": "tokens"}},
        "schedule": {"warmup": {"value": 2048 * 10, "unit": "tokens"}},
    })
    n = run_numbers(cfg)
    assert n.tokens_per_step == 2048
    assert n.total_steps == 489  # ceil(1e6 / 2048)
    assert n.warmup_steps == 10
    assert n.micro_batches_per_step == 4
