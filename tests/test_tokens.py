"""Token files: the three on-disk kinds, path resolution, vocab checks and TokenWriter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.data import tokens as tokens_mod
from kiln.data.tokens import (
    FORMAT,
    TokenFile,
    TokenWriter,
    check_vocab,
    open_token_files,
    resolve_paths,
    sidecar_path,
)
from kiln.errors import KilnError

EOS = 0


def write_kiln(path, docs, dtype="uint16", eos=EOS, **kw):
    with TokenWriter(path, eos_token_id=eos, dtype=dtype, **kw) as w:
        for d in docs:
            w.write(d)
    return w.meta


def assert_well_formed(ids: np.ndarray, eos: int = EOS) -> None:
    """EOS after every document, never two in a row, never at the start."""
    is_eos = ids == eos
    assert is_eos[-1], "the last document must end with EOS"
    assert not is_eos[0], "a file must not start with EOS"
    assert not np.any(is_eos[1:] & is_eos[:-1]), "found EOS EOS"


# --------------------------------------------------------------------------------------------
# Raw headerless files (OLMo)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_raw_headerless_file_opens_with_explicit_dtype(tmp_path, dtype):
    ids = np.array([5, 6, EOS, 7, 70000 if dtype == "uint32" else 700, EOS], dtype=dtype)
    path = tmp_path / "part-000.npy"  # OLMo's name, but no NumPy header inside
    ids.astype("<" + np.dtype(dtype).str[1:]).tofile(path)
    f = TokenFile.open(path, dtype=dtype, eos_token_id=EOS)
    assert f.dtype == np.dtype(dtype)
    assert len(f) == 6
    np.testing.assert_array_equal(f.tokens, ids)
    assert f.eos_token_id == EOS
    assert f.max_token_id() == ids.max()
    assert f.meta == {} and f.tokenizer_path is None


def test_raw_file_without_dtype_asks_for_data_dtype(tmp_path):
    path = tmp_path / "part-000.npy"
    np.arange(10, dtype="<u2").tofile(path)
    with pytest.raises(KilnError, match=r"data\.dtype=uint16 or data\.dtype=uint32"):
        TokenFile.open(path)
    with pytest.raises(KilnError, match="uint16 or uint32"):
        TokenFile.open(path, dtype="int8")


def test_raw_file_size_not_a_multiple_of_the_item_size_is_rejected(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03\x00")  # 6 bytes: 3 x uint16, 1.5 x uint32
    assert len(TokenFile.open(path, dtype="uint16")) == 3
    with pytest.raises(KilnError, match="not a multiple of 4"):
        TokenFile.open(path, dtype="uint32")


# --------------------------------------------------------------------------------------------
# Real .npy files


def test_real_npy_is_detected_by_magic_not_extension(tmp_path):
    ids = np.array([3, 4, EOS, 9, EOS], dtype=np.uint32)
    path = tmp_path / "tokens.dat"  # no .npy extension
    with open(path, "wb") as fh:
        np.save(fh, ids)
    # The header wins over a (wrong) dtype meant for raw files.
    f = TokenFile.open(path, dtype="uint16")
    assert f.dtype == np.uint32
    np.testing.assert_array_equal(f.tokens, ids)


def test_npy_must_be_one_dimensional_integers(tmp_path):
    np.save(tmp_path / "two_d.npy", np.zeros((2, 3), dtype=np.uint16))
    np.save(tmp_path / "floats.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(KilnError, match="1-D integer"):
        TokenFile.open(tmp_path / "two_d.npy")
    with pytest.raises(KilnError, match="1-D integer"):
        TokenFile.open(tmp_path / "floats.npy")


def test_tokens_are_a_read_only_memmap(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(1, 9, dtype=np.uint16))
    np.arange(1, 9, dtype="<u2").tofile(tmp_path / "b.bin")
    for f in (TokenFile.open(tmp_path / "a.npy"), TokenFile.open(tmp_path / "b.bin", "uint16")):
        assert isinstance(f.tokens, np.memmap)
        with pytest.raises(ValueError):
            f.tokens[0] = 1


# --------------------------------------------------------------------------------------------
# kiln .bin + sidecar


def test_kiln_bin_reads_dtype_eos_and_tokenizer_from_sidecar(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    meta = write_kiln(tmp_path / "data.bin", [[5, 6, 7], [8, 70000]], dtype="uint32", eos=3,
                      vocab_size=70001, tokenizer="tokenizer.json", sources=["x.txt"])
    assert sidecar_path(tmp_path / "data.bin") == tmp_path / "data.json"
    on_disk = json.loads((tmp_path / "data.json").read_text())
    assert on_disk == meta
    assert meta["format"] == FORMAT and meta["dtype"] == "uint32"
    assert (meta["documents"], meta["tokens"], meta["max_token_id"]) == (2, 7, 70000)

    f = TokenFile.open(tmp_path / "data.bin")  # no dtype needed
    assert f.dtype == np.uint32 and f.eos_token_id == 3
    np.testing.assert_array_equal(f.tokens, [5, 6, 7, 3, 8, 70000, 3])
    assert f.tokenizer_path == tmp_path / "tokenizer.json"
    assert f.max_token_id() == 70000
    # A caller's eos id that disagrees with the sidecar is an error, not a silent pick.
    with pytest.raises(KilnError, match="disagrees"):
        TokenFile.open(tmp_path / "data.bin", eos_token_id=1)


def test_truncated_kiln_bin_is_caught_by_the_sidecar_token_count(tmp_path):
    write_kiln(tmp_path / "data.bin", [[5, 6, 7], [8, 9]])
    data = (tmp_path / "data.bin").read_bytes()
    (tmp_path / "data.bin").write_bytes(data[:-2])
    with pytest.raises(KilnError, match="sidecar says 7"):
        TokenFile.open(tmp_path / "data.bin")


def test_max_token_id_scans_in_chunks_and_caches(tmp_path, monkeypatch):
    ids = np.random.default_rng(0).integers(1, 1000, size=10_001).astype("<u2")
    ids[7777] = 4242
    ids.tofile(tmp_path / "raw.bin")
    monkeypatch.setattr(tokens_mod, "_SCAN_CHUNK", 1000)
    f = TokenFile.open(tmp_path / "raw.bin", dtype="uint16")
    assert f.max_token_id() == 4242
    monkeypatch.setattr(tokens_mod, "_SCAN_CHUNK", 1)  # would be slow if it scanned again
    assert f.max_token_id() == 4242


# --------------------------------------------------------------------------------------------
# resolve_paths / open_token_files


def test_resolve_paths_expands_directories_and_globs_sorted_and_deduplicated(tmp_path):
    write_kiln(tmp_path / "b.bin", [[1, 2]])
    np.save(tmp_path / "a.npy", np.array([1, EOS], dtype=np.uint16))
    np.array([1, 2], dtype="<u2").tofile(tmp_path / "raw.bin")  # .bin without sidecar
    (tmp_path / "notes.txt").write_text("not tokens")

    in_dir = resolve_paths([str(tmp_path)])
    assert in_dir == [tmp_path / "a.npy", tmp_path / "b.bin"]
    # Globs keep raw .bin files (OLMo) but never the JSON sidecars.
    globbed = resolve_paths([str(tmp_path / "*.bin"), str(tmp_path / "b.*"), str(tmp_path)])
    assert globbed == [tmp_path / "a.npy", tmp_path / "b.bin", tmp_path / "raw.bin"]

    files = open_token_files([str(tmp_path / "*.npy"), str(tmp_path / "b.bin")])
    assert [f.path.name for f in files] == ["a.npy", "b.bin"]


def test_resolve_paths_errors_name_the_bad_path(tmp_path):
    with pytest.raises(KilnError, match=r"data path '.*missing\.bin' matches no files"):
        resolve_paths([str(tmp_path / "missing.bin")])
    with pytest.raises(KilnError, match=r"data path '.*\*\.npy' matches no files"):
        resolve_paths([str(tmp_path / "*.npy")])
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(KilnError, match=r"empty\.npy' is empty"):
        resolve_paths([str(tmp_path / "empty.npy")])
    with pytest.raises(KilnError, match="is empty"):
        TokenFile.open(tmp_path / "empty.npy", dtype="uint16")
    with pytest.raises(KilnError, match="does not exist"):
        TokenFile.open(tmp_path / "missing.bin", dtype="uint16")


# --------------------------------------------------------------------------------------------
# check_vocab


def test_check_vocab_rejects_an_id_at_or_above_the_vocab_size(tmp_path):
    np.array([1, 5000, EOS], dtype="<u2").tofile(tmp_path / "raw.bin")
    f = TokenFile.open(tmp_path / "raw.bin", dtype="uint16")
    check_vocab([f], 5001)
    with pytest.raises(KilnError, match="holds id 5000 but model.vocab_size is 4096"):
        check_vocab([f], 4096)


def test_check_vocab_rejects_uint16_files_for_vocabularies_over_65536(tmp_path):
    np.array([1, 2, EOS], dtype="<u2").tofile(tmp_path / "raw.bin")
    f = TokenFile.open(tmp_path / "raw.bin", dtype="uint16")
    check_vocab([f], 65536)  # ids 0..65535 all fit in uint16
    with pytest.raises(KilnError, match="uint16 cannot hold ids of a vocabulary of 100278.*"
                                        "data.dtype=uint32"):
        check_vocab([f], 100278)


# --------------------------------------------------------------------------------------------
# TokenWriter


def test_writer_adds_exactly_one_eos_and_never_doubles_it(tmp_path):
    docs = [
        [5, 6],
        [EOS, 7, 8, EOS],  # a tokenizer put EOS at both ends
        [9, EOS, EOS],  # ... or two at the end
        [],  # empty: skipped
        [EOS, EOS],  # only EOS: empty after stripping, skipped
        [10, EOS, EOS, 11],  # EOS inside ends a document there
    ]
    meta = write_kiln(tmp_path / "t.bin", docs)
    ids = TokenFile.open(tmp_path / "t.bin").tokens
    np.testing.assert_array_equal(ids, [5, 6, EOS, 7, 8, EOS, 9, EOS, 10, EOS, 11, EOS])
    assert_well_formed(np.asarray(ids))
    assert meta["documents"] == int(np.count_nonzero(np.asarray(ids) == EOS)) == 5


def test_writer_is_atomic_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="crash"), TokenWriter(tmp_path / "t.bin",
                                                                 eos_token_id=EOS) as w:
        w.write([1, 2, 3])
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_replace_existing_output_without_overwrite(tmp_path):
    write_kiln(tmp_path / "t.bin", [[1, 2]])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KilnError, match="exists; pass --overwrite"):
        TokenWriter(tmp_path / "t.bin", eos_token_id=EOS)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    write_kiln(tmp_path / "t.bin", [[3, 4, 5]], overwrite=True)
    np.testing.assert_array_equal(TokenFile.open(tmp_path / "t.bin").tokens, [3, 4, 5, EOS])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.json"]


def test_writer_rejects_ids_that_do_not_fit_its_dtype(tmp_path):
    with pytest.raises(KilnError, match="70000 does not fit in uint16"):
        write_kiln(tmp_path / "t.bin", [[1, 70000]])
    assert list(tmp_path.iterdir()) == []


def test_writer_with_no_documents_writes_nothing(tmp_path):
    with pytest.raises(KilnError, match="no documents"):
        write_kiln(tmp_path / "t.bin", [[], [EOS]])
    assert list(tmp_path.iterdir()) == []
