"""Every config field refuses every value outside its declared domain, in one line, before
anything is read or written.

The bad values are generated from the domains declared on the fields (Annotated[type, Domain])
and from their types, walking the whole config tree: a field added later is covered as soon as
it exists, and a numeric field without a declared domain fails this test.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Literal, Union

import pytest
import yaml
from test_cli import assert_one_line_error, kiln_here

from kiln.config import Config, Duration, field_domain

# Fields whose values are not numbers, with what checks them instead.
FREE = {
    "model.preset": "checked against the preset names (unknown ones are refused with a "
                    "suggestion: tests/test_config.py)",
    "data.paths": "paths, opened (and refused by name) when the data is read",
    "data.val_paths": "paths, as data.paths",
    "data.sources": "a list of {paths, weight, name}: each item's fields are checked like any "
                    "other (tests/test_mixture.py)",
    "data.tokenizer": "a path or a known tokenizer name, resolved when needed",
    "data.cache_dir": "a folder, created when a URL in the data paths is fetched",
    "trainer.run_dir": "any folder",
    "init.from": "a checkpoint, resolved when the run starts",
    "log.wandb_project": "any W&B project name",
    "eval.tasks": "task names or JSONL files: an unknown one is refused before step 1, with a "
                  "did-you-mean (tests/test_eval.py)",
}


def leaves(cls: type = Config, prefix: str = ""):
    """(dotted path, dataclass, field) of every leaf field of the config tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = "from" if f.name == "from_" else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and tp is not Duration:
            yield from leaves(tp, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", cls, f


def _strip_optional(tp):
    if typing.get_origin(tp) in (Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _outside(dom, integer: bool) -> list[float]:
    """Numbers just outside each bound of `dom` (and the bound itself where it is open)."""
    step = 1 if integer else 0.5
    out = []
    if dom.gt is not None:
        out += [dom.gt, dom.gt - step]
    if dom.ge is not None:
        out += [dom.ge - step]
    if dom.lt is not None:
        out += [dom.lt]
    if dom.le is not None:
        out += [dom.le + step]
    return [int(v) if integer else v for v in out]


def bad_values(cls: type, f: dataclasses.Field) -> list[str]:
    """YAML texts of values the field must refuse."""
    tp = _strip_optional(typing.get_type_hints(cls)[f.name])
    dom = field_domain(cls, f.name)
    origin = typing.get_origin(tp)
    if tp is bool:
        return ["maybe", "2"]
    if origin is Literal:
        return ["not-a-choice"]
    if origin in (Union, __import__("types").UnionType):  # bool | Literal["auto"]
        return ["maybe"]
    if tp is str:  # a text field outside FREE must declare the form it accepts
        assert dom is not None and dom.pattern, "a text field must declare its Domain pattern"
        return ["not-a-form", "''", str(f.default) + " 0", str(f.default) + "x"]
    if tp in (int, float) or tp is Duration or origin is list:
        assert dom is not None, "a numeric field must declare its Domain"
    # every number has an upper bound too: a huge value (1e30) is refused by the dry run, not
    # met by training as a crash or a hang
    assert tp not in (int, float, Duration) and origin is not list or (
        dom.le is not None or dom.lt is not None), "a numeric field must declare an upper bound"
    if tp is int:
        return [str(v) for v in _outside(dom, True)] + ["1.5", "abc", "1e30"]
    if tp is float:
        return [str(v) for v in _outside(dom, False)] + [".nan", ".inf", "abc", "1e30"]
    if tp is Duration:
        return ([f"{{value: {v}, unit: steps}}" for v in _outside(dom, False)]
                + ["{value: .inf, unit: tokens}", "{value: 5, unit: hours}",
                   "{value: 1e30, unit: tokens}", "{value: 1e30, unit: steps}"])
    if origin is list:  # exactly dom.items items: fewer, none, more
        default = f.default_factory()
        out = [yaml.safe_dump(default[: dom.items - 1], default_flow_style=True).strip(), "[]",
               str(default + default[-1:])]
        for v in _outside(dom, False):
            out.append(str([v, *default[1:]]))
        out.append(str([float("nan"), *default[1:]]).replace("nan", ".nan"))
        out.append(str([1e30, *default[1:]]))
        return out
    raise AssertionError(f"no generator for {tp}")


CASES = [(path, value) for path, cls, f in leaves() if path not in FREE
         for value in bad_values(cls, f)]


def test_every_field_is_covered():
    paths = {p for p, _, _ in leaves()}
    assert set(FREE) <= paths
    covered = {p for p, _ in CASES}
    assert covered | set(FREE) == paths
    assert len(CASES) > 120


@pytest.fixture(scope="module")
def fresh_clone_config(tmp_path_factory) -> Path:
    """A valid config whose data does not exist yet (a dry run on a fresh clone)."""
    root = tmp_path_factory.mktemp("domains")
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"},
        "data": {"paths": [str(root / "not-prepared-yet" / "tokens.bin")], "seq_len": 64},
        "trainer": {"run_dir": str(root / "run"), "global_batch_size": 8,
                    "micro_batch_size": 4},
    }))
    return path


def test_the_base_config_is_valid_up_to_its_missing_data(fresh_clone_config):
    # a dry run works before `kiln prepare`: the plan, with the missing data named
    out = kiln_here("train", fresh_clone_config, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "matches no files yet" in out.stdout


def test_every_out_of_domain_value_is_refused_in_one_line(fresh_clone_config):
    run = fresh_clone_config.parent / "run"
    failures = []
    for path, value in CASES:
        out = kiln_here("train", fresh_clone_config, f"--{path}={value}", "--dry-run")
        lines = out.stderr.strip().splitlines()
        ok = (out.returncode == 2 and len(lines) == 1 and lines[0].startswith("kiln: error: ")
              and path in lines[0] and "matches no files" not in lines[0])
        if not ok:
            failures.append(f"--{path}={value}: rc {out.returncode}, {out.stderr.strip()!r}")
    assert not failures, "\n".join(failures)
    assert not run.exists()


# The values a new user tried, which crashed with a traceback or trained as if fine.
REPORTED = [
    ("optim.lr", "-0.001"), ("optim.eps", "-1"), ("optim.betas", "[0.9]"),
    ("optim.betas", "[0.9, 1.5]"), ("log.interval", "0"), ("trainer.threads", "-1"),
    ("schedule.warmup", "-5"), ("checkpoint.interval", "-1"), ("optim.weight_decay", "-0.1"),
    ("trainer.eval_batches", "0"), ("optim.grad_clip", "-1"),
]


@pytest.mark.parametrize("path, value", REPORTED)
def test_the_reported_bad_values_are_refused(fresh_clone_config, path, value):
    out = kiln_here("train", fresh_clone_config, f"--{path}={value}")
    assert_one_line_error(out, f"{path}=", "must", "; ")
    assert not (fresh_clone_config.parent / "run").exists()
