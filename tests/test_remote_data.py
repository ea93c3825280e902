"""URLs in data.paths (kiln.data.remote) against real servers, no mocks: Python's own HTTP
server (with a handler that answers `Range: bytes=a-b` with 206, keeps a log of every
request, can be told to die after N bytes or to go slowly, and to send no length, a chunked
body or headers of our choosing), fsspec's file:// and memory:// stores, and two real
processes fetching one URL at once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_cli import assert_one_line_error, kiln_here, write_config

from kiln.config import load_run_config
from kiln.data import remote
from kiln.data.tokens import TokenFile
from kiln.errors import KilnError

os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"

CHUNK = 32 << 10  # small ranges, so the 434 KB test corpus takes 14 of them


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD of the server's folder with byte ranges, logged; see Server."""

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's naming
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        srv: Server = self.server.owner  # type: ignore[attr-defined]
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        rng = self.headers.get("Range")
        with srv.lock:
            srv.log.append((self.command, name, rng))
            dead = srv.dead
        if dead:  # the server "died": drop the connection without an answer
            self.close_connection = True
            return
        path = srv.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end, status = 0, len(data) - 1, 200
        if rng and srv.ranges:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            assert m, rng
            start, end = int(m[1]), min(int(m[2] or len(data) - 1), len(data) - 1)
            status = 206
        chunked = srv.chunked and name.endswith(".bin")
        if chunked:
            self.protocol_version = "HTTP/1.1"  # chunked bodies are HTTP/1.1's
        self.send_response(status)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif srv.length or not name.endswith(".bin"):
            self.send_header("Content-Length", str(end + 1 - start))
        extra = srv.headers if name.endswith(".bin") else {}
        if "ETag" not in extra:
            self.send_header("ETag", f'"{path.stat().st_mtime_ns}-{len(data)}"')
        for k, v in extra.items():
            self.send_header(k, v)
        if srv.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not body:
            return
        pos = start
        while pos <= end:
            piece = data[pos: min(end + 1, pos + 8192)]
            with srv.lock:
                if srv.drop_after is not None and name.endswith(".bin"):
                    left = srv.drop_after - srv.sent
                    if left < len(piece):  # the budget runs out: send what it allows, then die
                        piece, srv.dead = piece[:max(left, 0)], True
                    srv.sent += len(piece)
                dying = srv.dead
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            pos += len(piece)
            if dying:  # a chunked body ends here without its last (empty) chunk
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if srv.delay:
                time.sleep(srv.delay)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a thread, serving `root`. ranges=False: the
    stdlib's behaviour (no Range support); drop_after=N: after N bytes of .bin files it drops
    the connection in the middle of a body and every request after; delay: seconds per 8 KiB
    sent. For .bin files: length=False sends no Content-Length (the body ends when the
    connection closes), chunked=True sends the body in chunks, `headers` are sent too (an
    ETag given there replaces the usual one)."""

    def __init__(self, root: Path, port: int = 0, ranges: bool = True,
                 drop_after: int | None = None, delay: float = 0.0, length: bool = True,
                 chunked: bool = False, headers: dict[str, str] | None = None):
        self.root, self.ranges, self.drop_after, self.delay = Path(root), ranges, drop_after, delay
        self.length, self.chunked, self.headers = length, chunked, headers or {}
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, str | None]] = []
        self.sent, self.dead = 0, False
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), RangeHandler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def gets(self, name: str) -> list[str | None]:
        """The Range headers of the GETs of `name` (None: the whole file)."""
        with self.lock:
            return [r for cmd, n, r in self.log if cmd == "GET" and n == name]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def www(pydoc_tokens, tmp_path) -> Path:
    """A copy of the prepared pydoc corpus folder (tokens.bin, tokens.json, tokenizer.json)
    under www/data/."""
    root = tmp_path / "www"
    shutil.copytree(pydoc_tokens.parent, root / "data")
    return root


@pytest.fixture
def server(www):
    srv = Server(www)
    yield srv
    srv.stop()


@pytest.fixture
def few_retries(monkeypatch):
    monkeypatch.setattr(remote, "RETRIES", 1)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


@pytest.fixture
def raw_www(tmp_path) -> Path:
    """www/raw/part-0.bin: 20 KB of uint16 tokens and no sidecar, like a raw OLMo file."""
    (tmp_path / "www/raw").mkdir(parents=True)
    (tmp_path / "www/raw/part-0.bin").write_bytes(np.arange(10_000, dtype="<u2").tobytes())
    return tmp_path / "www"


@contextlib.contextmanager
def serving(root: Path, **options) -> Iterator[Server]:
    srv = Server(root, **options)
    try:
        yield srv
    finally:
        srv.stop()


def assert_not_cached(url: str, cache: Path) -> None:
    folder = remote.entry_dir(url, cache)
    assert not (folder / remote.file_name(url)).exists()
    assert not (folder / remote.RECORD).exists()


def ranges_of(size: int, chunk: int, which) -> list[str]:
    return [f"bytes={i * chunk}-{min(size, (i + 1) * chunk) - 1}" for i in which]


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock numbers."""
    clock = {"tokens_per_sec", "model_flops_per_sec", "step_time", "mfu", "time", "elapsed",
             "data_wait", "data_wait_share", "fwd_bwd_time", "optim_time", "peak_mem_mib",
             "ckpt_save_time", "ckpt_stall_time", "ckpt_mib"}
    return [{k: v for k, v in json.loads(line).items() if k not in clock}
            for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# -- training ----------------------------------------------------------------------------------


def test_training_on_a_url_gives_the_losses_of_the_local_file(www, server, pydoc_tokens,
                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    url = server.url("data/tokens.bin")
    local = write_config(tmp_path / "local.yaml", pydoc_tokens, tmp_path / "run-local")
    over_http = write_config(tmp_path / "url.yaml", url, tmp_path / "run-url")
    assert kiln_here("train", local).returncode == 0
    out = kiln_here("train", over_http, "--trainer.hard_stop=3")  # stopped, then resumed
    assert out.returncode == 0, out.stderr
    assert "fetched " + url in out.stderr
    size = pydoc_tokens.stat().st_size
    assert server.gets("data/tokens.bin") == [f"bytes=0-{size - 1}"]  # one 16 MiB range
    out = kiln_here("train", over_http)
    assert out.returncode == 0, out.stderr
    assert len(server.gets("data/tokens.bin")) == 1  # the resume used the cached copy

    records = metrics(tmp_path / "run-url")
    assert records == metrics(tmp_path / "run-local")  # bit-identical losses, evals included
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    saved = json.loads((tmp_path / "run-url/checkpoints/step6/trainer.json").read_text())
    mine = json.loads((tmp_path / "run-local/checkpoints/step6/trainer.json").read_text())
    assert saved["data_files"] == [url]  # the URL as given, not the cache path
    assert saved["data_fingerprint"] == mine["data_fingerprint"]

    # the file on the server changes (same size) and the cache is emptied: the resume check
    # runs on the new cached copy and refuses it
    bin_path = www / "data/tokens.bin"
    bin_path.write_bytes(np.fromfile(bin_path, dtype="<u2")[::-1].tobytes())
    shutil.rmtree(tmp_path / "cache")
    out = kiln_here("train", over_http)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    error = out.stderr.strip().splitlines()[-1]  # after the fetch's own notes
    assert error.startswith("kiln: error: the training data changed"), error
    assert "holds other tokens" in error


# -- interrupted, corrupt and refused downloads ------------------------------------------------


def test_a_fetch_cut_off_resumes_with_only_the_missing_ranges(www, tmp_path, few_retries):
    original = (www / "data/tokens.bin").read_bytes()
    size, cache = len(original), tmp_path / "cache"
    n = -(-size // CHUNK)
    srv = Server(www, drop_after=int(size * 0.45))
    url = srv.url("data/tokens.bin")
    try:
        with pytest.raises(KilnError) as e:
            remote.fetch(url, cache, chunk_bytes=CHUNK, threads=3)
    finally:
        port = srv.port
        srv.stop()
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "resumes" in msg
    folder = remote.entry_dir(url, cache)
    assert not (folder / "tokens.bin").exists() and not (folder / remote.RECORD).exists()
    done = json.loads((folder / ".tokens.bin.part.json").read_text())["done"]
    assert 0 < len(done) < n

    # the command says the same in one line (the server is gone: nothing answers at all)
    config = write_config(tmp_path / "c.yaml", url, tmp_path / "run")
    out = kiln_here("data", "fetch", config, f"--data.cache_dir={cache}")
    assert_one_line_error(out, url)

    srv = Server(www, port=port)  # the server is back
    try:
        got = remote.fetch(url, cache, chunk_bytes=CHUNK, threads=3)
        fetched = srv.gets("data/tokens.bin")
    finally:
        srv.stop()
    missing = [i for i in range(n) if i not in done]
    assert sorted(fetched) == sorted(ranges_of(size, CHUNK, missing))  # each once, no more
    assert got.downloaded == sum(min(size, (i + 1) * CHUNK) - i * CHUNK for i in missing)
    assert got.path.read_bytes() == original
    for name in ("tokens.json", "tokenizer.json"):
        assert (got.path.parent / name).read_bytes() == (www / "data" / name).read_bytes()
    assert not (folder / ".tokens.bin.part").exists()
    assert not (folder / ".tokens.bin.part.json").exists()
    assert len(TokenFile.open(got.path)) == size // 2


def test_a_damaged_cached_copy_is_fetched_again(www, server, tmp_path):
    url, cache = server.url("data/tokens.bin"), tmp_path / "cache"
    original = (www / "data/tokens.bin").read_bytes()
    first = remote.fetch(url, cache, chunk_bytes=CHUNK)
    assert not first.cached and first.path.read_bytes() == original
    assert remote.fetch(url, cache).cached  # verified: no request for the data
    assert len(server.gets("data/tokens.bin")) == -(-len(original) // CHUNK)

    for damage in ("truncate", "flip"):
        with open(first.path, "r+b") as f:
            if damage == "truncate":
                f.truncate(len(original) - 4)
            else:  # same size, one byte of the first MiB changed
                f.seek(100)
                f.write(bytes([original[100] ^ 0xFF]))
        before = len(server.gets("data/tokens.bin"))
        notes: list[str] = []
        again = remote.fetch(url, cache, log=notes.append)
        assert not again.cached and again.path.read_bytes() == original
        assert len(server.gets("data/tokens.bin")) == before + 1
        assert any("damaged" in n for n in notes), notes


def test_a_file_that_disagrees_with_its_sidecar_is_refused(www, server, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    bad = www / "bad"
    shutil.copytree(www / "data", bad)
    data = (bad / "tokens.bin").read_bytes()
    (bad / "tokens.bin").write_bytes(data[:-200])  # the sidecar still says the full count
    url = server.url("bad/tokens.bin")
    tokens = json.loads((bad / "tokens.json").read_text())["tokens"]
    with pytest.raises(KilnError, match=f"sidecar says {tokens:,} uint16 tokens"):
        remote.fetch(url)
    assert server.gets("bad/tokens.bin") == []  # refused on the size the server announced
    assert not (remote.entry_dir(url) / "tokens.bin").exists()
    config = write_config(tmp_path / "c.yaml", url, tmp_path / "run")
    assert_one_line_error(kiln_here("train", config), url, "sidecar")
    assert not (tmp_path / "run").exists()


def test_a_server_without_ranges_is_read_in_one_stream(www, tmp_path):
    srv = Server(www, ranges=False)  # what http.server.SimpleHTTPRequestHandler does
    (www / "data/tokenizer.json").unlink()  # and a 404 for the tokenizer is no error
    try:
        got = remote.fetch(srv.url("data/tokens.bin"), tmp_path / "cache", chunk_bytes=CHUNK)
        assert srv.gets("data/tokens.bin") == [None]
        with pytest.raises(KilnError, match="HTTP 404"):
            remote.fetch(srv.url("data/nothing.bin"), tmp_path / "cache")
    finally:
        srv.stop()
    assert got.path.read_bytes() == (www / "data/tokens.bin").read_bytes()
    assert not (got.path.parent / "tokenizer.json").exists()
    assert TokenFile.open(got.path).eos_token_id == 0  # the sidecar came along


def test_a_body_without_a_length_cut_short_is_never_cached(raw_www, tmp_path):
    # no Content-Length, no sidecar, and the server closes early: what arrived looks whole
    cache = tmp_path / "cache"
    with serving(raw_www, ranges=False, length=False, drop_after=5000) as srv:
        url = srv.url("raw/part-0.bin")
        with pytest.raises(KilnError) as e:
            remote.fetch(url, cache)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "no length" in msg
    assert "--data.trust_unverified=true" in msg
    assert_not_cached(url, cache)


def test_a_body_without_a_length_is_used_only_when_its_end_is_confirmed(raw_www, tmp_path,
                                                                       few_retries):
    original = (raw_www / "raw/part-0.bin").read_bytes()
    cache = tmp_path / "cache"
    with serving(raw_www, ranges=False, chunked=True) as srv:  # the last, empty chunk ends it
        got = remote.fetch(srv.url("raw/part-0.bin"), cache)
    assert got.path.read_bytes() == original

    # every chunk whole but the last (empty) one missing: tried again, then refused
    with serving(raw_www, ranges=False, chunked=True, drop_after=len(original) - 1) as srv:
        url = srv.url("raw/part-0.bin")
        with pytest.raises(KilnError, match="could not fetch"):
            remote.fetch(url, cache)
        assert len(srv.gets("raw/part-0.bin")) == 2
    assert_not_cached(url, cache)

    # a whole body that ends when the connection closes: nothing says it is whole
    with serving(raw_www, ranges=False, length=False) as srv:
        url = srv.url("raw/part-0.bin")
        with pytest.raises(KilnError, match="data.trust_unverified"):
            remote.fetch(url, cache)
        assert_not_cached(url, cache)
        config = write_config(tmp_path / "c.yaml", url, tmp_path / "run")
        data = load_run_config(str(config), [f"--data.cache_dir={cache}",
                                             "--data.trust_unverified=true"]).data
        [path] = remote.localise(data.paths, data, log=None)
    assert path.read_bytes() == original


def test_a_body_that_does_not_match_the_servers_md5_is_refused(raw_www, tmp_path):
    original = (raw_www / "raw/part-0.bin").read_bytes()
    cache = tmp_path / "cache"
    right, wrong = hashlib.md5(original).digest(), hashlib.md5(original[:-2]).digest()
    refused = [  # ranged (the finished file is hashed once), then streamed (hashed as it comes)
        ({"headers": {"Content-MD5": base64.b64encode(wrong).decode()}}, "Content-MD5"),
        ({"ranges": False, "length": False,
          "headers": {"Content-MD5": base64.b64encode(wrong).decode()}}, "Content-MD5"),
        ({"ranges": False, "headers": {"ETag": f'"{wrong.hex()}"'}}, "ETag"),  # S3's MD5 ETag
    ]
    for options, header in refused:
        with serving(raw_www, **options) as srv:
            url = srv.url("raw/part-0.bin")
            with pytest.raises(KilnError, match=header) as e:
                remote.fetch(url, cache, chunk_bytes=4096)
        assert "\n" not in str(e.value) and url in str(e.value)
        assert_not_cached(url, cache)

    accepted = [{"headers": {"ETag": f'"{right.hex()}"'}},  # a digest confirms a body ...
                {"ranges": False, "length": False,  # ... that has no length
                 "headers": {"Content-MD5": base64.b64encode(right).decode()}}]
    for options in accepted:
        with serving(raw_www, **options) as srv:
            got = remote.fetch(srv.url("raw/part-0.bin"), cache, chunk_bytes=4096)
        assert got.path.read_bytes() == original


# -- fsspec ------------------------------------------------------------------------------------


def test_fsspec_file_and_memory_urls(pydoc_tokens, tmp_path):
    fsspec = pytest.importorskip("fsspec", reason="fsspec URLs need the remote extra")
    cache = tmp_path / "cache"
    folder = pydoc_tokens.parent
    got = remote.fetch("file://" + str(pydoc_tokens), cache, chunk_bytes=CHUNK)
    assert got.path.read_bytes() == pydoc_tokens.read_bytes()
    for name in ("tokens.json", "tokenizer.json"):
        assert (got.path.parent / name).read_bytes() == (folder / name).read_bytes()

    mem = fsspec.filesystem("memory")
    try:
        for name in ("tokens.bin", "tokens.json", "tokenizer.json"):
            mem.pipe(f"/kiln-remote-test/{name}", (folder / name).read_bytes())
        urls = remote.data_names(["memory://kiln-remote-test/*.bin"])  # a glob, listed
        assert urls == ["memory:///kiln-remote-test/tokens.bin"]
        [path] = remote.localise(urls, SimpleNamespace(cache_dir=cache, cache_limit_gb=None),
                                 log=None)
        assert path.read_bytes() == pydoc_tokens.read_bytes()
        f = TokenFile.open(path)
        assert f.tokenizer_path is not None and f.tokenizer_path.is_file()
        with pytest.raises(KilnError, match="matches no files"):
            remote.fetch("memory://kiln-remote-test/missing.bin", cache)
    finally:
        mem.rm("/kiln-remote-test", recursive=True)


# -- the cache ---------------------------------------------------------------------------------


def test_eviction_keeps_the_cache_under_its_limit(www, server, tmp_path):
    data = www / "data"
    for name in "abc":
        shutil.copy(data / "tokens.bin", data / f"{name}.bin")
        shutil.copy(data / "tokens.json", data / f"{name}.json")
    urls = {name: server.url(f"data/{name}.bin") for name in "abc"}
    entry = sum((data / n).stat().st_size for n in ("tokens.bin", "tokens.json",
                                                    "tokenizer.json")) + 500
    cfg = SimpleNamespace(cache_dir=tmp_path / "cache", cache_limit_gb=2.5 * entry / 1e9)

    def fetch(name, keep=()):
        return remote.fetch(urls[name], cfg.cache_dir, limit_gb=cfg.cache_limit_gb, keep=keep)

    fetch("a"), fetch("b")
    time.sleep(0.01)
    assert fetch("a").cached  # a is now more recently used than b
    notes: list[str] = []
    remote.fetch(urls["c"], cfg.cache_dir, limit_gb=cfg.cache_limit_gb, log=notes.append)
    assert [n for n in notes if "evicted" in n] and urls["b"] in notes[0]
    assert not remote.entry_dir(urls["b"], cfg.cache_dir).exists()
    assert fetch("a").cached and fetch("c").cached

    # a run that names all three cannot fit them: nothing it uses is evicted, one line says so
    with pytest.raises(KilnError, match="data.cache_limit_gb") as e:
        remote.localise(list(urls.values()), cfg, log=None)
    assert "\n" not in str(e.value)
    assert fetch("a").cached and fetch("c").cached


def test_two_processes_fetch_one_url_once(www, tmp_path):
    srv = Server(www, delay=0.05)  # ~1.5 s for the file: the two surely overlap
    url, cache = srv.url("data/tokens.bin"), tmp_path / "cache"
    code = ("import sys; from kiln.data import remote; "
            "r = remote.fetch(sys.argv[1], sys.argv[2], chunk_bytes=int(sys.argv[3]), "
            "threads=2, log=print); print('RESULT', r.path, r.cached)")
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code, url, str(cache), str(CHUNK)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
        fetched = srv.gets("data/tokens.bin")
    finally:
        srv.stop()
    assert all(p.returncode == 0 for p in procs), outs
    results = [line.split()[1:] for out, _ in outs for line in out.splitlines()
               if line.startswith("RESULT")]
    assert sorted(cached for _, cached in results) == ["False", "True"]  # one fetched
    assert results[0][0] == results[1][0]
    assert any("waiting for another process" in out for out, _ in outs)
    size = (www / "data/tokens.bin").stat().st_size
    assert sorted(fetched) == sorted(ranges_of(size, CHUNK, range(-(-size // CHUNK))))
    assert Path(results[0][0]).read_bytes() == (www / "data/tokens.bin").read_bytes()
