"""Remote data paths: download speed into the cache, and what a URL costs a training step.

A local HTTP server (a subprocess: Python's http.server with byte ranges) serves a token file
of --mb MB (random ids, vocab 512, with a kiln sidecar). Measured:

* cold fetch into an empty cache: ranged (16 MiB ranges, 1 and 4 threads) and one stream (a
  server without ranges), in MB/s;
* a warm fetch (the cached copy verified: size and fingerprint);
* a short CPU training run with data.paths = [URL] (warm cache) and the same run on the local
  file: time in `trainer.loader.next_batch()` (data wait) vs `trainer.train_step` per step.

    python bench/remote_data.py [--mb 150] [--steps 30]

The server and the client share the machine, so the MB/s is that of loopback plus the copy
into the cache, not of a network.
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """http.server plus `Range: bytes=a-b` (206) and Accept-Ranges; --no-ranges: without."""

    ranges = True

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(True)

    def _serve(self, body: bool) -> None:
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and self.ranges and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end, status = int(a), min(int(b or size - 1), size - 1), 206
        self.send_response(status)
        self.send_header("Content-Length", str(end + 1 - start))
        if self.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                left = end + 1 - start
                while left > 0:
                    buf = f.read(min(left, 1 << 20))
                    self.wfile.write(buf)
                    left -= len(buf)


def serve(folder: str, port: int, ranges: bool) -> None:
    RangeHandler.ranges = ranges

    def handler(*a, **kw):
        return RangeHandler(*a, directory=folder, **kw)

    http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


def start_server(folder: Path, ranges: bool) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), str(port)]
                            + ([] if ranges else ["--no-ranges"]))
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(base + "/tokens.json", timeout=1).close()
            return proc, base
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the server did not start")


def make_data(folder: Path, mb: int) -> Path:
    from kiln.data.tokens import TokenWriter

    rng = np.random.default_rng(0)
    path = folder / "tokens.bin"
    with TokenWriter(path, eos_token_id=0, dtype="uint16", vocab_size=512) as w:
        for _ in range(mb):  # documents of ~0.5 M tokens (1 MB)
            w.write(rng.integers(1, 512, 500_000, dtype=np.uint16))
    return path


def train_timing(url_or_path: str, root: Path, cache: Path, steps: int) -> dict:
    import torch

    from kiln.config import config_from_dict
    from kiln.trainer import Trainer

    torch.manual_seed(0)
    run = root / f"run-{len(list(root.glob('run-*')))}"
    cfg = config_from_dict({
        "model": {"d_model": 128, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 384,
                  "vocab_size": 512, "max_seq_len": 256},
        "data": {"paths": [url_or_path], "seq_len": 256, "cache_dir": str(cache)},
        "trainer": {"run_dir": str(run), "global_batch_size": 16, "micro_batch_size": 16,
                    "device": "cpu", "max_duration": 10**6},
        "log": {"console": False},
    })
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup = time.perf_counter() - t0
    wait = step = 0.0
    try:
        for i in range(steps + 3):
            a = time.perf_counter()
            batch = trainer.loader.next_batch()
            b = time.perf_counter()
            trainer.train_step(batch)
            c = time.perf_counter()
            if i >= 3:  # warmup steps left out
                wait, step = wait + b - a, step + c - b
    finally:
        trainer.loader.close()
    return {"setup_s": setup, "wait_ms": 1e3 * wait / steps, "step_ms": 1e3 * step / steps,
            "share": wait / (wait + step)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=150, help="size of the token file in MB")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--no-ranges", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), not args.no_ranges)
        return

    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    from kiln.data import remote

    root = Path(tempfile.mkdtemp(prefix="kiln-remote-bench-"))
    try:
        www = root / "www"
        www.mkdir()
        t = time.perf_counter()
        data = make_data(www, args.mb)
        size = data.stat().st_size
        print(f"token file: {size / 1e6:,.1f} MB (made in {time.perf_counter() - t:.1f} s)")

        servers = {True: start_server(www, True), False: start_server(www, False)}
        try:
            print(f"{'cold fetch':<34} {'MB/s':>8} {'seconds':>8}")
            runs = [("ranged, 16 MiB x 4 threads", True, 4), ("ranged, 16 MiB x 1 thread",
                                                              True, 1),
                    ("one stream (server without ranges)", False, 1)]
            for i, (label, ranges, threads) in enumerate(runs):
                cache = root / f"cache-{i}"
                url = servers[ranges][1] + "/tokens.bin"
                r = remote.fetch(url, cache, threads=threads)
                assert not r.cached and r.path.read_bytes()[:64] == data.read_bytes()[:64]
                print(f"{label:<34} {r.mb_per_s:>8,.1f} {r.seconds:>8.2f}")
            url = servers[True][1] + "/tokens.bin"
            r = remote.fetch(url, root / "cache-0")
            print(f"{'warm fetch (verify cached copy)':<34} {'':>8} {r.seconds:>8.3f}")

            print(f"\ntraining, {args.steps} steps (CPU, d_model 128, 2 layers, batch 16 x 256, "
                  f"{os.cpu_count()} cores)")
            print(f"{'data':<10} {'setup s':>8} {'wait ms':>8} {'step ms':>8} {'wait %':>7}")
            for label, src in (("URL", url), ("local", str(data))):
                m = train_timing(src, root, root / "cache-0", args.steps)
                print(f"{label:<10} {m['setup_s']:>8.2f} {m['wait_ms']:>8.2f} "
                      f"{m['step_ms']:>8.1f} {100 * m['share']:>6.2f}%")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
