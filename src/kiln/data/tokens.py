"""Token files on disk: opening, checking and writing flat arrays of token ids.

A token file is a flat array of ids (uint16 when the vocabulary fits, else uint32) in which
documents are separated by exactly one EOS id: EOS after every document, never two in a row.
Three kinds are read:

* kiln's own ``NAME.bin`` (headerless little-endian) with a JSON sidecar ``NAME.json`` that
  records the dtype, EOS id, tokenizer and counts (written by :class:`TokenWriter`);
* NumPy ``.npy`` files (1-D integer arrays), recognised by their magic bytes;
* OLMo's raw headerless files (any name, often ``.npy`` without a NumPy header), whose dtype
  the caller must give, since nothing in the file records it.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.files import file_digest

FORMAT = "kiln-tokens/1"
"""The ``format`` field of the sidecars this module writes and reads."""

_NPY_MAGIC = b"\x93NUMPY"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_SCAN_CHUNK = 1 << 24
"""Tokens per chunk when scanning a file for its largest id (64 MiB of uint32 at most)."""
_FLUSH_TOKENS = 1 << 20
"""Tokens TokenWriter buffers in memory before writing them out."""
INCOMPLETE = "incomplete"
"""Sidecar key that marks its files as being replaced (see kiln.data.prepare): never read."""


def sidecar_path(bin_path: str | Path) -> Path:
    """``NAME.bin`` -> ``NAME.json``: where a token file's metadata lives."""
    return Path(bin_path).with_suffix(".json")


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest dtype name that holds every id of a vocabulary of ``vocab_size``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _parse_dtype(dtype: str | np.dtype | None, where: str = "data.dtype") -> np.dtype | None:
    if dtype is None:
        return None
    name = np.dtype(dtype).name if isinstance(dtype, np.dtype) else str(dtype)
    if name not in _DTYPES:
        raise KilnError(f"{where} must be uint16 or uint32, got {name!r}")
    return _DTYPES[name]


def _read_sidecar(path: Path) -> dict[str, Any]:
    """The kiln sidecar beside ``path``, or {} when there is none.

    A JSON file of the same name that is not a kiln sidecar (no ``kiln-tokens/`` format) is
    ignored rather than rejected: raw OLMo folders can hold unrelated JSON.
    """
    sc = sidecar_path(path)
    if sc == path or not sc.is_file():
        return {}
    try:
        meta = json.loads(sc.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KilnError(
            f"sidecar '{sc}' is not valid JSON; re-run kiln prepare to rewrite it"
        ) from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("kiln-tokens/"):
        return {}
    if fmt != FORMAT:
        raise KilnError(
            f"sidecar '{sc}' has format {fmt!r} but this kiln reads {FORMAT!r}; "
            "upgrade kiln or re-run kiln prepare"
        )
    if meta.get(INCOMPLETE):
        raise KilnError(f"'{sc}' marks a kiln prepare that stopped while replacing '{path}'; "
                        "re-run kiln prepare --overwrite")
    return meta


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (cached while its inode, size and mtime stay the same)."""
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    return file_digest(path, "sha256")


class TokenFile:
    """One token file, memory-mapped read-only."""

    path: Path
    dtype: np.dtype
    eos_token_id: int | None
    meta: dict[str, Any]

    def __init__(
        self, path: Path, tokens: np.ndarray, eos_token_id: int | None, meta: dict[str, Any]
    ) -> None:
        self.path = path
        self._tokens = tokens
        self.dtype = tokens.dtype
        self.eos_token_id = eos_token_id
        self.meta = meta
        self._max_id: int | None = None
        self._range: tuple[int, int] | None = None

    @classmethod
    def open(
        cls, path: str | Path, dtype: str | None = None, eos_token_id: int | None = None
    ) -> TokenFile:
        """Open a kiln .bin (sidecar), a real .npy, or a raw headerless file (needs ``dtype``).

        ``dtype`` only matters for raw files: a sidecar or a NumPy header says what it is.
        """
        p = Path(path)
        if not p.is_file():
            raise KilnError(f"token file '{p}' does not exist; check data.paths")
        if p.suffix == ".json":
            raise KilnError(f"'{p}' is a JSON file, not token data; name the .bin file beside it")
        size = p.stat().st_size
        if size == 0:
            raise KilnError(f"token file '{p}' is empty; remove it from data.paths or re-run "
                            "kiln prepare")
        meta = _read_sidecar(p)
        with open(p, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))

        if magic == _NPY_MAGIC:
            # A real .npy: its header is the authority on dtype and shape.
            try:
                tokens = np.load(p, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise KilnError(f"token file '{p}' has a NumPy header but cannot be read ({e}); "
                                "re-create it") from None
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise KilnError(
                    f"token file '{p}' holds a {tokens.ndim}-D {tokens.dtype} array; token files "
                    "must be 1-D integer arrays of ids (convert it with numpy: "
                    "arr.astype('uint32'), or re-run kiln prepare)"
                )
            if tokens.shape[0] == 0:
                raise KilnError(f"token file '{p}' holds no tokens; remove it from data.paths")
            if tokens.dtype.kind == "i":  # signed: usable only if provably free of negatives
                f = cls(p, tokens, None, meta)
                lo, _ = f.id_range()
                if lo < 0:
                    pos = f.first_negative()
                    raise KilnError(
                        f"token file '{p}' is a signed {tokens.dtype} array holding negative id "
                        f"{lo} (first at position {pos:,}); token ids are never negative: "
                        "re-create the file from its source text with kiln prepare"
                    )
        else:
            if meta:
                dt = _parse_dtype(meta.get("dtype"), where=f"'dtype' in {sidecar_path(p)}")
            else:
                dt = _parse_dtype(dtype)
            if dt is None:
                raise KilnError(
                    f"token file '{p}' has no NumPy header and no kiln sidecar, so its element "
                    "type is unknown; set data.dtype=uint16 or data.dtype=uint32"
                )
            if size % dt.itemsize:
                raise KilnError(
                    f"token file '{p}' is {size} bytes, not a multiple of {dt.itemsize} "
                    f"({dt.name}); the file is truncated or data.dtype is wrong"
                )
            tokens = np.memmap(p, dtype=dt, mode="r", shape=(size // dt.itemsize,))

        if meta and "tokens" in meta and int(meta["tokens"]) != tokens.shape[0]:
            raise KilnError(
                f"token file '{p}' holds {tokens.shape[0]} tokens but its sidecar says "
                f"{meta['tokens']}; the file was truncated or replaced, re-run kiln prepare "
                "--overwrite"
            )
        tok_path = p.parent / meta["tokenizer"] if meta.get("tokenizer") else None
        want = meta.get("tokenizer_file_sha256")
        if want and tok_path is not None and tok_path.is_file() and file_sha256(tok_path) != want:
            raise KilnError(
                f"'{tok_path}' is not the tokenizer '{p}' was made with (its sha256 differs "
                f"from the one in {sidecar_path(p)}); re-run kiln prepare --overwrite"
            )
        eos = meta.get("eos_token_id") if meta else None
        if eos is not None and eos_token_id is not None and int(eos) != int(eos_token_id):
            raise KilnError(
                f"data.eos_token_id={eos_token_id} disagrees with {sidecar_path(p)} (eos "
                f"{eos}); drop data.eos_token_id to use the sidecar's"
            )
        eos = eos if eos is not None else eos_token_id
        return cls(p, tokens, None if eos is None else int(eos), meta)

    @property
    def tokens(self) -> np.ndarray:
        """All ids as a 1-D read-only memmap."""
        return self._tokens

    def __len__(self) -> int:
        return int(self._tokens.shape[0])

    def max_token_id(self) -> int:
        """The largest id in the file: from the sidecar, else one chunked scan (cached).

        Quick, for refusing a mismatched vocabulary at start; the sidecar is not trusted for
        safety: the loader checks the ids of every batch (see WindowDataset.batch)."""
        if self._max_id is None:
            if "max_token_id" in self.meta:
                self._max_id = int(self.meta["max_token_id"])
            else:
                self._max_id = self.id_range()[1]
        return self._max_id

    def id_range(self) -> tuple[int, int]:
        """(smallest, largest) id actually in the file: one chunked scan, sidecar ignored."""
        if self._range is None:
            lo, hi = None, None
            for start in range(0, len(self), _SCAN_CHUNK):  # a many-GB file never sits in RAM
                chunk = self._tokens[start : start + _SCAN_CHUNK]
                c_lo, c_hi = int(chunk.min()), int(chunk.max())
                lo = c_lo if lo is None else min(lo, c_lo)
                hi = c_hi if hi is None else max(hi, c_hi)
            self._range = (int(lo), int(hi))  # type: ignore[arg-type]
        return self._range

    def first_negative(self) -> int | None:
        """Position of the first negative id (a signed file), or None."""
        for start in range(0, len(self), _SCAN_CHUNK):
            bad = self._tokens[start : start + _SCAN_CHUNK] < 0
            if bad.any():
                return start + int(np.argmax(bad))
        return None

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer.json named by the sidecar (relative to the sidecar's folder)."""
        name = self.meta.get("tokenizer")
        return self.path.parent / name if name else None

    def __repr__(self) -> str:
        return f"TokenFile('{self.path}', {self.dtype.name}, {len(self):,} tokens)"


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _token_files_in(folder: Path) -> list[Path]:
    """Token files directly inside ``folder``: .bin files with a sidecar, and .npy files."""
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        if p.suffix == ".npy" or (p.suffix == ".bin" and sidecar_path(p).is_file()):
            out.append(p)
    return out


def fingerprint(path: Path, edge: int = 2**20) -> dict[str, Any]:
    """What identifies a token file's contents cheaply: its name, size, a hash of its first
    and last MiB, and a hash of its sidecar when it has one (saved with each checkpoint, so a
    resume on changed data is noticed)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            h.update(f.read(edge))
    side = sidecar_path(path)
    return {"file": path.name, "bytes": size, "edges_sha256": h.hexdigest()[:16],
            "sidecar_sha256": (hashlib.sha256(side.read_bytes()).hexdigest()[:16]
                               if side.is_file() else None)}


def fingerprint_change(saved: list[dict], paths: Sequence[Path]) -> str | None:
    """How `paths` differ from a saved fingerprint (None: they match)."""
    now = [fingerprint(p) for p in paths]
    if len(now) != len(saved):
        return f"{len(saved)} file(s) then, {len(now)} now"
    for p, a, b in zip(paths, saved, now):
        if a.get("bytes") != b["bytes"]:
            return f"{p} is {b['bytes']:,} bytes, it was {a.get('bytes', 0):,}"
        if a.get("edges_sha256") != b["edges_sha256"]:
            return f"{p} holds other tokens (its first or last MiB changed)"
        if a.get("sidecar_sha256") != b["sidecar_sha256"]:
            return f"{sidecar_path(p)} changed"
    return None


def resolve_paths(patterns: Sequence[str | Path] | str | Path) -> list[Path]:
    """Expand globs and directories into a sorted, de-duplicated list of token files."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    found: dict[Path, None] = {}
    for pattern in patterns:
        text = os.path.expanduser(str(pattern))
        if _is_glob(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            files: list[Path] = []
            for m in matches:
                if m.is_dir():
                    files.extend(_token_files_in(m))
                elif m.suffix != ".json":  # sidecars and tokenizers are never token data
                    files.append(m)
        elif Path(text).is_dir():
            files = _token_files_in(Path(text))
        elif Path(text).is_file():
            files = [Path(text)]
        else:
            files = []
        if not files:
            raise KilnError(f"data path '{pattern}' matches no files; check data.paths")
        for f in files:
            f = f.resolve()
            if f.stat().st_size == 0:
                raise KilnError(f"token file '{f}' is empty; remove it from data.paths or "
                                "re-run kiln prepare")
            found[f] = None
    return sorted(found)


def open_token_files(
    patterns: Sequence[str | Path] | str | Path,
    dtype: str | None = None,
    eos_token_id: int | None = None,
) -> list[TokenFile]:
    """Resolve ``patterns`` and open every token file they name."""
    return [TokenFile.open(p, dtype=dtype, eos_token_id=eos_token_id)
            for p in resolve_paths(patterns)]


def check_vocab(files: Iterable[TokenFile], vocab_size: int) -> None:
    """Raise KilnError when a file cannot belong to a model with ``vocab_size`` ids."""
    for f in files:
        if f.dtype.itemsize == 2 and vocab_size > 1 << 16:
            # uint16 holds ids 0..65535, i.e. a vocabulary of at most 65536; a larger one
            # means ids were wrapped when the file was written.
            raise KilnError(
                f"token file '{f.path}' is uint16, and uint16 cannot hold ids of a vocabulary "
                f"of {vocab_size}; re-run kiln prepare (it writes uint32) or set "
                "data.dtype=uint32 for raw files"
            )
        m = f.max_token_id()
        if m >= vocab_size:
            raise KilnError(
                f"token file '{f.path}' holds id {m} but model.vocab_size is {vocab_size}; "
                f"set model.vocab_size to at least {m + 1} (the tokenizer's vocabulary) or "
                "prepare the data with the model's tokenizer"
            )


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the token frequency distribution: the loss of a model that knows
    only how often each token occurs, the baseline any trained model must beat."""
    c = counts[counts > 0].astype(np.float64)
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


class TokenWriter:
    """Streams documents into ``NAME.bin`` + ``NAME.json``, atomically.

    Each non-empty document gets exactly one EOS after it. EOS ids a tokenizer put at a
    document's ends are stripped, and an EOS inside a document ends a document there (the
    stored data could not tell the two apart anyway), so the output never holds two EOS in a
    row and ``documents`` always equals the number of EOS ids. Data goes to a hidden temp file
    in the target folder, renamed into place by :meth:`close`; on error (or :meth:`abort`)
    the temp files are removed and nothing appears under the final names.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        eos_token_id: int,
        dtype: str = "uint16",
        vocab_size: int | None = None,
        tokenizer: str | None = None,
        tokenizer_sha256: str | None = None,
        tokenizer_file_sha256: str | None = None,
        sources: Sequence[str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.sidecar = sidecar_path(self.path)
        if self.path.suffix != ".bin":
            raise KilnError(f"token output '{self.path}' must end in .bin")
        dt = _parse_dtype(dtype, where="dtype")
        assert dt is not None
        self.dtype: np.dtype = dt
        if not 0 <= int(eos_token_id) <= np.iinfo(dt).max:
            raise KilnError(f"eos_token_id {eos_token_id} does not fit in {dt.name}")
        self.eos_token_id = int(eos_token_id)
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.tokenizer_sha256 = tokenizer_sha256
        self.tokenizer_file_sha256 = tokenizer_file_sha256
        self.sources: list[str] = list(sources or [])
        self.overwrite = overwrite
        self.documents = 0
        self.tokens = 0
        self.max_token_id = -1
        self._counts = np.zeros(0, dtype=np.int64)  # unigram counts, for the entropy baseline
        self.meta: dict[str, Any] | None = None
        self._check_free()

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                   suffix=".tmp")
        self._tmp: Path | None = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._buf: list[np.ndarray] = []
        self._buf_tokens = 0

    def _check_free(self) -> None:
        if self.overwrite:
            return
        for p in (self.path, self.sidecar):
            if p.exists():
                raise KilnError(f"output '{p}' exists; pass --overwrite or choose another --out")

    def write(self, ids: Sequence[int] | np.ndarray) -> int:
        """Append one document; returns how many documents were added (0 if it was empty)."""
        if self._tmp is None:
            raise RuntimeError("TokenWriter is closed")
        arr = np.asarray(ids)
        if arr.size == 0:
            return 0
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TypeError(f"a document must be a 1-D sequence of integer ids, got {arr.dtype} "
                            f"with shape {arr.shape}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > np.iinfo(self.dtype).max:
            bad = lo if lo < 0 else hi
            raise KilnError(f"token id {bad} does not fit in {self.dtype.name}; write uint32 "
                            "(the tokenizer's vocabulary is larger than this file's dtype)")
        eos = self.eos_token_id
        is_eos = arr == eos
        # Keep every non-EOS id and the first EOS of each run that follows an id; leading
        # EOS ids are dropped (the previous document already ended with one).
        keep = ~is_eos
        keep[1:] |= is_eos[1:] & ~is_eos[:-1]
        out = arr[keep]
        if out.size == 0:
            return 0
        if out[-1] != eos:
            out = np.append(out, eos)
        out = out.astype(self.dtype)
        added = int(np.count_nonzero(out == eos))
        self.documents += added
        self.tokens += int(out.size)
        self.max_token_id = max(self.max_token_id, int(out.max()))
        counts = np.bincount(out, minlength=len(self._counts))
        counts[: len(self._counts)] += self._counts
        self._counts = counts
        self._buf.append(out)
        self._buf_tokens += out.size
        if self._buf_tokens >= _FLUSH_TOKENS:
            self._flush()
        return added

    def _flush(self) -> None:
        if self._buf:
            self._file.write(np.concatenate(self._buf).tobytes())
            self._buf.clear()
            self._buf_tokens = 0

    def _build_meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "eos_token_id": self.eos_token_id,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer,
            "tokenizer_sha256": self.tokenizer_sha256,
            "tokenizer_file_sha256": self.tokenizer_file_sha256,
            "documents": self.documents,
            "tokens": self.tokens,
            "max_token_id": self.max_token_id,
            "unigram_entropy": unigram_entropy(self._counts),
            "sources": self.sources,
        }

    def close(self) -> dict[str, Any]:
        """Finish the file and move it and its sidecar into place; returns the sidecar."""
        if self.meta is not None:
            return self.meta
        if self._tmp is None:
            raise RuntimeError("TokenWriter was aborted")
        if self.documents == 0:
            self.abort()
            raise KilnError(f"no documents were written to '{self.path}'; the input held no "
                            "non-empty text")
        tmp_json: Path | None = None
        try:
            self._flush()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            meta = self._build_meta()
            fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.sidecar.name}.",
                                        suffix=".tmp")
            tmp_json = Path(name)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(meta, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._check_free()  # something may have appeared while we were writing
            # The sidecar goes last, so its presence marks a complete pair; an old sidecar is
            # removed first so it never sits beside the new data (open() would catch that
            # through the token count, but only when the counts differ).
            if self.sidecar.exists():
                self.sidecar.unlink()
            os.replace(self._tmp, self.path)
            self._tmp = None
            os.replace(tmp_json, self.sidecar)
            tmp_json = None
        except BaseException:
            if tmp_json is not None:
                tmp_json.unlink(missing_ok=True)
            self.abort()
            raise
        self.meta = meta
        return meta

    def abort(self) -> None:
        """Drop everything written so far; the final names are left untouched."""
        if not self._file.closed:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        self._buf.clear()

    def __enter__(self) -> TokenWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without close() must not leave its temp file behind.
        try:
            if getattr(self, "_tmp", None) is not None:
                self.abort()
        except Exception:  # noqa: BLE001, S110 - never raise from a finalizer
            pass
