"""``kiln prepare``: turn text corpora into a kiln token file.

Reads .txt/.md (one document per file), .jsonl/.jsonl.gz/.json.gz (one JSON object per line)
and .parquet (a text column), all streamed, never holding the corpus in memory. Documents
are tokenized with a given HF ``tokenizers`` tokenizer.json, or with a byte-level BPE trained
here on the same documents, and written as ``OUT/NAME.bin`` + ``OUT/NAME.json`` with a copy of
the tokenizer at ``OUT/tokenizer.json``, so the output folder is self-contained.

Document boundaries come from the input format alone: text that happens to spell an
end-of-text token (``"<|endoftext|>"`` in a document about tokenizers, say) is tokenized as
ordinary text, so it never becomes an EOS id, never splits a document, and decodes back to
itself.

Replacing outputs: everything is written and fsynced into a hidden staging folder
``OUT/.prepare-NAME-PID/`` first; a kill or error before the swap leaves OUT as it was. The swap
is four renames: a marker sidecar over ``NAME.json`` (readers refuse it), then tokenizer.json,
then ``NAME.bin``, then the real sidecar, which names the sha256 of the tokenizer it belongs to.
So a reader sees the old set, the new set, or a one-line refusal; never a mismatched mix.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import gzip
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kiln.data.tokens import (
    FORMAT,
    INCOMPLETE,
    TokenWriter,
    dtype_for_vocab,
    sidecar_path,
)
from kiln.errors import KilnError, warn
from kiln.files import check_writable, fsync_dir, write_synced

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
"""End-of-text tokens looked up in a tokenizer's vocabulary, first match wins."""
SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]
"""Special tokens of a tokenizer trained here (ids 0 and 1)."""
MAX_TRAINED_VOCAB = 2**24
"""The largest --vocab-size kiln trains: the BPE trainer reserves memory for every entry up
front (about 66 bytes each), and ids stay far inside uint32 token files."""
_EXTENSIONS = (".jsonl.gz", ".json.gz", ".jsonl", ".parquet", ".txt", ".md")
_TOKENIZER_FILE = "tokenizer.json"


# --------------------------------------------------------------------------------------------
# Finding and reading inputs


def _kind(path: Path) -> str | None:
    """The reader for ``path`` (one of _EXTENSIONS), or None when kiln cannot read it."""
    name = path.name.lower()
    return next((ext for ext in _EXTENSIONS if name.endswith(ext)), None)


def find_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand files, directories (recursively) and globs, keeping the order given."""
    if not inputs:
        raise KilnError("no inputs given; name text files, directories or globs to prepare")
    found: dict[Path, None] = {}
    for item in inputs:
        text = os.path.expanduser(str(item))
        if any(c in text for c in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise KilnError(f"input '{item}' matches no files; check the pattern")
            files = [f for m in map(Path, matches) for f in _readable_in(m)]
        elif Path(text).is_dir():
            files = _readable_in(Path(text))
        elif Path(text).is_file():
            files = [Path(text)]
            if _kind(files[0]) is None:
                raise KilnError(
                    f"input '{item}' has an unknown extension; kiln prepare reads "
                    f"{', '.join(_EXTENSIONS)}"
                )
        else:
            raise KilnError(f"input '{item}' does not exist; check the path")
        if not files:
            raise KilnError(
                f"input '{item}' holds no readable files ({', '.join(_EXTENSIONS)})"
            )
        for f in files:
            found.setdefault(f.resolve(), None)
    return list(found)


def _readable_in(path: Path) -> list[Path]:
    """``path`` itself when it is a readable file; its readable files, recursively, if a dir."""
    if path.is_file():
        return [path] if _kind(path) else []
    return sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))


def _read_text(path: Path) -> Iterator[tuple[str | None, int]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KilnError(f"'{path}' is not UTF-8 text (bad byte at offset {e.start}); "
                        "convert it to UTF-8") from None
    yield text, len(data)


def _read_json_lines(path: Path, field: str, gz: bool) -> Iterator[tuple[str | None, int]]:
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        pos = 0
        lineno = 0
        try:
            for lineno, line in enumerate(stream, 1):
                if gz:  # progress counts bytes on disk, i.e. compressed ones
                    now = raw.tell()
                    nbytes, pos = now - pos, now
                else:
                    nbytes = len(line)
                if not line.strip():
                    yield None, nbytes
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    msg = getattr(e, "msg", None) or "not UTF-8"
                    raise KilnError(f"{path}:{lineno} is not valid JSON ({msg}); each line "
                                    "must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise KilnError(f"{path}:{lineno} is a JSON {type(obj).__name__}, not an "
                                    "object; each line must be one JSON object")
                text = obj.get(field)
                if not isinstance(text, str):
                    what = "missing" if field not in obj else f"a {type(text).__name__}"
                    keys = ", ".join(map(str, list(obj)[:10])) or "none"
                    raise KilnError(
                        f"{path}:{lineno} has no string field '{field}' (it is {what}; keys: "
                        f"{keys}); set --text-field to the field that holds the text"
                    )
                yield text, nbytes
        except (gzip.BadGzipFile, EOFError, OSError) as e:
            if not gz:
                raise
            raise KilnError(f"'{path}' is not a readable gzip file near line {lineno + 1} "
                            f"({e}); re-compress or re-download it") from None


def _read_parquet(path: Path, field: str, rows: int) -> Iterator[tuple[str | None, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise KilnError(f"'{path}' is not a readable Parquet file ({e})") from None
    with contextlib.closing(pf):
        schema = pf.schema_arrow
        if field not in schema.names:
            raise KilnError(f"'{path}' has no column '{field}' (columns: "
                            f"{', '.join(schema.names)}); set --text-field to the text column")
        tp = schema.field(field).type
        string_types = [pa.types.is_string, pa.types.is_large_string]
        if hasattr(pa.types, "is_string_view"):
            string_types.append(pa.types.is_string_view)
        if not any(is_type(tp) for is_type in string_types):
            raise KilnError(f"column '{field}' of '{path}' holds {tp}, not strings; set "
                            "--text-field to the text column")
        # Parquet pages are compressed, so bytes read are apportioned by rows.
        size, total, done, reported = path.stat().st_size, max(pf.metadata.num_rows, 1), 0, 0
        for batch in pf.iter_batches(batch_size=rows, columns=[field]):
            for text in batch.column(0).to_pylist():
                done += 1
                if text is None:
                    raise KilnError(f"'{path}' row {done} has a null '{field}'; drop null rows "
                                    "or set --text-field to another column")
                now = size * done // total
                yield text, now - reported
                reported = now


class _Corpus:
    """The documents of a list of input files, read again on each call of :meth:`documents`."""

    def __init__(self, files: list[Path], text_field: str, batch_size: int) -> None:
        self.files = files
        self.text_field = text_field
        self.batch_size = batch_size
        self.total_bytes = sum(f.stat().st_size for f in files)

    def _records(self, path: Path) -> Iterator[tuple[str | None, int]]:
        kind = _kind(path)
        if kind in (".txt", ".md"):
            return _read_text(path)
        if kind == ".parquet":
            return _read_parquet(path, self.text_field, self.batch_size)
        return _read_json_lines(path, self.text_field, gz=kind in (".jsonl.gz", ".json.gz"))

    def documents(self, meter: _Meter) -> Iterator[str]:
        """Every non-blank document; empty ones are skipped so they can never yield EOS EOS."""
        for path in self.files:
            for text, nbytes in self._records(path):
                keep = text is not None and bool(text.strip())
                meter.add(1 if keep else 0, nbytes)
                meter.skipped += 0 if keep else 1
                if keep:
                    yield text  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Progress


class _Meter:
    """Counts documents and bytes; forwards them to a rich progress bar now and then."""

    def __init__(self, update: Callable[[int, int], None] | None = None) -> None:
        self.docs = 0
        self.bytes = 0
        self.skipped = 0  # empty or blank records
        self._update = update
        self._pending_bytes = 0
        self._pending_docs = 0

    def add(self, docs: int, nbytes: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        if self._update is not None:
            self._pending_docs += docs
            self._pending_bytes += nbytes
            if self._pending_docs >= 256 or self._pending_bytes >= 1 << 22:
                self.flush()

    def flush(self) -> None:
        if self._update is not None and (self._pending_docs or self._pending_bytes):
            self._update(self._pending_docs, self._pending_bytes)
            self._pending_docs = self._pending_bytes = 0


@contextlib.contextmanager
def _progress(enabled: bool, total_bytes: int) -> Iterator[Callable[[str], _Meter]]:
    """Yields ``start(description) -> _Meter``; one rich task per pass over the corpus."""
    if not enabled:
        yield lambda description: _Meter()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    class DocsColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            docs = task.fields.get("docs", 0)
            rate = docs / task.elapsed if task.elapsed else 0.0
            return Text(f"{docs:,} docs ({rate:,.0f}/s)")

    columns = (TextColumn("{task.description}"), BarColumn(), DocsColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        meters: list[_Meter] = []

        def start(description: str) -> _Meter:
            task = bar.add_task(description, total=total_bytes, docs=0)
            counts = {"docs": 0}

            def update(docs: int, nbytes: int) -> None:
                counts["docs"] += docs
                bar.update(task, advance=nbytes, docs=counts["docs"])

            meters.append(_Meter(update))
            return meters[-1]

        yield start
        for m in meters:
            m.flush()


@contextlib.contextmanager
def _tokenizers_parallel() -> Iterator[None]:
    """Make sure tokenizers uses every core: callers (or a DataLoader fork) may have set
    TOKENIZERS_PARALLELISM=false, which would make encoding single-threaded."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


# --------------------------------------------------------------------------------------------
# Tokenizers


def _load_tokenizer(path: str | Path) -> Any:
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise KilnError(f"tokenizer '{p}' does not exist; pass the path of a tokenizer.json")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
        raise KilnError(f"'{p}' is not a HF tokenizers tokenizer.json ({e}); pass a "
                        "tokenizer.json, not a vocab or sentencepiece model") from None


def _train_tokenizer(documents: Iterator[str], vocab_size: int) -> Any:
    """A byte-level BPE (lossless: any text round-trips) trained on ``documents``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # No prefix space: the tokenizer must not change the text, so decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # kiln's own bar shows progress
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def find_eos(tokenizer: Any) -> tuple[str, int] | None:
    """The first of EOS_CANDIDATES in the tokenizer's vocabulary, as (token, id)."""
    for token in EOS_CANDIDATES:
        i = tokenizer.token_to_id(token)
        if i is not None:
            return token, int(i)
    return None


# --------------------------------------------------------------------------------------------
# Staging and the swap (see the module docstring)

_STAGING = ".prepare-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_staging(out: Path) -> None:
    """Remove the staging folders of prepares that were killed (their pid no longer runs on
    this host; a running prepare's is kept), saying so in one warning line."""
    removed = []
    for d in sorted(out.glob(f"{_STAGING}*")):
        pid = d.name.rpartition("-")[2]
        if d.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d.name)
    if removed:
        warn(f"removed {len(removed)} staging folder{'s' if len(removed) > 1 else ''} of "
             f"killed kiln prepare runs from {out}: {', '.join(removed)}")


def _crash_point(point: str) -> None:
    """KILN_PREPARE_CRASH=POINT kills this process (SIGKILL) at that point: a drill for tests."""
    if os.environ.get("KILN_PREPARE_CRASH") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _refuse_existing(bin_path: Path, tok_path: Path, tok_bytes: bytes) -> None:
    """Without --overwrite: refuse outputs that exist (the tokenizer only if it differs)."""
    for p in (bin_path, sidecar_path(bin_path)):
        if p.exists():
            raise KilnError(f"output '{p}' exists; pass --overwrite or choose another --out")
    if tok_path.exists() and tok_path.read_bytes() != tok_bytes:
        raise KilnError(f"'{tok_path}' exists and holds a different tokenizer; pass "
                        "--overwrite or choose another --out")


def _swap_in(stage: Path, bin_path: Path, tok_path: Path) -> None:
    """Move the staged files into place: marker sidecar, tokenizer, data, real sidecar."""
    sidecar = sidecar_path(bin_path)
    os.replace(stage / INCOMPLETE, sidecar)
    _crash_point("marked")
    if (stage / tok_path.name).exists():  # absent when OUT already holds the same tokenizer
        os.replace(stage / tok_path.name, tok_path)
    _crash_point("tokenizer")
    os.replace(stage / bin_path.name, bin_path)
    _crash_point("data")
    os.replace(stage / sidecar.name, sidecar)
    fsync_dir(bin_path.parent)


def _write_failed(e: OSError, out: Path) -> KilnError:
    """A failed write of the staged files, in one line: everything is written into the staging
    folder before the renames, so the set already in OUT is the one that was there."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        free = f"{shutil.disk_usage(out).free / 2**20:,.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return KilnError(f"could not write the token files in {out} "
                     f"({'no space left on device' if full else e.strerror or e}; {free}); the "
                     f"files already in {out} are unchanged and the partial ones were removed; "
                     "free disk space (or choose another --out) and run again")


# --------------------------------------------------------------------------------------------
# prepare


def prepare(
    inputs: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    name: str = "tokens",
    text_field: str = "text",
    batch_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``out_dir/name.bin`` (+ sidecar, + tokenizer.json).

    Returns the sidecar dict. On any error or kill before the swap, ``out_dir`` keeps its old
    files (see the module docstring).
    """
    if not name or name.startswith(".") or any(c in name for c in "/\\"):
        raise KilnError(f"--name {name!r} must be a plain file name without folders")
    if f"{name}.json" == _TOKENIZER_FILE:
        raise KilnError(f"--name {name!r} would put its sidecar over {_TOKENIZER_FILE}; pick "
                        "another name")
    if batch_size < 1:
        raise KilnError("--batch-size must be at least 1")
    if tokenizer is not None and vocab_size is not None:
        raise KilnError("--vocab-size is for training a new tokenizer; drop it when passing "
                        "--tokenizer")
    if tokenizer is None:
        if vocab_size is None:
            raise KilnError("no tokenizer given; pass --tokenizer PATH/tokenizer.json, or "
                            "--vocab-size N to train a byte-level BPE on the inputs")
        floor = 256 + len(SPECIAL_TOKENS)
        if vocab_size < floor:
            raise KilnError(f"--vocab-size {vocab_size} is below the {floor} byte-level base "
                            "and special tokens; pick a larger vocabulary")
        if vocab_size > MAX_TRAINED_VOCAB:
            raise KilnError(f"--vocab-size {vocab_size:,} is above {MAX_TRAINED_VOCAB:,}, the "
                            "largest vocabulary kiln trains (the BPE trainer reserves ~66 bytes "
                            "per entry up front: 10^9 entries would take 66 GB); real "
                            "vocabularies are 32k-256k")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise KilnError(f"--out '{out}' is a file; choose a folder")
    bin_path = out / f"{name}.bin"
    tok_path = out / _TOKENIZER_FILE
    if not overwrite:
        for p in (bin_path, sidecar_path(bin_path)):
            if p.exists():
                raise KilnError(f"output '{p}' exists; pass --overwrite or choose another --out")
    if out.is_dir():
        _remove_stale_staging(out)
    check_writable(out, f"the token files {bin_path.name}, {sidecar_path(bin_path).name} and "
                   f"{_TOKENIZER_FILE} in {out}", "choose a writable --out")

    files = find_inputs(inputs)
    corpus = _Corpus(files, text_field, batch_size)

    with _tokenizers_parallel(), _progress(progress, corpus.total_bytes) as start:
        if tokenizer is not None:
            from kiln.data.tokenizers import resolve_tokenizer

            tokenizer = str(resolve_tokenizer(tokenizer))  # a path, an alias or a shipped name
            tok = _load_tokenizer(tokenizer)
            tok_bytes = Path(tokenizer).read_bytes()  # copied verbatim
        else:
            meter = start("training tokenizer")
            tok = _train_tokenizer(corpus.documents(meter), int(vocab_size))  # type: ignore[arg-type]
            meter.flush()
            if meter.docs == 0:
                raise KilnError(f"no documents found in {', '.join(map(str, inputs))}; every "
                                "input was empty or blank")
            tok_bytes = tok.to_str(pretty=True).encode("utf-8")
        if not overwrite:
            _refuse_existing(bin_path, tok_path, tok_bytes)

        eos = find_eos(tok)
        if eos is None:
            raise KilnError(f"tokenizer '{tokenizer}' has no end-of-text token (none of "
                            f"{', '.join(EOS_CANDIDATES)}); add one to its special tokens")
        sha = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()
        vocab = tok.get_vocab_size()
        # Ids can be sparse (added tokens placed high), so size the dtype by the largest id.
        top = max(vocab, max(tok.get_vocab(with_added_tokens=True).values(), default=0) + 1)
        # Literal "<|endoftext|>" in a document is text, not a boundary (see module docstring).
        tok.encode_special_tokens = True
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

        out.mkdir(parents=True, exist_ok=True)
        stage = out / f"{_STAGING}{name}-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            with TokenWriter(stage / bin_path.name, eos_token_id=eos[1],
                             dtype=dtype_for_vocab(top), vocab_size=vocab,
                             tokenizer=_TOKENIZER_FILE, tokenizer_sha256=sha,
                             tokenizer_file_sha256=hashlib.sha256(tok_bytes).hexdigest(),
                             sources=[str(f) for f in files]) as writer:
                meter = start("tokenizing")
                batch: list[str] = []
                for text in corpus.documents(meter):
                    batch.append(text)
                    if len(batch) >= batch_size:
                        for enc in encode(batch, add_special_tokens=False):
                            writer.write(enc.ids)
                        batch.clear()
                if batch:
                    for enc in encode(batch, add_special_tokens=False):
                        writer.write(enc.ids)
                meter.flush()
                if writer.documents == 0:
                    raise KilnError(f"no documents found in {', '.join(map(str, inputs))}; "
                                    "every input was empty or blank")
            if not (tok_path.is_file() and tok_path.read_bytes() == tok_bytes):
                write_synced(stage / _TOKENIZER_FILE, tok_bytes)
            write_synced(stage / INCOMPLETE, (json.dumps(
                {"format": FORMAT, INCOMPLETE: True}) + "\n").encode("utf-8"))
            fsync_dir(stage)
            _crash_point("staged")
            if not overwrite:
                _refuse_existing(bin_path, tok_path, tok_bytes)  # it may have appeared since
        except OSError as e:  # a full disk, a quota, an I/O error while staging
            shutil.rmtree(stage, ignore_errors=True)
            raise _write_failed(e, out) from None
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        try:
            _swap_in(stage, bin_path, tok_path)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    assert writer.meta is not None
    return {**writer.meta, "skipped_empty": meter.skipped}


# --------------------------------------------------------------------------------------------
# CLI glue


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``kiln prepare``."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="text files (.txt .md .jsonl .jsonl.gz .json.gz .parquet), "
                             "folders (read recursively) or glob patterns")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder for NAME.bin, NAME.json and tokenizer.json")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="HF tokenizers tokenizer.json to use (copied into --out)")
    parser.add_argument("--vocab-size", type=int, metavar="N",
                        help="train a byte-level BPE of this size on the inputs instead")
    parser.add_argument("--name", default="tokens", help="output file stem (default: tokens)")
    parser.add_argument("--text-field", default="text", metavar="F",
                        help="JSON field / Parquet column holding the text (default: text)")
    parser.add_argument("--batch-size", type=int, default=1000, metavar="N",
                        help="documents per encode batch (default: 1000)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``kiln prepare`` from parsed arguments and print a summary."""
    t0 = time.perf_counter()
    meta = prepare(
        list(args.inputs),
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        name=getattr(args, "name", "tokens"),
        text_field=getattr(args, "text_field", "text"),
        batch_size=getattr(args, "batch_size", 1000),
        overwrite=getattr(args, "overwrite", False),
        progress=not getattr(args, "no_progress", False),
    )
    seconds = max(time.perf_counter() - t0, 1e-9)
    bin_path = Path(args.out) / f"{getattr(args, 'name', 'tokens')}.bin"
    origin = "copied from " + str(args.tokenizer) if args.tokenizer else "trained on the inputs"
    n_files = len(meta["sources"])
    print(
        f"Prepared {meta['documents']:,} documents"
        + (f" ({meta['skipped_empty']:,} empty records skipped)" if meta.get("skipped_empty")
           else "")
        + f" from {n_files:,} "
        f"file{'' if n_files == 1 else 's'}: "
        f"{meta['tokens']:,} tokens ({meta['dtype']}, eos id {meta['eos_token_id']}, largest id "
        f"{meta['max_token_id']:,}) in {seconds:.1f} s ({meta['tokens'] / seconds:,.0f} "
        f"tokens/s). Wrote {bin_path}, {sidecar_path(bin_path)} and "
        f"{bin_path.parent / meta['tokenizer']} (vocab {meta['vocab_size']:,}, {origin})."
    )
    from kiln.data.check import prepare_summary  # the cheap checks on what was just written

    lines, code = prepare_summary(bin_path)
    print("\n".join(lines))
    return code
