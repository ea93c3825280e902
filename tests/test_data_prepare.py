"""kiln prepare on real English text (Python's own documentation topics, shipped with Python)."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from kiln.data import prepare as prepare_mod
from kiln.data.prepare import add_prepare_arguments, prepare, run_prepare
from kiln.data.tokens import TokenFile, check_vocab, open_token_files, resolve_paths
from kiln.errors import KilnError

VOCAB = 1000
DOCS = [topics[k] for k in sorted(topics)]  # ~80 real documents, ~460 kB


def split_documents(ids: np.ndarray, eos: int) -> list[np.ndarray]:
    """The documents of a token array (each followed by one EOS)."""
    ends = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[s:e] for s, e in zip(starts, ends)]


def assert_one_eos_per_document(ids: np.ndarray, eos: int, n_docs: int) -> None:
    is_eos = ids == eos
    assert is_eos[-1] and not is_eos[0]
    assert not np.any(is_eos[1:] & is_eos[:-1]), "found EOS EOS"
    assert int(is_eos.sum()) == n_docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    lines = [json.dumps({"id": i, field: d}) for i, d in enumerate(docs)]
    data = ("\n".join(lines) + "\n").encode()
    if path.name.endswith(".gz"):
        # mtime=0 keeps the file itself reproducible
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    table = pa.table({"id": list(range(len(docs))), field: docs})
    pq.write_table(table, path, row_group_size=17)  # several row groups
    return path


def write_txt_dir(folder: Path, docs: list[str]) -> Path:
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(d, encoding="utf-8", newline="")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One prepare run that trains a tokenizer; other tests reuse its tokenizer.json."""
    root = tmp_path_factory.mktemp("trained")
    src = write_jsonl(root / "corpus.jsonl", DOCS)
    prepare([str(src)], root / "out", vocab_size=VOCAB, progress=False)
    return root / "out"


def tokenizer_of(out: Path) -> Tokenizer:
    return Tokenizer.from_file(str(out / "tokenizer.json"))


# --------------------------------------------------------------------------------------------
# Output shape


def test_exactly_one_eos_after_each_document_and_none_doubled(trained):
    f = TokenFile.open(trained / "tokens.bin")
    assert f.meta["documents"] == len(DOCS)
    assert f.eos_token_id == tokenizer_of(trained).token_to_id("<|endoftext|>") == 0
    assert_one_eos_per_document(np.asarray(f.tokens), f.eos_token_id, len(DOCS))


def test_decoding_each_document_gives_back_its_text(trained):
    tok = tokenizer_of(trained)
    f = TokenFile.open(trained / "tokens.bin")
    pieces = split_documents(np.asarray(f.tokens), f.eos_token_id)
    assert len(pieces) == len(DOCS)
    for ids, text in zip(pieces, DOCS):
        assert tok.decode(ids.tolist(), skip_special_tokens=False) == text


def test_trained_tokenizer_gets_the_requested_vocab_size(trained):
    meta = json.loads((trained / "tokens.json").read_text())
    assert meta["vocab_size"] == VOCAB == tokenizer_of(trained).get_vocab_size()
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"] == "tokenizer.json"
    assert meta["max_token_id"] < VOCAB
    f = TokenFile.open(trained / "tokens.bin")
    check_vocab([f], VOCAB)
    assert f.tokenizer_path == trained / "tokenizer.json"


def test_literal_endoftext_in_text_stays_text_and_never_doubles_eos(trained, tmp_path):
    docs = [
        "A note on tokenizers; this document ends with <|endoftext|>",
        "<|endoftext|>",  # nothing but the literal text
        "middle <|endoftext|> of a document",
        "plain text",
    ]
    prepare([str(write_jsonl(tmp_path / "eos.jsonl", docs))], tmp_path / "out",
            tokenizer=str(trained / "tokenizer.json"), progress=False)
    f = TokenFile.open(tmp_path / "out" / "tokens.bin")
    ids = np.asarray(f.tokens)
    # Boundaries come from the input format only: four documents, four EOS ids.
    assert f.meta["documents"] == len(docs)
    assert_one_eos_per_document(ids, f.eos_token_id, len(docs))
    tok = tokenizer_of(tmp_path / "out")
    decoded = [tok.decode(p.tolist(), skip_special_tokens=False)
               for p in split_documents(ids, f.eos_token_id)]
    assert decoded == docs


def test_post_processor_that_appends_eos_does_not_double_it(trained, tmp_path):
    tok = tokenizer_of(trained)
    tok.post_processor = TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)]
    )
    assert tok.encode("hi").ids[-1] == 0  # it really would append one
    tok.save(str(tmp_path / "eos_tok.json"))
    prepare([str(write_jsonl(tmp_path / "c.jsonl", DOCS[:10]))], tmp_path / "out",
            tokenizer=str(tmp_path / "eos_tok.json"), progress=False)
    ids = np.asarray(TokenFile.open(tmp_path / "out" / "tokens.bin").tokens)
    assert_one_eos_per_document(ids, 0, 10)


def test_empty_documents_are_skipped(trained, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(
        "\n".join(json.dumps({"text": t}) for t in ["one", "", "   \n", "two"]) + "\n\n\n"
    )
    meta = prepare([str(src)], tmp_path / "out", tokenizer=str(trained / "tokenizer.json"),
                   progress=False)
    assert meta["documents"] == 2
    ids = np.asarray(TokenFile.open(tmp_path / "out" / "tokens.bin").tokens)
    assert_one_eos_per_document(ids, 0, 2)


# --------------------------------------------------------------------------------------------
# dtype and determinism


def test_vocab_over_65536_is_written_as_uint32(tmp_path):
    words = sorted({w for d in DOCS[:5] for w in d.split()})
    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    vocab.update({f"filler{i}": i + 2 for i in range(70_000)})
    # Real words get the highest ids, so the output must hold ids above 65535.
    vocab.update({w: 70_002 + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))

    meta = prepare([str(write_jsonl(tmp_path / "c.jsonl", DOCS[:5]))], tmp_path / "out",
                   tokenizer=str(tmp_path / "big.json"), progress=False)
    assert meta["dtype"] == "uint32"
    assert meta["vocab_size"] == len(vocab)
    f = TokenFile.open(tmp_path / "out" / "tokens.bin")
    assert f.dtype == np.uint32 and f.max_token_id() > 65535
    copied = (tmp_path / "out" / "tokenizer.json").read_bytes()
    assert copied == (tmp_path / "big.json").read_bytes()
    assert_one_eos_per_document(np.asarray(f.tokens), 0, 5)
    check_vocab([f], len(vocab))


def test_same_input_gives_byte_identical_output(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS[:40])
    for out in ("a", "b"):
        prepare([str(src)], tmp_path / out, vocab_size=600, progress=False)
    for name in ("tokens.bin", "tokens.json", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# --------------------------------------------------------------------------------------------
# Readers


def test_txt_jsonl_jsonl_gz_and_parquet_readers_agree(trained, tmp_path):
    docs = DOCS[:30]
    inputs = {
        "txt": write_txt_dir(tmp_path / "txt", docs),
        "jsonl": write_jsonl(tmp_path / "c.jsonl", docs),
        "jsonl.gz": write_jsonl(tmp_path / "c.jsonl.gz", docs),
        "json.gz": write_jsonl(tmp_path / "c.json.gz", docs),
        "parquet": write_parquet(tmp_path / "c.parquet", docs),
    }
    outputs = {}
    for kind, src in inputs.items():
        meta = prepare([str(src)], tmp_path / f"out-{kind}", batch_size=7,
                       tokenizer=str(trained / "tokenizer.json"), progress=False)
        assert meta["documents"] == len(docs), kind
        outputs[kind] = (tmp_path / f"out-{kind}" / "tokens.bin").read_bytes()
    assert len(set(outputs.values())) == 1


def test_directory_input_is_recursive_and_skips_other_files(trained, tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.md").write_text(DOCS[0])
    (root / "sub" / "b.txt").write_text(DOCS[1])
    (root / "sub" / "image.png").write_bytes(b"\x89PNG")
    meta = prepare([str(root)], tmp_path / "out", tokenizer=str(trained / "tokenizer.json"),
                   progress=False)
    assert meta["documents"] == 2
    assert [Path(s).name for s in meta["sources"]] == ["a.md", "b.txt"]


def test_progress_bar_runs(trained, tmp_path):
    meta = prepare([str(write_jsonl(tmp_path / "c.jsonl.gz", DOCS[:5]))], tmp_path / "out",
                   tokenizer=str(trained / "tokenizer.json"), progress=True)
    assert meta["documents"] == 5


def test_tokenizers_parallelism_is_on_while_encoding_and_restored_after(trained, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # as a DataLoader setup might
    seen = []
    documents = prepare_mod._Corpus.documents

    def spy(self, meter):
        seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        yield from documents(self, meter)

    monkeypatch.setattr(prepare_mod._Corpus, "documents", spy)
    prepare([str(write_jsonl(tmp_path / "c.jsonl", DOCS[:3]))], tmp_path / "out",
            tokenizer=str(trained / "tokenizer.json"), progress=False)
    assert seen == ["true"]
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_run_prepare_prints_a_summary(trained, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    src = write_jsonl(tmp_path / "c.jsonl", DOCS[:5])
    args = parser.parse_args([str(src), "--out", str(tmp_path / "out"), "--tokenizer",
                              str(trained / "tokenizer.json"), "--name", "docs",
                              "--no-progress"])
    assert run_prepare(args) == 0
    text = capsys.readouterr().out
    assert "5 documents" in text and "uint16" in text and "tokens/s" in text
    assert str(tmp_path / "out" / "docs.bin") in text
    assert (tmp_path / "out" / "docs.json").is_file()


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_text_field_names_file_line_and_field(trained, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "fine"}\n\n{"body": "oops"}\n')
    with pytest.raises(KilnError, match=r"c\.jsonl:3 has no string field 'text'.*--text-field"):
        prepare([str(src)], tmp_path / "out", tokenizer=str(trained / "tokenizer.json"),
                progress=False)
    src.write_text('{"text": 42}\n')
    with pytest.raises(KilnError, match=r"c\.jsonl:1 has no string field 'text'"):
        prepare([str(src)], tmp_path / "out", vocab_size=300, progress=False)
    # The bad line came after good documents: nothing may be left behind.
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_missing_parquet_column_names_the_columns_present(trained, tmp_path):
    src = write_parquet(tmp_path / "c.parquet", DOCS[:3], field="content")
    with pytest.raises(KilnError, match=r"no column 'text' \(columns: id, content\)"):
        prepare([str(src)], tmp_path / "out", tokenizer=str(trained / "tokenizer.json"),
                progress=False)
    meta = prepare([str(src)], tmp_path / "out", text_field="content",
                   tokenizer=str(trained / "tokenizer.json"), progress=False)
    assert meta["documents"] == 3


def test_existing_output_without_overwrite_is_an_error_and_stays_untouched(trained, tmp_path):
    out = tmp_path / "out"
    tok = str(trained / "tokenizer.json")
    prepare([str(write_jsonl(tmp_path / "a.jsonl", DOCS[:3]))], out, tokenizer=tok,
            progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = str(write_jsonl(tmp_path / "b.jsonl", DOCS[3:9]))
    with pytest.raises(KilnError, match="exists; pass --overwrite or choose another --out"):
        prepare([other], out, tokenizer=tok, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    meta = prepare([other], out, tokenizer=tok, overwrite=True, progress=False)
    assert meta["documents"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokens.bin",
                                                     "tokens.json"]


def test_error_mid_corpus_leaves_no_partial_files(trained, tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", DOCS[:20])
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(KilnError, match=r"b\.jsonl:2 is not valid JSON"):
        prepare([str(good), str(bad)], tmp_path / "out", batch_size=4,
                tokenizer=str(trained / "tokenizer.json"), progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_inputs_are_clear_errors(trained, tmp_path):
    tok = str(trained / "tokenizer.json")
    out = tmp_path / "out"
    with pytest.raises(KilnError, match="does not exist"):
        prepare([str(tmp_path / "nope.jsonl")], out, tokenizer=tok, progress=False)
    with pytest.raises(KilnError, match="matches no files"):
        prepare([str(tmp_path / "*.jsonl")], out, tokenizer=tok, progress=False)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(KilnError, match="unknown extension"):
        prepare([str(tmp_path / "data.csv")], out, tokenizer=tok, progress=False)
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(KilnError, match="no documents found"):
        prepare([str(tmp_path / "blank.txt")], out, tokenizer=tok, progress=False)
    with pytest.raises(KilnError, match="no documents found"):
        prepare([str(tmp_path / "blank.txt")], out, vocab_size=300, progress=False)
    with pytest.raises(KilnError, match="--vocab-size"):
        prepare([str(tmp_path / "blank.txt")], out, progress=False)
    with pytest.raises(KilnError, match="sidecar over tokenizer.json"):
        prepare([str(tmp_path / "blank.txt")], out, tokenizer=tok, name="tokenizer",
                progress=False)
    with pytest.raises(KilnError, match="is not a HF tokenizers tokenizer.json"):
        prepare([str(tmp_path / "blank.txt")], out, tokenizer=str(tmp_path / "data.csv"),
                progress=False)
    assert not out.exists() or list(out.iterdir()) == []


def test_tokenizer_without_an_eos_token_is_an_error(tmp_path):
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "noeos.json"))
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(KilnError, match="no end-of-text token"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "out",
                tokenizer=str(tmp_path / "noeos.json"), progress=False)


# --------------------------------------------------------------------------------------------
# --overwrite swaps a staged set in: a kill leaves the old set or a refusal, never a mix

_PREPARE_CODE = ("import argparse, sys; from kiln.data.prepare import add_prepare_arguments, "
                 "run_prepare; p = argparse.ArgumentParser(); add_prepare_arguments(p); "
                 "sys.exit(run_prepare(p.parse_args()))")


def prepare_process(*args, crash: str, cli: bool = False) -> subprocess.CompletedProcess:
    """``kiln prepare ARGS`` in its own process, SIGKILLed at ``crash`` (KILN_PREPARE_CRASH).

    ``cli`` runs the real ``python -m kiln prepare``; otherwise the same arguments go through
    kiln.data.prepare alone, which starts faster (the kiln CLI imports torch)."""
    cmd = ["-m", "kiln", "prepare"] if cli else ["-c", _PREPARE_CODE]
    return subprocess.run([sys.executable, *cmd, *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KILN_PREPARE_CRASH": crash})


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file directly in ``out`` (hidden ones too), by name."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def old_output(trained: Path, tmp_path: Path) -> Path:
    """OUT holding a finished prepare with the trained tokenizer."""
    out = tmp_path / "out"
    prepare([str(write_jsonl(tmp_path / "old.jsonl", DOCS[:10]))], out,
            tokenizer=str(trained / "tokenizer.json"), progress=False)
    return out


def test_overwrite_killed_before_the_swap_leaves_the_old_files(trained, tmp_path):
    out = old_output(trained, tmp_path)
    before = snapshot(out)
    new = write_jsonl(tmp_path / "new.jsonl", DOCS[10:30])
    done = prepare_process(new, "--out", out, "--vocab-size", 300, "--overwrite",
                           crash="staged", cli=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert snapshot(out) == before  # tokens.bin, tokens.json and tokenizer.json untouched
    [stage] = out.glob(".prepare-tokens-*")  # the killed prepare's, with the full new set
    assert sorted(p.name for p in stage.iterdir()) == ["incomplete", "tokenizer.json",
                                                       "tokens.bin", "tokens.json"]
    # The old set still reads, and no data path reaches into the staging folder.
    assert TokenFile.open(out / "tokens.bin").meta["documents"] == 10
    for pattern in (out, out / "*.bin", out / "**" / "*.bin", out / "*"):
        assert resolve_paths([pattern]) == [(out / "tokens.bin").resolve()], pattern


@pytest.mark.parametrize("crash", ["marked", "tokenizer", "data"])
def test_overwrite_killed_inside_the_swap_is_refused_then_repaired(trained, tmp_path, crash):
    out = old_output(trained, tmp_path)
    new = write_jsonl(tmp_path / "new.jsonl", DOCS[10:30])
    done = prepare_process(new, "--out", out, "--vocab-size", 300, "--overwrite", crash=crash)
    assert done.returncode == -signal.SIGKILL, done.stderr
    # Old, new or mixed files: whatever is there is refused with the way out, not misread.
    for pattern in (out / "tokens.bin", out):
        with pytest.raises(KilnError, match=r"tokens\.json' marks a kiln prepare that stopped "
                                            r"while replacing .*re-run kiln prepare --overwrite"):
            open_token_files([pattern])
    with pytest.raises(KilnError, match="exists; pass --overwrite"):
        prepare([str(new)], out, vocab_size=300, progress=False)
    prepare([str(new)], out, vocab_size=300, overwrite=True, progress=False)
    assert TokenFile.open(out / "tokens.bin").meta["documents"] == 20
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokens.bin", "tokens.json"]


def test_overwrite_replaces_all_three_files_and_leaves_no_staging(trained, tmp_path):
    out = old_output(trained, tmp_path)
    before = snapshot(out)
    new = write_jsonl(tmp_path / "new.jsonl", DOCS[10:30])
    prepare([str(new)], out, vocab_size=300, overwrite=True, progress=False)
    after = snapshot(out)
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokens.bin", "tokens.json"]
    assert all(after[n] != before[n] for n in before)
    f = TokenFile.open(out / "tokens.bin")
    assert f.meta["documents"] == 20
    assert f.meta["tokenizer_file_sha256"] == hashlib.sha256(after["tokenizer.json"]).hexdigest()
    assert tokenizer_of(out).get_vocab_size() == 300


def test_next_prepare_removes_staging_folders_of_dead_prepares_only(trained, tmp_path):
    out = old_output(trained, tmp_path)
    new = write_jsonl(tmp_path / "new.jsonl", DOCS[10:20])
    done = prepare_process(new, "--out", out, "--tokenizer", trained / "tokenizer.json",
                           "--name", "val", crash="staged")
    assert done.returncode == -signal.SIGKILL, done.stderr
    [dead] = out.glob(".prepare-val-*")  # the killed prepare's
    live = out / f".prepare-other-{os.getppid()}"  # a running process: maybe a live prepare
    live.mkdir()
    prepare([str(new)], out, tokenizer=str(trained / "tokenizer.json"), name="val",
            progress=False)
    assert not dead.exists() and live.is_dir()
    assert sorted(os.listdir(out)) == [live.name, "tokenizer.json", "tokens.bin", "tokens.json",
                                       "val.bin", "val.json"]


def test_a_tokenizer_replaced_under_another_token_file_is_refused(trained, tmp_path):
    out = old_output(trained, tmp_path)
    # --overwrite of another name with another tokenizer replaces the shared tokenizer.json.
    prepare([str(write_jsonl(tmp_path / "v.jsonl", DOCS[10:20]))], out, vocab_size=300,
            name="val", overwrite=True, progress=False)
    assert TokenFile.open(out / "val.bin").meta["documents"] == 10
    with pytest.raises(KilnError, match=r"tokenizer\.json' is not the tokenizer .*tokens\.bin' "
                                        r"was made with .*re-run kiln prepare --overwrite"):
        TokenFile.open(out / "tokens.bin")
