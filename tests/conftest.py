"""Shared fixtures: small corpora of real English text made from files Python ships."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def pydoc_documents() -> list[str]:
    """~80 real English documents: the topics of Python's own documentation."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def pydoc_corpus(tmp_path_factory) -> Path:
    """A JSONL corpus of Python's documentation topics."""
    root = tmp_path_factory.mktemp("corpus")
    path = root / "pydoc.jsonl"
    with open(path, "w") as f:
        for text in pydoc_documents():
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def pydoc_tokens(tmp_path_factory, pydoc_corpus) -> Path:
    """Token files (vocab 512 byte-level BPE) of the pydoc corpus: OUT/tokens.bin + sidecar."""
    from kiln.data.prepare import prepare

    out = tmp_path_factory.mktemp("tokens")
    prepare([str(pydoc_corpus)], out, vocab_size=512, progress=False)
    return out / "tokens.bin"
