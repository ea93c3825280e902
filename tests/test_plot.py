"""`kiln plot`: the curves of real (tiny) runs on one figure: two LRs overlaid, a continued
run drawn after its parent's history, a reference CSV, and one-line refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from test_cli import kiln_here
from test_train import tiny_cfg, train

from kiln.plot import load_histories, make_figure, panel_names, plot_runs

DEFAULT_PANELS = ["loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "quiz/acc"]


@pytest.fixture(scope="module")
def runs(pydoc_tokens, tmp_path_factory) -> dict[str, Path]:
    """Two 8-step runs at two LRs (the first with a downstream task), a run continued from
    the first one's step-4 checkpoint, and one started from its run directory with the
    counters reset."""
    root = tmp_path_factory.mktemp("plot-runs")
    quiz = root / "quiz.jsonl"
    quiz.write_text("".join(json.dumps(r) + "\n" for r in [
        {"context": "def f(x):\n    return", "choices": [" x", " the"], "gold": 0},
        {"context": "Python is a", "choices": [" language", " snake", " dog"], "gold": 0}]))
    small = dict(trainer__max_duration=8, trainer__eval_interval=4, trainer__eval_batches=1,
                 schedule__warmup=2, checkpoint__interval=0, checkpoint__save_final=False,
                 trainer__threads=1)
    threads = torch.get_num_threads()  # trainer.threads=1 sets it for the process
    try:
        a, b = root / "lr3e-3", root / "lr1e-3"  # a: checkpoints at steps 4 and 8 (latest)
        train(tiny_cfg(pydoc_tokens, a, eval__tasks=[str(quiz)],
                       **{**small, "checkpoint__interval": 4, "checkpoint__save_final": True}))
        train(tiny_cfg(pydoc_tokens, b, optim__lr=1e-3, **small))
        cont = root / "cont"
        train(tiny_cfg(pydoc_tokens, cont, **{**small, "trainer__max_duration": 10},
                       init__from=str(a / "checkpoints" / "step4")))
        fresh = root / "fresh"
        train(tiny_cfg(pydoc_tokens, fresh, **{**small, "trainer__max_duration": 4},
                       init__from=str(a), init__load_schedule_position=False))
    finally:
        torch.set_num_threads(threads)
    return {"a": a, "b": b, "cont": cont, "fresh": fresh, "root": root}


def records(run: Path, key: str = "loss") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def figure(runs: list[Path], parents: bool = True, **kw):
    """The figure plot_runs would write, not written (drawing is the slow part)."""
    return make_figure(load_histories(runs, parents=parents), **kw)


def panel(fig, name: str):
    return fig.axes[panel_names(fig).index(name)]


def legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def lines_of(ax) -> list:
    return [ln for ln in ax.get_lines() if len(ln.get_xdata())]


def test_two_lrs_on_one_png(runs, tmp_path):
    out, fig = plot_runs([runs["a"], runs["b"]], tmp_path / "two.png", smooth=3)
    image = mpimg.imread(out)
    assert image.shape[0] >= 500 and image.shape[1] >= 1000
    assert image[..., :3].std() > 0.05  # drawn on, not a blank page
    rgb = (image[..., :3] * 255).astype(np.uint32) @ np.array([65536, 256, 1], np.uint32)
    assert len(np.unique(rgb)) > 50  # lines in several colours, antialiased
    assert panel_names(fig) == DEFAULT_PANELS
    assert all(lines_of(ax) for ax in fig.axes)
    assert legend(fig) == ["lr3e-3", "lr1e-3"]
    # loss: per run the raw curve (thin) and its EMA, the raw one exactly the logged losses
    loss = panel(fig, "loss")
    raw = [ln for ln in loss.get_lines() if ln.get_linewidth() < 1]
    smooth = [ln for ln in loss.get_lines() if ln.get_linewidth() > 1]
    assert len(raw) == len(smooth) == 2
    logged = records(runs["a"])
    assert list(raw[0].get_xdata()) == [r["step"] for r in logged] == list(range(1, 9))
    assert list(raw[0].get_ydata()) == [r["loss"] for r in logged]
    assert list(smooth[0].get_ydata())[0] == logged[0]["loss"]  # the EMA is debiased
    assert not np.allclose(smooth[0].get_ydata(), raw[0].get_ydata())
    assert panel(fig, "loss").get_title(loc="left") == "loss  (EMA span 3)"
    # the LR is drawn as logged; validation points where they were logged
    assert [list(ln.get_ydata()) for ln in panel(fig, "lr").get_lines()] == [
        [r["lr"] for r in records(run)] for run in (runs["a"], runs["b"])]
    assert [list(ln.get_xdata()) for ln in panel(fig, "val_loss").get_lines()] == [[4, 8]] * 2
    assert [list(ln.get_xdata()) for ln in panel(fig, "quiz/acc").get_lines()] == [[4, 8]]


def test_the_command_writes_the_default_file_and_names_its_panels(runs):
    a = runs["a"]
    out = kiln_here("plot", a, runs["b"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"wrote {a / 'plots' / 'curves.png'} (6 panels: "
                                  f"{', '.join(DEFAULT_PANELS)})")
    assert mpimg.imread(a / "plots" / "curves.png").shape[1] >= 1000
    # a task's name alone is its primary metric (as the run's eval/stepN.json recorded it)
    out = kiln_here("plot", a, "--metrics", "loss, quiz,val_ppl", "--out", a / "p" / "x.png")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("(3 panels: loss, quiz/acc, val_ppl)")


def test_a_continued_run_is_drawn_after_its_parents_history(runs, tmp_path):
    a, cont = runs["a"], runs["cont"]
    fig = figure([cont], metrics="loss,lr")
    assert legend(fig) == ["cont", "cont (from parent lr3e-3)"]
    parent, own = lines_of(panel(fig, "loss"))
    assert parent.get_linestyle() == "--" and own.get_linestyle() == "-"
    assert parent.get_color() == own.get_color()
    # the parent's logged steps up to the checkpoint (step 4), joined to the child's first
    assert list(parent.get_xdata()) == [1, 2, 3, 4, 5]
    assert list(parent.get_ydata())[:4] == [r["loss"] for r in records(a)][:4]
    assert list(own.get_xdata()) == list(range(5, 11))
    assert list(own.get_ydata()) == [r["loss"] for r in records(cont)]
    assert panel(fig, "loss").get_xlim()[0] < 1
    # --no-parents: the run alone; the command says what it drew
    ran = kiln_here("plot", cont, "--out", tmp_path / "alone.png", "--no-parents",
                    "--metrics", "loss")
    assert ran.returncode == 0 and "continues" not in ran.stdout
    fig = figure([cont], parents=False, metrics="loss")
    assert [list(ln.get_xdata()) for ln in panel(fig, "loss").get_lines()] == [list(range(5, 11))]
    ran = kiln_here("plot", cont, "--out", tmp_path / "with.png", "--metrics", "loss")
    assert f"cont: continues lr3e-3 from step 4 (init.from={a / 'checkpoints' / 'step4'})" \
        in ran.stdout
    # a parent also given as a run of its own is drawn once, in its own colour
    fig = figure([a, cont], metrics="loss")
    assert legend(fig) == ["lr3e-3", "cont"]
    assert [ln.get_xdata()[0] for ln in panel(fig, "loss").get_lines()] == [1, 5]


def test_a_run_that_counted_from_zero_again_sits_after_its_parent(runs, tmp_path):
    """init.from=RUN_DIR (its latest checkpoint, step 8) with load_schedule_position=false:
    the child's steps 1..4 are the history's steps 9..12, its tokens after the parent's."""
    a, fresh = runs["a"], runs["fresh"]
    ran = kiln_here("plot", fresh, "--out", tmp_path / "f.png", "--metrics", "loss")
    assert "fresh: continues lr3e-3 from step 8, its latest checkpoint" in ran.stdout
    fig = figure([fresh], metrics="loss")
    parent, own = panel(fig, "loss").get_lines()
    assert list(parent.get_xdata()) == list(range(1, 10))
    assert list(own.get_xdata()) == [9, 10, 11, 12]
    fig = figure([fresh], metrics="loss", x="tokens")
    parent, own = panel(fig, "loss").get_lines()
    step8 = records(a)[7]["tokens"]
    assert list(own.get_xdata()) == [step8 + r["tokens"] for r in records(fresh)]


def test_the_parent_is_found_after_runs_moved_and_its_checkpoint_was_removed(runs):
    """init.from names a place that is gone (another machine's path, a checkpoint that
    retention removed): the parent run beside the child is used, cut at the named step."""
    import yaml

    moved = runs["root"] / "moved"
    moved.mkdir()
    (moved / "metrics.jsonl").write_text((runs["cont"] / "metrics.jsonl").read_text())
    cfg = yaml.safe_load((runs["cont"] / "config.yaml").read_text())
    cfg["init"]["from"] = "/elsewhere/runs/lr3e-3/checkpoints/step3"
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    fig = figure([moved], metrics="loss")
    parent, own = panel(fig, "loss").get_lines()
    assert list(parent.get_xdata()) == [1, 2, 3, 5] and list(own.get_xdata())[0] == 5
    assert legend(fig) == ["moved", "moved (from parent lr3e-3)"]
    cfg["init"]["from"] = "hf:some/model"  # imported weights: no history to draw
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert len(panel(figure([moved], metrics="loss"), "loss").get_lines()) == 1


def test_tokens_axis(runs):
    fig = figure([runs["a"], runs["b"]], x="tokens", metrics=["loss", "val_loss"], smooth=1)
    assert [list(ln.get_xdata()) for ln in panel(fig, "loss").get_lines()] == [
        [r["tokens"] for r in records(run)] for run in (runs["a"], runs["b"])]
    assert fig.axes[-1].get_xlabel() == "tokens"
    assert panel(fig, "loss").get_title(loc="left") == "loss"  # span 1: no smoothing


@pytest.mark.parametrize("suffix,magic", [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_svg_and_pdf_by_the_extension(runs, tmp_path, suffix, magic):
    out = kiln_here("plot", runs["a"], "--metrics", "loss", "--out", tmp_path / f"c{suffix}")
    assert out.returncode == 0, out.stderr
    data = (tmp_path / f"c{suffix}").read_bytes()
    assert data.startswith(magic)
    if suffix == ".svg":
        assert b"<svg" in data and b"lr3e-3" in data


def test_a_reference_curve_from_a_csv(runs, tmp_path):
    csv = tmp_path / "published.csv"
    csv.write_text("Steps,loss,notes\n1,6.3,\n4,6.1,\n8,\n9,5.9,\n")
    fig = figure([runs["a"]], compare=csv, metrics="loss,lr")
    ref = [ln for ln in panel(fig, "loss").get_lines() if ln.get_label() == "published"]
    assert len(ref) == 1 and ref[0].get_color() == "black" and ref[0].get_linestyle() == "--"
    assert list(ref[0].get_xdata()) == [1, 4, 9] and list(ref[0].get_ydata()) == [6.3, 6.1, 5.9]
    assert "published" in legend(fig)
    assert all(ln.get_label() != "published" for ln in panel(fig, "lr").get_lines())
    tokens = tmp_path / "tok.csv"
    tokens.write_text("tokens,val_loss\n1024,6.0\n2048,5.9\n")
    fig = figure([runs["a"]], compare=tokens, x="tokens", metrics="val_loss")
    assert [ln.get_label() for ln in panel(fig, "val_loss").get_lines()][-1] == "tok"


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path):
    a = runs["a"]
    empty = tmp_path / "empty"
    empty.mkdir()

    def csv(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    cases = [
        (["--metrics", "vall_loss"], ["unknown metric 'vall_loss'", "did you mean val_loss"]),
        (["--metrics", "gradnorm,lr"], ["did you mean grad_norm"]),
        (["--metrics", ","], ["--metrics is empty"]),
        ([empty], [f"{empty} has no metrics.jsonl"]),
        ([tmp_path / "nope"], ["does not exist"]),
        (["--compare", csv("epochs.csv", "epoch,loss\n1,3\n")], ["no x column", "step"]),
        (["--compare", csv("acc.csv", "step,accuracy\n1,3\n")],
         ["no column is a metric drawn", "accuracy", "--metrics"]),
        (["--compare", csv("steps.csv", "step,loss\n1,3\n"), "--x", "tokens"],
         ["x column is 'step', not tokens", "--x steps"]),
        (["--compare", csv("text.csv", "step,loss\n1,3\n2,three\n")],
         ["line 3", "'three'", "not a number"]),
        (["--compare", csv("head.csv", "step,loss\n")], ["no rows of numbers"]),
        (["--compare", tmp_path / "missing.csv"], ["no such file"]),
        (["--smooth", "-1"], ["--smooth -1"]),
    ]
    for args, words in cases:
        out_dir = tmp_path / "out"
        run = [] if any(isinstance(x, Path) and x.parent == tmp_path and "csv" not in x.name
                        for x in args) else [a]
        ran = kiln_here("plot", *run, *args, "--out", out_dir / "c.png")
        assert ran.returncode == 2, (args, ran.stdout, ran.stderr)
        assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr
        assert ran.stderr.startswith("kiln: error: ")
        for w in words:
            assert w in ran.stderr, (w, ran.stderr)
        assert not out_dir.exists(), args
    ran = kiln_here("plot", a, "--out", tmp_path / "c.jpg")
    assert ran.returncode == 2 and ".png, .svg or .pdf" in ran.stderr
    assert not (tmp_path / "c.jpg").exists()
    ran = kiln_here("plot", empty)  # default out beside the run: nothing made there either
    assert ran.returncode == 2 and not (empty / "plots").exists()
