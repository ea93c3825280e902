"""`kiln data check` on real token files: a copy of the prepared pydoc corpus with one problem
planted at a known position at a time, an OLMo-style raw file, and the checks kiln prepare and
kiln train run themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_one_line_error, kiln_here, write_config

from kiln.data.check import CHEAP, PERIODS, check_files

EOS = 0  # the trained tokenizer's <|endoftext|>


@pytest.fixture
def corpus(pydoc_tokens, tmp_path) -> Path:
    """A private copy of the prepared corpus folder: tokens.bin, tokens.json, tokenizer.json."""
    out = tmp_path / "tok"
    shutil.copytree(pydoc_tokens.parent, out)
    return out / "tokens.bin"


def ids_of(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def rewrite(path: Path, ids: np.ndarray, **sidecar) -> None:
    """Replace the tokens; the sidecar's token and document counts follow them (so only the
    planted problem shows) unless given."""
    ids.astype(np.uint16).tofile(path)
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta.update({"tokens": len(ids), "documents": int(np.count_nonzero(ids == EOS)), **sidecar})
    side.write_text(json.dumps(meta))


def lines_of(out) -> dict[str, str]:
    """{check name: its verdict line} of a one-file run."""
    return {line.split()[0]: " ".join(line.split()) for line in out.stdout.splitlines()
            if line.startswith("  ") and line.split()[0] in
            ("vocab", "documents", "separators", "empty", "lengths", "duplicates", "repeats")}


def test_clean_corpus_passes_every_check(corpus):
    out = kiln_here("data", "check", corpus.parent)
    assert out.returncode == 0, out.stderr
    checks = lines_of(out)
    assert len(checks) == 7
    for name, line in checks.items():
        assert line.startswith(f"{name} ") and " ok: " in line, line
    assert "79 EOS = 79 documents in the sidecar" in checks["documents"]
    assert "79 documents: min " in checks["lengths"] and "2^" in out.stdout
    assert out.stdout.splitlines()[-1] == (f"kiln data check: 1 file(s), {len(ids_of(corpus)):,} "
                                           "tokens: ok")


def test_doubled_separator_is_a_warning_naming_its_position(corpus):
    ids = ids_of(corpus)
    eos_at = np.flatnonzero(ids == EOS)
    q = int(eos_at[3])
    rewrite(corpus, np.insert(ids, q + 1, EOS))  # EOS EOS: an empty document after doc 4
    out = kiln_here("data", "check", corpus)
    assert out.returncode == 0, out.stdout  # a warning, not fatal
    checks = lines_of(out)
    assert checks["separators"].startswith("separators WARNING: 1 EOS EOS pair at "
                                           f"{q + 1:,}"), checks["separators"]
    assert checks["empty"].startswith("empty WARNING: 1 empty document"), checks["empty"]
    assert f"{q + 1:,}" in checks["empty"]
    assert out.stdout.splitlines()[-1].endswith("tokens: ok (2 warnings)")


def test_leading_eos_is_an_empty_document(corpus):
    rewrite(corpus, np.insert(ids_of(corpus), 0, EOS))
    checks = lines_of(kiln_here("data", "check", corpus))
    assert checks["empty"].startswith("empty WARNING: 1 empty document (an EOS at the start or "
                                      "right after an EOS), at 0"), checks["empty"]
    assert "min 0," in checks["lengths"]


def test_out_of_vocabulary_id_is_fatal_with_its_position(corpus):
    ids = ids_of(corpus)
    ids[12_345] = 600  # vocab 512
    rewrite(corpus, ids)
    out = kiln_here("data", "check", corpus)
    assert out.returncode == 1
    checks = lines_of(out)
    assert checks["vocab"].startswith("vocab FATAL: 1 id >= vocab 512 (largest 600), at 12,345")
    assert out.stdout.splitlines()[-1].endswith("tokens: FATAL (vocab in tokens.bin)")
    # --vocab-size overrides the sidecar's
    assert kiln_here("data", "check", corpus, "--vocab-size", "601").returncode == 0


def test_eos_count_differing_from_the_sidecar_is_fatal(corpus):
    rewrite(corpus, ids_of(corpus), documents=82)
    out = kiln_here("data", "check", corpus)
    assert out.returncode == 1
    assert lines_of(out)["documents"].startswith("documents FATAL: 79 EOS but the sidecar says "
                                                 "82 documents")


def test_bos_right_after_eos_is_reported_with_bos_id(corpus):
    ids = ids_of(corpus)
    q = int(np.flatnonzero(ids == EOS)[5])
    ids[q + 1] = 1
    rewrite(corpus, ids)
    assert "separators  ok" in kiln_here("data", "check", corpus).stdout
    line = lines_of(kiln_here("data", "check", corpus, "--bos-id", "1"))["separators"]
    assert line.startswith(f"separators WARNING: 1 BOS (1) right after EOS or at the start at "
                           f"{q + 1:,}"), line


def test_duplicate_windows_are_found(corpus):
    ids = ids_of(corpus)
    w = 2048
    ids[10 * w : 12 * w] = ids[2 * w : 4 * w]  # two windows copied: 2 of 105 windows (1.9%)
    rewrite(corpus, ids)
    out = kiln_here("data", "check", corpus)
    assert out.returncode == 0
    line = lines_of(out)["duplicates"]
    assert line.startswith("duplicates WARNING: 2 of 105 windows of 2,048 tokens (1.9%) repeat "
                           "an earlier window, first at 20,480, 22,528"), line


def test_long_repeated_run_is_found(corpus):
    ids = ids_of(corpus)
    ids[50_000:50_600] = np.tile([65, 66, 67], 200)  # a 3-token pattern over 600 tokens
    ids[60_000:60_300] = 66  # one token 300 times
    rewrite(corpus, ids)
    line = lines_of(kiln_here("data", "check", corpus))["repeats"]
    assert line.startswith("repeats WARNING: 2 runs of a token or 2-4-token pattern repeated "
                           "over more than 256 positions, first at 50,000, 60,000; longest 600 "
                           "tokens (a 3-token pattern) at 50,000"), line


def test_olmo_style_raw_file_needs_dtype_and_eos(corpus, tmp_path):
    raw = tmp_path / "olmo" / "part-000.npy"  # headerless, as OLMo writes them
    raw.parent.mkdir()
    ids_of(corpus).astype(np.uint32).tofile(raw)
    out = kiln_here("data", "check", raw, "--dtype", "uint32", "--eos-id", "0",
                    "--vocab-size", "512")
    assert out.returncode == 0, out.stderr + out.stdout
    checks = lines_of(out)
    assert "no sidecar document count" in checks["documents"]
    assert all(" ok: " in line for line in checks.values()), out.stdout
    assert_one_line_error(kiln_here("data", "check", raw), "--dtype")
    assert_one_line_error(kiln_here("data", "check", raw, "--dtype", "uint32"), "--eos-id")
    # no vocabulary given: the ids cannot be checked, said as a warning
    out = kiln_here("data", "check", raw.parent, "--dtype", "uint32", "--eos-id", "0")
    assert out.returncode == 0 and "vocab       WARNING: vocabulary unknown" in out.stdout


def test_missing_file_is_a_one_line_error(tmp_path):
    out = kiln_here("data", "check", tmp_path / "nope.bin")
    assert_one_line_error(out, "nope.bin", "does not exist")
    assert out.returncode == 2


@pytest.mark.parametrize("trial", range(16))
def test_chunk_borders_change_nothing(tmp_path, trial):
    """Runs, EOS EOS and duplicate windows straddling chunk borders: every chunk size gives the
    same findings as a direct computation over the whole file."""
    rng = np.random.default_rng(trial)
    n = int(rng.integers(50, 5000))
    ids = rng.integers(0, 6 if trial % 3 == 0 else 500, n).astype(np.uint16)
    for _ in range(int(rng.integers(0, 5))):
        a, p = int(rng.integers(0, n)), int(rng.integers(1, 6))
        seg = np.resize(rng.integers(0, 500, p), min(int(rng.integers(20, 900)), n - a))
        ids[a : a + len(seg)] = seg
    for _ in range(int(rng.integers(0, 4))):
        a = int(rng.integers(0, n))
        ids[a : a + 2] = EOS
    if n >= 256:
        ids[128:192] = ids[0:64]
    path = tmp_path / "r.bin"
    ids.tofile(path)
    min_run = 20

    spans = []  # direct: maximal runs of ids[i] == ids[i + p], merged across periods
    for p in PERIODS:
        edges = np.diff(np.r_[0, (ids[:-p] == ids[p:]).astype(np.int8), 0])
        spans += [(int(a), int(b) + p, p) for a, b in
                  zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)) if b - a > min_run]
    merged: list[list[int]] = []
    for a, b, p in sorted(spans):
        if merged and a < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b, p])
    eos = ids == EOS
    doubled = np.flatnonzero(eos[1:] & eos[:-1]) + 1
    windows = {bytes(ids[i : i + 64]) for i in range(0, n - 63, 64)}

    for chunk in (4, 8, 100, 1 << 22):
        fr = check_files(path, dtype="uint16", eos_id=EOS, vocab_size=500, seq_len=64 if
                         chunk > 64 else 4, chunk_tokens=chunk, min_run=min_run).files[0]
        assert fr["repeats"].count == len(merged)
        assert fr["repeats"].positions == [a for a, _, _ in merged[:5]]
        sep_count = fr["separators"].count - int(ids[-1] != EOS)
        assert sep_count == len(doubled)
        assert fr["empty"].positions == sorted(([0] if eos[0] else []) + list(doubled))[:5]
        if chunk > 64:
            assert fr["duplicates"].count == n // 64 - len(windows)


def test_prepare_prints_the_cheap_checks(pydoc_corpus, tmp_path):
    out = kiln_here("prepare", pydoc_corpus, "--out", tmp_path / "tok", "--vocab-size", "300",
                    "--no-progress")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == ("data check: ok (ids below vocab 300, EOS count = "
                                           "documents, no doubled separators or empty "
                                           "documents)")
    assert [c.name for c in check_files(tmp_path / "tok", checks=CHEAP).files[0].checks] == \
        list(CHEAP)


def test_train_warns_about_a_doubled_separator_in_the_first_mib(corpus, tmp_path):
    ids = ids_of(corpus)
    q = int(np.flatnonzero(ids == EOS)[0])
    rewrite(corpus, np.insert(ids, q + 1, EOS))
    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run")
    out = kiln_here("train", config, "--trainer.max_duration=1")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("kiln: warning:")]
    assert any(f"token file '{corpus.resolve()}': 1 empty document (EOS EOS or a leading EOS) "
               f"at {q + 1:,} (in the whole file)" in w for w in warnings), out.stderr


def test_train_refuses_an_out_of_vocabulary_id_in_the_first_mib(corpus, tmp_path):
    ids = ids_of(corpus)
    ids[777] = 600  # the sidecar still says the largest id is 511
    rewrite(corpus, ids)
    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run")
    out = kiln_here("train", config, "--trainer.max_duration=1")
    assert_one_line_error(out, "tokens.bin", "id 600", "position 777", "model.vocab_size=512")
    assert not (tmp_path / "run" / "checkpoints").exists()
