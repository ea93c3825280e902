"""Remote token files: URLs in ``data.paths`` / ``data.val_paths``, fetched once into a local
cache and then opened like any local file.

A URL names one token file: ``http://`` and ``https://`` (fetched with urllib, no extra
package), or any fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://`` ...; needs the
``remote`` extra, and s3fs/gcsfs for those stores). fsspec URLs may be glob patterns or
folders (expanded with the store's own listing, like local paths); http URLs are taken as
given (``?`` belongs to their query, not a glob). Beside a token file ``NAME.bin`` its sidecar
``NAME.json`` is fetched from the same place, and the tokenizer the sidecar names; either may
be missing (a raw OLMo file has no sidecar).

The cache (``data.cache_dir``; default ``$KILN_CACHE``, else ``~/.cache/kiln/data``) holds one
folder per URL, named by a hash of it, with the file under its own name (so the sidecar and
tokenizer sit beside it as in the source folder) and a ``.kiln-remote.json`` record of what
was fetched (URL, size, fingerprint). A file is fetched once and never revalidated against
the server: a file replaced on the server needs a new URL (or its cache folder removed).

How a file is fetched:

* http(s): a HEAD request gives its size; when the server accepts ranges the file is fetched
  in ranges of 16 MiB by a few threads into ``.NAME.part``, and each finished range is
  recorded (after an fsync) in ``.NAME.part.json``. A fetch that stops (a dropped connection
  after the retries with backoff, a kill) keeps both, and the next one fetches only the
  ranges not recorded. A server without ranges is read in one stream. fsspec stores are read
  in one stream, resumable at the last recorded offset.
* Nothing is used before it is verified: the size must be the server's Content-Length (or the
  store's size), and the sidecar's token count times its dtype's width. Where the server gives
  an MD5 of the file (Content-MD5; an ETag of 32 hex digits, as S3 gives for a single-part
  object; a store's md5 or ETag), the file's MD5 must be it (computed as a stream arrives; a
  ranged fetch hashes the finished file once). A file whose length nothing gives (no
  Content-Length, no sidecar) must end with a confirmed end of stream: a chunked body's last,
  empty chunk. A body that just ends when the connection closes cannot be told from one cut
  short, so without an MD5 it is refused and nothing is cached, unless
  ``data.trust_unverified: true`` (which also accepts a file whose ETag is no MD5 of it, as
  for S3 objects encrypted with KMS). Only then is the file renamed into place and the record
  written (last). A cached copy whose size or fingerprint (tokens.fingerprint: first and last
  MiB, sidecar) no longer matches the record is fetched again; a server whose file disagrees
  with its sidecar is refused.
* One downloader per cache: every cache entry has a lock file (fcntl.flock), so of the ranks
  of a node sharing the cache exactly one fetches a file, and the others wait for it and then
  open the same local copy. (flock on a network file system is only as good as its locking;
  give each node a local cache_dir.)
* Ahead of training: every file of the run is fetched before training starts, one after
  another in data order (the order the loader reads them); ``kiln data fetch CONFIG`` does
  the same up front. Training does not start on the first file while later ones are still
  downloading (there is no background fetch). URLs are taken in data.paths and
  data.val_paths; a mixture's data.sources does not fetch them (yet).
* ``data.cache_limit_gb`` (GB = 1e9 bytes; None: no limit): before a download that would take
  the cache past the limit, the least recently used entries (last opened by a run) are
  removed, never one the current run names nor one another process is fetching. When that
  does not make room, the fetch is refused in one line. (A file another run on the node is
  still reading stays readable to it: its memory map keeps the removed file alive.)
* ``kiln train --dry-run`` opens the data like a run does, so it fetches the URLs too.

A run records its data files by the URLs as given (``data_files`` in each checkpoint), so a
resume compares the configured paths; the data fingerprint is computed on the cached copies,
which keep the files' names and bytes, so it is the same as for the source files.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kiln.data.tokens import (
    TokenFile,
    fingerprint,
    open_token_files,
    resolve_paths,
    sidecar_path,
)
from kiln.errors import KilnError, one_line
from kiln.files import file_digest, write_atomic

CHUNK_BYTES = 16 << 20
"""Size of one ranged request (and of one resumable step of a streamed fetch)."""
THREADS = 4
"""Ranged requests in flight at once per file."""
RETRIES = 5
"""Tries after the first one for a request that fails on the connection (or a 5xx)."""
BACKOFF_S = 0.5
"""Wait before the first retry; doubled for each one after."""
TIMEOUT_S = 60.0
"""Socket timeout of each request."""
RECORD = ".kiln-remote.json"
"""The file in a cache entry that says it is complete (written last) and what it holds."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_ITEMSIZE = {"uint16": 2, "uint32": 4}
_NPY_MAGIC = b"\x93NUMPY"
_MD5_ETAG = re.compile(r'"([0-9a-fA-F]{32})"')
_PIECE = 1 << 20
Log = Callable[[str], None]


def is_url(path: Any) -> bool:
    """True for ``scheme://...`` text (a Path is never a URL)."""
    return isinstance(path, str) and bool(_URL.match(path))


def has_urls(patterns: Sequence[Any] | str | None) -> bool:
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(is_url(p) for p in patterns or [])


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """data.cache_dir, else $KILN_CACHE, else ~/.cache/kiln/data."""
    text = str(cache_dir) if cache_dir else (os.environ.get("KILN_CACHE")
                                             or "~/.cache/kiln/data")
    return Path(os.path.expanduser(text))


def entry_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:24]


def entry_dir(url: str, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of one URL."""
    return cache_root(cache_dir) / entry_key(url)


def file_name(url: str) -> str:
    """The last segment of the URL's path: the name the cached copy keeps."""
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name
    if _is_http(url):  # fsspec paths are not percent-encoded
        name = urllib.parse.unquote(name)
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise KilnError(f"data path '{url}' names no file (or a hidden one); give the URL of "
                        "one token file")
    if name.endswith(".json"):
        raise KilnError(f"'{url}' is a JSON file, not token data; name the .bin file beside it")
    return name


def _beside(url: str, name: str) -> str:
    """The URL of file `name` in the same folder as `url` (an http query or fragment is
    dropped)."""
    if _is_http(url):
        url, name = url.split("#", 1)[0].split("?", 1)[0], urllib.parse.quote(name)
    return url.rsplit("/", 1)[0] + "/" + name


def _sidecar_url(url: str) -> str:
    return _beside(url, sidecar_path(file_name(url)).name)


# -- what a run names, in data order -----------------------------------------------------------


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_http(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("http", "https")


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise KilnError("fsspec URLs (s3://, gs://, file:// ...) need fsspec: pip install "
                        "'kiln[remote]' (and s3fs or gcsfs for those stores); http(s) URLs "
                        "need nothing") from None
    return fsspec


def _url_to_fs(url: str):
    fsspec = _fsspec()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # the store's own package (s3fs, gcsfs) is missing
        raise KilnError(f"'{url}' needs a package fsspec could not import ({one_line(e)})"
                        ) from None
    except ValueError as e:
        raise KilnError(f"'{url}' is not a URL fsspec knows ({one_line(e)}); check data.paths"
                        ) from None


def expand_url(url: str) -> list[str]:
    """The token file URLs one configured URL names: itself, or for an fsspec glob or folder
    its matches (sorted, JSON files left out; in a folder only .npy and .bin with a
    sidecar)."""
    if _is_http(url):
        return [url]
    fs, path = _url_to_fs(url)
    try:
        if _is_glob(path):
            found = [p for p in fs.glob(path) if fs.isfile(p) and not p.endswith(".json")]
        elif fs.isdir(path):
            names = set(fs.ls(path, detail=False))
            found = [p for p in names if fs.isfile(p) and (
                p.endswith(".npy") or (p.endswith(".bin") and p[:-4] + ".json" in names))]
        else:
            return [url]
    except (OSError, ValueError) as e:
        raise KilnError(f"cannot list '{url}' ({one_line(e)}); check data.paths") from None
    if not found:
        raise KilnError(f"data path '{url}' matches no files; check data.paths")
    return [fs.unstrip_protocol(p) for p in sorted(found)]


def data_names(patterns: Sequence[str | Path] | str) -> list[str]:
    """The data files a run names, in data order, by the names a checkpoint records: local
    files as resolved paths (tokens.resolve_paths' order), then URLs as given (fsspec globs
    expanded), sorted. Without URLs this is exactly ``resolve_paths``."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    local = [p for p in patterns if not is_url(p)]
    names = [str(p) for p in resolve_paths(local)] if local else []
    urls: dict[str, None] = {}
    for u in patterns:
        if is_url(u):
            urls.update(dict.fromkeys(expand_url(str(u))))
    return names + sorted(urls)


def source_names(files: Iterable[TokenFile]) -> list[str]:
    """What a checkpoint records for these files: the URL of a cached copy, else the path."""
    out = []
    for f in files:
        rec = _read_record(f.path.parent)
        out.append(rec["url"] if rec and rec.get("file") == f.path.name else str(f.path))
    return out


def local_copy(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the data file `name` (a path, or a URL as data_names gives it) is read from: the
    path itself, or the URL's file in the cache (which may not exist yet)."""
    if not is_url(name):
        return Path(name)
    folder = entry_dir(name, cache_dir)
    rec = _read_record(folder)
    return folder / (rec["file"] if rec and rec.get("url") == name else file_name(name))


def cached_paths(patterns: Sequence[str | Path] | str, cache_dir: str | Path | None = None
                 ) -> list[Path]:
    """The local files of `patterns` in data order, without fetching anything: the cached
    copies of URLs (KilnError when one is not in the cache). Without URLs: resolve_paths."""
    if not has_urls(patterns):
        return resolve_paths(patterns)
    out = []
    for name in data_names(patterns):
        if not is_url(name):
            out.append(Path(name))
            continue
        d = entry_dir(name, cache_dir)
        rec = _read_record(d)
        if not rec or rec.get("url") != name or not (d / rec["file"]).is_file():
            raise KilnError(f"'{name}' is not in the cache {cache_root(cache_dir)}; "
                            "run kiln data fetch CONFIG")
        out.append(d / rec["file"])
    return out


# -- opening a run's files ---------------------------------------------------------------------


def _stderr_log(text: str) -> None:
    print(f"kiln: {text}", file=sys.stderr, flush=True)


def localise(patterns: Sequence[str | Path] | str, data: Any = None, *,
             keep: Iterable[str] = (), log: Log | None = _stderr_log) -> list[Path]:
    """The local files of `patterns` in data order, fetching each URL into the cache (in that
    order) unless a verified copy is there. `data` is the DataConfig (cache_dir,
    cache_limit_gb, trust_unverified); URLs in `keep` are never evicted to make room."""
    cache_dir = getattr(data, "cache_dir", None)
    limit = getattr(data, "cache_limit_gb", None)
    trust = getattr(data, "trust_unverified", False)
    names = data_names(patterns)
    keep = set(keep) | {n for n in names if is_url(n)}
    return [fetch(n, cache_dir, limit_gb=limit, keep=keep, trust_unverified=trust, log=log).path
            if is_url(n) else Path(n) for n in names]


def open_files(patterns: Sequence[str | Path] | str, data: Any) -> list[TokenFile]:
    """tokens.open_token_files, with URLs fetched into the cache first (see localise). The
    run's other URLs (data.paths and data.val_paths) are kept from eviction."""
    if not has_urls(patterns):
        return open_token_files(patterns, dtype=data.dtype, eos_token_id=data.eos_token_id)
    keep = [n for group in (data.paths, data.val_paths) if has_urls(group)
            for n in data_names([p for p in group if is_url(p)])]
    return [TokenFile.open(p, dtype=data.dtype, eos_token_id=data.eos_token_id)
            for p in localise(patterns, data, keep=keep)]


# -- the cache ---------------------------------------------------------------------------------


@dataclass
class Fetched:
    url: str
    path: Path
    bytes: int
    downloaded: int
    """Bytes of the file transferred by this call (less than `bytes` after a resume)."""
    seconds: float
    cached: bool
    """True: a verified copy was in the cache and nothing was fetched."""

    @property
    def mb_per_s(self) -> float:
        return self.downloaded / 1e6 / max(self.seconds, 1e-9)


def _read_record(folder: Path) -> dict | None:
    try:
        rec = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("file"), str) else None


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj))


def _verified(folder: Path, url: str) -> tuple[Path | None, str | None]:
    """(the cached file, None) when the entry is complete and intact; (None, why not) when it
    is damaged; (None, None) when there is none."""
    rec = _read_record(folder)
    if rec is None or rec.get("url") != url:
        return None, None
    p = folder / rec["file"]
    if not p.is_file():
        return None, f"{p} is missing"
    size = p.stat().st_size
    if size != rec.get("bytes"):
        return None, f"{p} is {size:,} bytes, it was fetched as {rec.get('bytes', 0):,}"
    if fingerprint(p) != rec.get("fingerprint"):
        return None, f"{p} or its sidecar changed since it was fetched"
    return p, None


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True, on_wait: Callable[[], None] | None = None
           ) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created); yields False when not blocking and the
    lock is held elsewhere."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock


def _lock_path(root: Path, key: str) -> Path:
    return root / ".locks" / f"{key}.lock"


def _entry_size(folder: Path) -> int:
    """Bytes an entry takes: its files, a partial download at its full size."""
    total = 0
    with contextlib.suppress(OSError):  # an entry another process is removing
        for p in folder.iterdir():
            record = p.with_name(p.name + ".json")
            if p.name.endswith(".part") and record.is_file():
                with contextlib.suppress(OSError, ValueError, TypeError):
                    total += int(json.loads(record.read_text()).get("size") or 0)
            elif p.is_file() and not p.name.endswith(".part.json"):
                total += p.stat().st_size
    return total


def _last_used(folder: Path) -> float:
    for name in (RECORD, ""):
        with contextlib.suppress(OSError):
            return (folder / name).stat().st_mtime if name else folder.stat().st_mtime
    return 0.0


def _make_room(root: Path, key: str, need: int, limit_gb: float | None, keep: set[str],
               url: str, log: Log | None) -> None:
    """Evict least-recently-used entries until `need` more bytes fit under the limit."""
    if limit_gb is None:
        return
    limit = int(limit_gb * 1e9)
    keep_keys = {entry_key(u) for u in keep} | {key}
    with _flock(root / ".locks" / "cache.lock"):
        entries = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
        sizes = {d.name: _entry_size(d) for d in entries if d.name != key}
        total = sum(sizes.values())
        if total + need <= limit:
            return
        for d in sorted((d for d in entries if d.name not in keep_keys), key=_last_used):
            with _flock(_lock_path(root, d.name), blocking=False) as got:
                if not got:  # another process is fetching or checking it
                    continue
                rec = _read_record(d)
                shutil.rmtree(d, ignore_errors=True)
            total -= sizes.get(d.name, 0)
            if log:
                log(f"cache: evicted {rec['url'] if rec else d.name} "
                    f"({sizes.get(d.name, 0) / 1e6:,.1f} MB, least recently used) to stay "
                    f"under data.cache_limit_gb={limit_gb:g}")
            if total + need <= limit:
                return
    raise KilnError(
        f"data.cache_limit_gb={limit_gb:g} leaves no room for '{url}' ({need / 1e9:.3g} GB): "
        f"the cache {root} holds {total / 1e9:.3g} GB that this run uses or another process "
        "is fetching; raise data.cache_limit_gb or point data.cache_dir elsewhere")


def fetch(url: str, cache_dir: str | Path | None = None, *, limit_gb: float | None = None,
          keep: Iterable[str] = (), chunk_bytes: int | None = None, threads: int | None = None,
          trust_unverified: bool = False, log: Log | None = None) -> Fetched:
    """The local copy of `url`: the verified cached one, else fetched now (one process per
    cache fetches, others wait; an interrupted fetch resumes). See the module docstring;
    `trust_unverified` is data.trust_unverified."""
    root = cache_root(cache_dir)
    key = entry_key(url)
    folder = root / key
    name = file_name(url)
    t0 = time.perf_counter()

    def waiting() -> None:
        if log and os.environ.get("RANK", "0") == "0":
            log(f"waiting for another process fetching {url}")

    with _flock(_lock_path(root, key), on_wait=waiting):
        path, damaged = _verified(folder, url)
        if path is not None:
            os.utime(folder / RECORD)  # last used, for eviction
            return Fetched(url, path, path.stat().st_size, 0, time.perf_counter() - t0, True)
        if damaged:
            if log:
                log(f"the cached copy of {url} is damaged ({damaged}); fetching it again")
            shutil.rmtree(folder, ignore_errors=True)
        src = _Http(url) if _is_http(url) else _Fsspec(url)
        side = src.get_small(_sidecar_url(url))
        meta = _kiln_sidecar(side)
        size, validator, ranges, digest = src.stat()
        expect = _sidecar_bytes(meta)
        if expect is not None and size is not None and size != expect:
            raise KilnError(_mismatch(url, size, meta))
        tok_name = meta.get("tokenizer") if meta else None
        tok = None
        if (isinstance(tok_name, str) and tok_name == PurePosixPath(tok_name).name
                and not tok_name.startswith(".")
                and tok_name not in (name, sidecar_path(name).name)):  # a plain name beside
            tok = src.get_small(_beside(url, tok_name))  # absent is fine (404)
            want = meta.get("tokenizer_file_sha256")
            if tok is not None and want and hashlib.sha256(tok).hexdigest() != want:
                raise KilnError(f"'{_beside(url, tok_name)}' is not the tokenizer '{url}' was "
                                f"made with (its sha256 differs from the sidecar's); fix the "
                                "source folder")
        _make_room(root, key, size or 0, limit_gb, set(keep), url, log)
        folder.mkdir(parents=True, exist_ok=True)
        if log:
            what = f"{size / 1e6:,.1f} MB" if size is not None else "size unknown"
            log(f"fetching {url} ({what}) into {folder}")
        part = folder / f".{name}.part"
        dl = src.download(part, size, validator, ranges, chunk_bytes or CHUNK_BYTES,
                          threads or THREADS, digest)
        downloaded, got = dl.bytes, part.stat().st_size
        if size is not None and got != size:  # never: download() checks every range
            _drop_partial(part)
            raise KilnError(f"'{url}' arrived as {got:,} bytes, not {size:,}; fetch it again")
        if expect is not None and got != expect:
            _drop_partial(part)
            raise KilnError(_mismatch(url, got, meta))
        _check_whole(url, part, dl, digest, size is not None or expect is not None,
                     trust_unverified, log)
        # publish: the files under their names, the record last
        if side is not None:
            write_atomic(folder / sidecar_path(name).name, side)
        if tok is not None:
            write_atomic(folder / tok_name, tok)
        final = folder / name
        os.replace(part, final)
        part.with_name(part.name + ".json").unlink(missing_ok=True)
        _write_json(folder / RECORD, {"url": url, "file": name, "bytes": got,
                                      "fingerprint": fingerprint(final),
                                      "fetched": time.time()})
        secs = time.perf_counter() - t0
        if log:
            log(f"fetched {url}: {got / 1e6:,.1f} MB in {secs:.1f} s "
                f"({downloaded / 1e6 / max(secs, 1e-9):,.1f} MB/s)")
        return Fetched(url, final, got, downloaded, secs, False)


def _drop_partial(part: Path) -> None:
    part.unlink(missing_ok=True)
    part.with_name(part.name + ".json").unlink(missing_ok=True)


def _kiln_sidecar(raw: bytes | None) -> dict:
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    ok = isinstance(meta, dict) and str(meta.get("format", "")).startswith("kiln-tokens/")
    return meta if ok else {}


def _sidecar_bytes(meta: dict) -> int | None:
    """The data file's size as the sidecar tells it (tokens x width), when it does."""
    try:
        return int(meta["tokens"]) * _ITEMSIZE[meta["dtype"]]
    except (KeyError, TypeError, ValueError):
        return None


def _mismatch(url: str, size: int, meta: dict) -> str:
    return (f"'{url}' is {size:,} bytes but its sidecar says {int(meta['tokens']):,} "
            f"{meta['dtype']} tokens ({_sidecar_bytes(meta):,} bytes): the copy there is "
            "damaged or does not belong to its sidecar; it was not used (fix the source)")


def _check_whole(url: str, part: Path, dl: _Download, digest: _Digest | None, sized: bool,
                 trust: bool, log: Log | None) -> None:
    """Refuse a download not known to be whole (the partial file removed, nothing cached):
    one whose MD5 is not the server's, or, with no MD5, whose length nothing confirmed (not
    `sized` by the server or sidecar, no end of stream seen); `trust` accepts the latter and
    an MD5 that differs from an ETag only (which may be no MD5)."""
    digest = dl.digest or digest
    if digest is not None:
        md5 = dl.md5 or file_digest(part, "md5")
        if md5 == digest.hex:
            return
        if trust and digest.presumed:
            if log:
                log(f"{url}: its MD5 is not its ETag; used anyway (data.trust_unverified)")
            return
        _drop_partial(part)
        hint = ("; or, if this store's ETags are no MD5s (S3 objects encrypted with KMS), set "
                "--data.trust_unverified=true" if digest.presumed else "")
        raise KilnError(f"'{url}' arrived damaged: its MD5 is {md5} but the server's "
                        f"{digest.source} says {digest.hex}; it was not cached, fetch it "
                        f"again{hint}")
    if sized or dl.ended:
        return
    if trust:
        if log:
            log(f"{url}: the server sent no length and the stream's end could not be "
                "confirmed; used unverified (data.trust_unverified)")
        return
    _drop_partial(part)
    raise KilnError(f"'{url}' was not cached: the server sent no length (no Content-Length, "
                    "no sidecar with its token count, no MD5) and the stream's end could not "
                    "be confirmed, so a copy cut short would look whole; serve it with a "
                    "length, or use it unverified with --data.trust_unverified=true")


# -- transports --------------------------------------------------------------------------------


@dataclass
class _Digest:
    """The server's MD5 of the whole file, and the header or field that gave it."""

    hex: str
    source: str

    @property
    def presumed(self) -> bool:
        """From an ETag: S3's is the MD5 of a single-part object, but an ETag need not be one."""
        return self.source.lower() == "etag"


def _digest(fields: Any, keys: Sequence[str]) -> _Digest | None:
    """The MD5 in the first of `keys` in `fields` (response headers or fs.info()) that holds
    one: 32 hex digits or base64 of 16 bytes (Content-MD5, GCS's md5Hash); an ETag only as a
    quoted 32-hex one, and not for an S3 object encrypted with KMS or a customer key."""
    encrypted = bool(str(fields.get("x-amz-server-side-encryption") or "").startswith("aws:kms")
                     or fields.get("x-amz-server-side-encryption-customer-algorithm"))
    for key in keys:
        text = str(fields.get(key) or "").strip()
        if key.lower() == "etag":
            m = None if encrypted else _MD5_ETAG.fullmatch(text)
            md5 = m[1] if m else None
        elif re.fullmatch(r"[0-9a-fA-F]{32}", text):
            md5 = text
        else:
            try:
                raw = base64.b64decode(text, validate=True)
            except ValueError:
                raw = b""
            md5 = raw.hex() if len(raw) == 16 else None
        if md5:
            return _Digest(md5.lower(), key)
    return None


def _length(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


@dataclass
class _Download:
    """What one transport's download did."""

    bytes: int
    """Bytes transferred by this call."""
    ended: bool = False
    """The transfer itself saw the file end: a Content-Length it met, or the last (empty)
    chunk of a chunked body."""
    digest: _Digest | None = None
    """The server's MD5 as the streamed response gave it."""
    md5: str | None = None
    """The MD5 of the file, computed as it streamed in (None: not computed)."""


class _Transient(Exception):
    """A failure worth retrying (a dropped connection, a short read, a 5xx)."""


_RESUMES = ("what arrived is kept, and the next fetch (kiln data fetch CONFIG, or the run) "
            "resumes it")


def _retrying(what: str, fn: Callable[[], Any], stop: threading.Event | None = None,
              then: str = _RESUMES) -> Any:
    """fn(), tried again after a transient failure (RETRIES times, waits doubling from
    BACKOFF_S); `stop` set: no more tries (another range already failed for good). The
    KilnError at the end names `what` and says `then`."""
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except _Transient as e:
            if attempt == RETRIES or (stop is not None and stop.is_set()):
                raise KilnError(f"could not fetch {what} ({one_line(e)}; {attempt + 1} "
                                f"tries); {then}") from None
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


class _Progress:
    """The `.NAME.part.json` beside a partial download: which ranges (or how many leading
    bytes) are on disk, written after an fsync of the data."""

    def __init__(self, part: Path, url: str, size: int | None, validator: str, chunk: int):
        self.path = part.with_name(part.name + ".json")
        self.head = {"url": url, "size": size, "validator": validator, "chunk": chunk}
        self.done: set[int] = set()
        self.offset = 0
        self.lock = threading.Lock()
        try:
            old = json.loads(self.path.read_text())
        except (OSError, ValueError):
            old = None
        if (isinstance(old, dict) and all(old.get(k) == v for k, v in self.head.items())
                and part.is_file()):
            self.done = {int(i) for i in old.get("done", [])}
            self.offset = int(old.get("offset", 0))
        else:
            _drop_partial(part)

    def save(self) -> None:
        _write_json(self.path, {**self.head, "done": sorted(self.done), "offset": self.offset})


class _Http:
    def __init__(self, url: str):
        self.url = url

    def _open(self, url: str, method: str = "GET", headers: dict | None = None):
        req = urllib.request.Request(url, method=method,
                                     headers={"User-Agent": "kiln", **(headers or {})})
        try:
            return urllib.request.urlopen(req, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code >= 500 or e.code == 429:
                raise _Transient(f"HTTP {e.code} {e.reason}") from None
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise _Transient(one_line(getattr(e, "reason", e)) or type(e).__name__) from None

    def get_small(self, url: str) -> bytes | None:
        """A whole small file beside the token file (sidecar, tokenizer); None when the
        server has none."""
        def get() -> bytes | None:
            try:
                with self._open(url) as r:
                    return r.read()
            except urllib.error.HTTPError as e:
                if e.code in (403, 404, 410):
                    return None
                raise KilnError(f"'{url}': HTTP {e.code} {e.reason}") from None
            except (OSError, http.client.HTTPException) as e:
                raise _Transient(one_line(e) or type(e).__name__) from None
        return _retrying(f"'{url}' (beside '{self.url}')", get,
                         then="check the server and fetch again")

    def stat(self) -> tuple[int | None, str, bool, _Digest | None]:
        """(size, validator, ranges, digest): Content-Length, ETag/Last-Modified,
        Accept-Ranges, Content-MD5 (or an MD5 ETag)."""
        def head():
            try:
                with self._open(self.url, "HEAD") as r:
                    return r.headers
            except urllib.error.HTTPError as e:
                if e.code in (405, 501):  # no HEAD: learn nothing, stream it
                    return {}
                raise KilnError(f"'{self.url}': HTTP {e.code} {e.reason}; check data.paths"
                                ) from None
        h = _retrying(f"'{self.url}'", head, then="check the server and fetch again")
        validator = h.get("ETag") or h.get("Last-Modified") or ""
        ranges = (h.get("Accept-Ranges") or "").lower() == "bytes"
        return (_length(h.get("Content-Length")), validator, ranges,
                _digest(h, ("Content-MD5", "ETag")))

    def download(self, part: Path, size: int | None, validator: str, ranges: bool,
                 chunk: int, threads: int, digest: _Digest | None) -> _Download:
        if not (ranges and size):
            return self._stream(part, size, digest)
        prog = _Progress(part, self.url, size, validator, chunk)
        n_chunks = -(-size // chunk)
        todo = [i for i in range(n_chunks) if i not in prog.done]
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        got = [0]
        stop = threading.Event()
        try:
            os.ftruncate(fd, size)

            def one(i: int) -> None:
                a, b = i * chunk, min(size, (i + 1) * chunk) - 1
                try:
                    n = _retrying(f"'{self.url}'", lambda: self._range(fd, a, b, size), stop)
                except BaseException:
                    stop.set()
                    raise
                with prog.lock:
                    got[0] += n
                    os.fsync(fd)
                    prog.done.add(i)
                    prog.save()

            pool = ThreadPoolExecutor(max(1, min(threads, len(todo) or 1)))
            try:
                futures = [pool.submit(one, i) for i in todo]
                finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for f in finished:
                    if f.exception() is not None:
                        raise f.exception()  # type: ignore[misc]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            os.close(fd)
        return _Download(got[0], ended=True)

    def _range(self, fd: int, a: int, b: int, size: int) -> int:
        try:
            r = self._open(self.url, headers={"Range": f"bytes={a}-{b}"})
        except urllib.error.HTTPError as e:
            raise KilnError(f"'{self.url}': HTTP {e.code} {e.reason} for bytes {a}-{b}") from None
        with r:
            want = f"bytes {a}-{b}/{size}"
            if r.status == 200:
                raise KilnError(f"'{self.url}': the server says it accepts byte ranges but "
                                "answered a Range request with the whole file; fetch it from a "
                                "server that handles ranges")
            if r.status != 206 or (r.headers.get("Content-Range") or "").strip() != want:
                raise KilnError(f"'{self.url}' answered bytes {a}-{b} with status {r.status} "
                                f"({r.headers.get('Content-Range')}); the file changed on the "
                                "server during the fetch, fetch it again")
            pos = a
            try:
                while pos <= b:
                    buf = r.read(min(_PIECE, b + 1 - pos))
                    if not buf:
                        break
                    os.pwrite(fd, buf, pos)
                    pos += len(buf)
            except (OSError, http.client.HTTPException) as e:
                raise _Transient(one_line(e) or type(e).__name__) from None
        if pos != b + 1:
            raise _Transient(f"connection closed after {pos - a:,} of {b + 1 - a:,} bytes")
        return b + 1 - a

    def _stream(self, part: Path, size: int | None, digest: _Digest | None) -> _Download:
        """One GET from the start (a server without ranges cannot resume), hashed as it comes
        when the server gives an MD5."""
        _drop_partial(part)

        def get() -> _Download:
            n = 0
            try:
                with self._open(self.url) as r, open(part, "wb") as f:
                    length = _length(r.headers.get("Content-Length"))
                    # http.client raises IncompleteRead when a chunked body lacks its last
                    # chunk, so reading one to its end confirms the end
                    chunked = bool(getattr(r, "chunked", False))
                    said = _digest(r.headers, ("Content-MD5", "ETag")) or digest
                    h = hashlib.md5() if said else None
                    while buf := r.read(_PIECE):
                        f.write(buf)
                        if h is not None:
                            h.update(buf)
                        n += len(buf)
                    f.flush()
                    os.fsync(f.fileno())
            except urllib.error.HTTPError as e:
                raise KilnError(f"'{self.url}': HTTP {e.code} {e.reason}") from None
            except (OSError, http.client.HTTPException) as e:
                raise _Transient(one_line(e) or type(e).__name__) from None
            want = size if size is not None else length
            if want is not None and n != want:
                raise _Transient(f"connection closed after {n:,} of {want:,} bytes")
            return _Download(n, want is not None or chunked, said,
                             h.hexdigest() if h is not None else None)
        return _retrying(f"'{self.url}'", get, then="fetch it again (this server sends "
                         "no ranges, so it starts from the beginning)")


class _Fsspec:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = _url_to_fs(url)

    def get_small(self, url: str) -> bytes | None:
        fs, path = _url_to_fs(url)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise KilnError(f"cannot read '{url}' ({one_line(e)})") from None

    def stat(self) -> tuple[int | None, str, bool, _Digest | None]:
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            raise KilnError(f"data path '{self.url}' matches no files; check data.paths"
                            ) from None
        except OSError as e:
            raise KilnError(f"cannot read '{self.url}' ({one_line(e)})") from None
        if info.get("type") == "directory":
            raise KilnError(f"'{self.url}' is a folder; name token files (or a glob)")
        validator = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified",
                                                 "updated", "created") if info.get(k)), "")
        size = info.get("size")
        return ((int(size) if size is not None else None), validator, False,
                _digest(info, ("md5", "md5Hash", "ETag", "etag")))

    def download(self, part: Path, size: int | None, validator: str, ranges: bool,
                 chunk: int, threads: int, digest: _Digest | None) -> _Download:
        """A streamed copy, resumable at the last recorded offset (hashed as it comes when
        the store gives an MD5 and the copy starts at 0)."""
        prog = _Progress(part, self.url, size, validator, chunk)
        got = 0
        h = None

        def copy() -> None:
            nonlocal got, h
            h = hashlib.md5() if digest and prog.offset == 0 else None
            try:
                with self.fs.open(self.path, "rb") as src, open(part, "r+b" if part.exists()
                                                                else "wb") as f:
                    f.truncate(prog.offset)
                    f.seek(prog.offset)
                    src.seek(prog.offset)
                    since = 0
                    while buf := src.read(_PIECE):
                        f.write(buf)
                        if h is not None:
                            h.update(buf)
                        got += len(buf)
                        since += len(buf)
                        if since >= chunk:
                            f.flush()
                            os.fsync(f.fileno())
                            prog.offset = f.tell()
                            prog.save()
                            since = 0
                    f.flush()
                    os.fsync(f.fileno())
                    prog.offset = f.tell()
                    prog.save()
            except FileNotFoundError:
                raise KilnError(f"data path '{self.url}' matches no files") from None
            except (OSError, ValueError) as e:
                raise _Transient(one_line(e) or type(e).__name__) from None
        _retrying(f"'{self.url}'", copy)
        return _Download(got, md5=h.hexdigest() if h is not None else None)


# -- kiln data fetch ---------------------------------------------------------------------------


def fetch_all(data: Any, out: Callable[[str], None] = print) -> list[Fetched]:
    """Fill the cache with every URL of data.paths and data.val_paths, in data order, and
    print what was fetched (sizes, MB/s)."""
    names: list[str] = []  # training files first, then validation, each in data order
    for group in (data.paths, data.val_paths):
        urls = [p for p in group or [] if is_url(p)]
        names += [n for n in (data_names(urls) if urls else []) if n not in names]
    if not names:
        out("no URLs in data.paths or data.val_paths: nothing to fetch")
        return []
    root = cache_root(data.cache_dir)
    done: list[Fetched] = []
    t0 = time.perf_counter()

    def notes(text: str) -> None:  # what fetch says beyond the one line per file below
        if not text.startswith(("fetching ", "fetched ")):
            out(f"  {text}")

    for url in names:
        r = fetch(url, data.cache_dir, limit_gb=data.cache_limit_gb, keep=names,
                  trust_unverified=data.trust_unverified, log=notes)
        done.append(r)
        if r.cached:
            out(f"cached   {r.bytes / 1e6:>10,.1f} MB {'':>12}  {url}")
        else:
            out(f"fetched  {r.bytes / 1e6:>10,.1f} MB {r.mb_per_s:>7,.1f} MB/s  {url}")
    secs = time.perf_counter() - t0
    moved = sum(r.downloaded for r in done)
    held = sum(r.bytes for r in done)
    speed = (f"{moved / 1e6:,.1f} MB fetched in {secs:.1f} s "
             f"({moved / 1e6 / max(secs, 1e-9):,.1f} MB/s)" if moved else "nothing to fetch")
    out(f"{len(done)} file(s), {held / 1e6:,.1f} MB in {root}; {speed}")
    return done
