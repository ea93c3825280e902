"""Tokenizers by alias or shipped file name: OLMo's GPT-NeoX tokenizer from ai2-olmo-eval."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from kiln.config import config_from_dict
from kiln.data import tokenizers
from kiln.data.tokenizers import resolve_tokenizer
from kiln.errors import KilnError

needs_olmo_eval = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None,
    reason="OLMo's tokenizer files come from `pip install --no-deps ai2-olmo-eval`")


@needs_olmo_eval
def test_olmo_alias_finds_the_tokenizer_with_eos_50279():
    from tokenizers import Tokenizer

    path = resolve_tokenizer("olmo")
    assert path.is_file() and path.name == "allenai_gpt-neox-olmo-dolma-v1_5.json"
    tok = Tokenizer.from_file(str(path))
    assert tok.token_to_id("<|endoftext|>") == 50279
    assert tok.get_vocab_size() == 50280


@needs_olmo_eval
def test_shipped_file_names_and_the_neox_alias():
    from tokenizers import Tokenizer

    name = "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
    path = resolve_tokenizer(name)
    assert path.name == name and resolve_tokenizer(name[:-5]) == path
    assert resolve_tokenizer("gpt-neox-20b") == path
    # This older file keeps GPT-NeoX's <|endoftext|> at id 0; 50279 is |||IP_ADDRESS||| there.
    tok = Tokenizer.from_file(str(path))
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.id_to_token(50279) == "|||IP_ADDRESS|||"


@needs_olmo_eval
def test_lookup_does_not_import_the_package():
    code = ("import sys; from kiln.data.tokenizers import resolve_tokenizer; "
            "resolve_tokenizer('olmo'); print('olmo_eval' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_paths_and_errors(tmp_path, monkeypatch):
    f = tmp_path / "tok.json"
    f.write_text("{}")
    assert resolve_tokenizer(str(f)) == f
    with pytest.raises(KilnError, match="does not exist"):
        resolve_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(KilnError, match="is a folder"):
        resolve_tokenizer(str(tmp_path))
    monkeypatch.setattr(tokenizers, "PACKAGES", ("kiln_no_such_package",))
    for spec in ("olmo", "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"):
        with pytest.raises(KilnError) as e:
            resolve_tokenizer(spec)
        assert "pip install --no-deps ai2-olmo-eval" in str(e.value)
        assert "\n" not in str(e.value)


@needs_olmo_eval
def test_prepare_with_the_olmo_tokenizer_writes_uint16_with_eos_50279(tmp_path):
    from conftest import pydoc_documents
    from tokenizers import Tokenizer

    from kiln.data.prepare import prepare

    docs = pydoc_documents()[:12]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    meta = prepare([str(src)], tmp_path / "out", tokenizer="olmo", progress=False)
    assert meta["dtype"] == "uint16" and meta["eos_token_id"] == 50279
    assert meta["documents"] == len(docs)
    ids = np.fromfile(tmp_path / "out" / "tokens.bin", dtype=np.uint16)
    assert ids.size == meta["tokens"] and int(ids.max()) <= 50279
    ends = np.flatnonzero(ids == 50279)
    assert len(ends) == len(docs) and ends[-1] == ids.size - 1  # one EOS after each document
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    starts = np.concatenate([[0], ends[:-1] + 1])
    for doc, a, b in zip(docs, starts, ends):
        assert tok.decode(ids[a:b].tolist(), skip_special_tokens=False) == doc
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        resolve_tokenizer("olmo").read_bytes()


@needs_olmo_eval
def test_data_tokenizer_accepts_an_alias(tmp_path):
    from kiln.data.build import find_tokenizer

    cfg = config_from_dict({"data": {"tokenizer": "olmo"}})
    assert find_tokenizer(cfg, []) == resolve_tokenizer("olmo")
    cfg = config_from_dict({"data": {"tokenizer": str(tmp_path / "missing.json")}})
    with pytest.raises(KilnError, match="data.tokenizer: .*does not exist"):
        find_tokenizer(cfg, [])
