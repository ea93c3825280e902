"""Unsharded checkpoints: written atomically, loaded without unpickling arbitrary objects.

Layout of ``RUN_DIR/checkpoints/step{N}/``::

    model.safetensors   weights (a tied output head is stored once, as embed.weight)
    optim.pt            optimizer state dict (tensors and plain numbers; loaded weights_only)
    rng.pt              RNG states (tensors; loaded weights_only)
    trainer.json        step, tokens seen, data position, LR schedule segments, ...
    config.yaml         the resolved config of the run that wrote it
    tokenizer.json      the tokenizer of the training data (when known)
    manifest.json       every other file's size and SHA-256, the kiln version, the config hash

A checkpoint is written to a hidden temporary folder, every file is fsynced, and the folder
is renamed into place; ``checkpoints/latest`` then names it. A crash at any moment leaves
either the old set of checkpoints or the new one, never a half-written ``step{N}``.

Every load checks each file it reads against the manifest, size and SHA-256 (``verify``:
full, size or off; see :func:`verified` and :func:`read_part`): a file truncated, flipped or
swapped for another run's later is refused in one line naming it and the newest checkpoint
that passes. ``kiln checkpoint verify`` checks every file. Checkpoints written before
manifests existed load with a warning that they cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kiln import __version__, faults
from kiln.errors import KilnError, warn
from kiln.files import file_digest, fsync_dir, fsync_file, write_atomic
from kiln.safeload import (
    dcp_load,
    dcp_load_full,
    dcp_root_cause,
    load_pt,
    one_line,
    read_dcp_metadata,
)

STEP_DIR = re.compile(r"^step(\d+)$")
REQUIRED = ("trainer.json", "config.yaml")
MANIFEST = "manifest.json"
SHARDED = "dcp"  # folder of a sharded checkpoint written by torch.distributed.checkpoint


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    trainer: dict[str, Any]
    config: dict[str, Any]
    optim: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None

    @property
    def step(self) -> int:
        return int(self.trainer["step"])


# --------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path, need: tuple[str, ...] = REQUIRED) -> bool:
    return path.is_dir() and not missing_parts(path, need)


def is_sharded(path: Path) -> bool:
    return (path / SHARDED / ".metadata").is_file()


def weights_path(path: Path) -> Path:
    """Where a checkpoint's weights live: model.safetensors, or the dcp/ folder if sharded."""
    return path / (SHARDED if is_sharded(path) else "model.safetensors")


def list_checkpoints(run_dir: str | Path, need: tuple[str, ...] = REQUIRED) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and is_complete(p, need):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def missing_parts(path: Path, need: tuple[str, ...] = REQUIRED) -> list[str]:
    """The files a checkpoint folder needs (`need` and its weights) but lacks."""
    want = list(need) + ([] if is_sharded(path) else ["model.safetensors"])
    return [f for f in want if not (path / f).is_file()]


def _pointer(root: Path) -> str | None:
    """The folder name `latest` holds; None when it is missing or holds no step name (a
    garbled pointer, e.g. bytes that are not text, falls back like a missing one)."""
    try:
        name = (root / "latest").read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if STEP_DIR.match(name) else None


def latest_checkpoint(run_dir: str | Path, need: tuple[str, ...] = REQUIRED) -> Path | None:
    """The checkpoint `latest` names. kiln points `latest` only at complete checkpoints, so a
    damaged one there was damaged afterwards: that is refused rather than silently replaced
    by an older one. A pointer that is missing, garbled or names a folder that is gone falls
    back, with a warning, to the newest complete checkpoint. `need` names the files the
    caller reads besides the weights (a weights-only command needs config.yaml alone)."""
    root = checkpoints_dir(run_dir)
    pointer = root / "latest"
    found = list_checkpoints(run_dir, need)
    name = _pointer(root)
    if name is not None:
        candidate = root / name
        if is_complete(candidate, need):
            return candidate
        if candidate.is_dir():
            older = (f"; to resume from {found[-1].name}: kiln train {run_dir} "
                     f"--resume-from={found[-1].name}" if found else "")
            gone = ", ".join(str(candidate / f) for f in missing_parts(candidate, need))
            raise KilnError(f"checkpoint {candidate.name} (named by {pointer}) is damaged: "
                            f"{gone} missing{older}")
    if found and (pointer.exists() or pointer.is_symlink()):
        what = f"names {name!r}, which does not exist" if name else "is not a checkpoint name"
        warn(f"{pointer} {what}; using {found[-1]}, the newest complete checkpoint")
    return found[-1] if found else None


STATE_PARTS = ["model.safetensors", "optim.pt", "rng.pt", SHARDED]
WEIGHT_PARTS = ["model.safetensors", SHARDED]
META_PARTS = ["trainer.json", "config.yaml"]


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def resume_point(run_dir: str | Path, resume_from: str | None = None,
                 verify: str = "full") -> Path | None:
    """The checkpoint `kiln train RUN_DIR` resumes from: the one `latest` names, or the
    `--resume-from` one. Refused when its weights are not the size the manifest records,
    offering the newest earlier checkpoint that passes (contents are hashed when the run
    loads them, see load_into; a plan reads the weights' headers alone).

    A `latest` that names an older checkpoint than the newest complete one is refused (a plain
    resume would go back and replace the newer ones without a word), unless the newer ones were
    renamed into place after `latest` was last written: a save killed between its rename and
    the pointer's update, whose checkpoint is then the one resumed."""
    root = checkpoints_dir(run_dir)
    if resume_from is not None:
        name = resume_from if resume_from.startswith("step") else f"step{resume_from}"
        p = root / name
        if not STEP_DIR.match(name) or not is_complete(p):
            have = ", ".join(c.name for c in list_checkpoints(run_dir)) or "none"
            raise KilnError(f"--resume-from={resume_from}: {p} is not a complete checkpoint; "
                            f"complete ones in {root}: {have}")
        if problems := size_problems(p, WEIGHT_PARTS, verify):
            raise KilnError(f"--resume-from={resume_from}: {problems[0]}; "
                            f"{passing_offer(p, verify)}")
        return p
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    newer = [c for c in list_checkpoints(run_dir) if step_of(c) > step_of(latest)]
    if newer:
        pointer = root / "latest"
        if all(c.stat().st_ctime_ns > pointer.stat().st_mtime_ns for c in newer):
            warn(f"{newer[-1]} was saved after {pointer} was last written (a save stopped "
                 f"before it named its checkpoint); resuming from {newer[-1].name}")
            latest = newer[-1]
        else:
            raise KilnError(
                f"{pointer} names {latest.name}, but newer complete checkpoints exist "
                f"({', '.join(c.name for c in newer)}); a plain resume would go back and replace "
                f"them: resume from the newest with kiln train {run_dir} "
                f"--resume-from={newer[-1].name}, or from {latest.name} with "
                f"--resume-from={latest.name} (the newer ones are then kept aside)")
    if problems := size_problems(latest, WEIGHT_PARTS, verify):
        raise KilnError(f"{problems[0]}, so {latest.name} cannot be resumed; "
                        f"{passing_offer(latest, verify)}")
    return latest


def passing_offer(bad: Path, verify: str = "full") -> str:
    """The way on from a checkpoint that failed verification: the newest earlier checkpoint of
    its run that passes (checked newest first, in the same `verify` mode) and the command that
    resumes from it."""
    if bad.parent.name != "checkpoints" or not STEP_DIR.match(bad.name):
        return "restore the file from a copy"
    run_dir = bad.parent.parent
    for c in reversed(list_checkpoints(run_dir)):
        if step_of(c) < step_of(bad) and not verify_parts(c, STATE_PARTS + META_PARTS, verify):
            return (f"the newest checkpoint that passes is {c.name}: kiln train {run_dir} "
                    f"--resume-from={c.name} resumes from it")
    return "no earlier checkpoint passes; restore the file from a copy"


def rewind_to(run_dir: str | Path, source: Path) -> None:
    """Make `source` the latest checkpoint (for --resume-from). Every newer checkpoint folder
    is kept aside, never deleted nor overwritten: as stepN-damaged-K when it is incomplete or
    fails its size check, else as stepN-aside-K (so a later plain resume does not meet newer
    checkpoints than `latest`)."""
    root = checkpoints_dir(run_dir)
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        if STEP_DIR.match(p.name) and p.is_dir() and step_of(p) > step_of(source):
            damaged = not is_complete(p) or verify_parts(p, STATE_PARTS, "size")
            aside = _put_aside(p, "damaged" if damaged else "aside")
            warn(f"{p} is {'damaged' if damaged else 'newer than ' + source.name}; kept it as "
                 f"{aside} (resuming from {source.name}; delete it when no longer needed)")
    _point_latest(root, source.name)


def _put_aside(p: Path, why: str = "damaged") -> Path:
    n = 1
    while (aside := p.with_name(f"{p.name}-{why}-{n}")).exists():
        n += 1
    os.rename(p, aside)
    return aside


def _point_latest(root: Path, name: str) -> None:
    write_atomic(root / "latest", name + "\n")  # through .latest.tmp
    fsync_dir(root)


WEIGHTS_ONLY = ("config.yaml",)
"""What a command that reads the weights alone needs besides them (generate, export, eval)."""


def resolve(path: str | Path, need: tuple[str, ...] = REQUIRED) -> Path:
    """A checkpoint folder from either a RUN_DIR (its latest checkpoint) or a checkpoint.
    `need`: the files the caller reads besides the weights (WEIGHTS_ONLY: config.yaml)."""
    p = Path(path)
    if is_complete(p, need):
        return p
    if p.is_dir() and STEP_DIR.match(p.name) and not checkpoints_dir(p).is_dir():
        gone = ", ".join(str(p / f) for f in missing_parts(p, need))
        raise KilnError(f"checkpoint {p} is damaged: {gone} missing; "
                        f"{passing_offer(p, 'size')}")
    if p.is_dir():
        latest = latest_checkpoint(p, need)
        if latest is not None:
            return latest
        raise KilnError(f"{str(p)!r} holds no complete checkpoint (no checkpoints/step*/)")
    raise KilnError(f"checkpoint or run directory {str(p)!r} does not exist")


# --------------------------------------------------------------------------------------------
# Saving


def dedupe_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop entries that share storage with an earlier entry (a tied output head)."""
    out, seen = {}, set()
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().contiguous().cpu()
    return out


def temp_dir(run_dir: str | Path, step: int, clean: bool = True) -> Path:
    """The hidden folder a checkpoint of `step` is written into before its rename (the same
    name on every rank, so all ranks of a sharded save write into it)."""
    root = checkpoints_dir(run_dir)
    if clean:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step*"):  # left by a crash in an earlier save
            _remove(stale)
        for gone in root.glob(".del-step*"):  # a crash during retention
            _remove(gone)
        for old in root.glob(".old-step*"):  # a crash mid-swap: delete only if replaced
            if is_complete(root / old.name[len(".old-"):].rsplit("-", 1)[0]):
                _remove(old)
    return root / f".tmp-step{step}"


def _remove(p: Path) -> None:
    """Remove a stale temporary name: a folder with its contents, a file or a link (never
    followed), so that nothing planted there blocks a save."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def save_sharded_state(state: dict[str, Any], tmp: Path) -> None:
    """All ranks: write their shards of `state` ({"model": ..., "optim": ...}) into tmp/dcp."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save")
            dcp.save(state, checkpoint_id=str(tmp / SHARDED))
    except (Exception, CheckpointException) as e:  # disk full, permissions: same promise as
        shutil.rmtree(tmp, ignore_errors=True)  # the unsharded save
        raise KilnError(f"could not write sharded checkpoint shards in {tmp} "
                        f"({save_failure(dcp_root_cause(e), tmp.parent)}); earlier checkpoints "
                        "are untouched and the partial one was removed; free disk space and "
                        "resume") from None


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the files in a checkpoint folder (shards included)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_bytes(run_dir: str | Path) -> tuple[int, Path]:
    """(free bytes, folder measured) on the volume that holds RUN_DIR/checkpoints."""
    where = checkpoints_dir(run_dir)
    while not where.exists():
        where = where.parent
    return shutil.disk_usage(where).free, where


def save_failure(e: BaseException, where: Path) -> str:
    """One line on why a write failed, with the free space where it was written."""
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:,.1f} MiB free in {where}"
    except OSError:
        free = f"free space in {where} unknown"
    text = one_line(getattr(e, "strerror", None) or e)
    if "No space left" in text or getattr(e, "errno", None) == 28 or "unexpected pos" in text:
        text = "no space left on device"
    return f"{text[:160]}; {free}"


def save(run_dir: str | Path, step: int, *, model: dict[str, torch.Tensor] | None,
         trainer: dict[str, Any], config_yaml: str, optim: dict[str, Any] | None = None,
         rng: dict[str, Any] | None = None, tokenizer: Path | None = None,
         keep_last: int = 0, tmp: Path | None = None) -> Path:
    """Write checkpoint step{step} atomically, point `latest` at it, apply retention.

    For a sharded checkpoint, pass model=None and the `tmp` folder the ranks already wrote
    their shards into (see temp_dir / save_sharded_state); only rank 0 calls this."""
    root = checkpoints_dir(run_dir)
    final = root / f"step{step}"
    if tmp is None:
        tmp = temp_dir(run_dir, step)
        tmp.mkdir()
    try:
        if model is not None:
            save_file(dedupe_tied(model), str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
        faults.save(step)  # a drill (KILN_FAULT_SAVE)
        if optim is not None:
            torch.save(optim, tmp / "optim.pt")
        if rng is not None:
            torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        if tokenizer is not None and Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        write_manifest(tmp, step)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        old = None
        if final.exists() and not is_complete(final):  # damaged by hand: keep it aside
            aside = _put_aside(final)
            warn(f"{final} was damaged ({', '.join(missing_parts(final))} missing); kept it as "
                 f"{aside} and wrote a new {final.name}")
        elif final.exists():  # a step{N} written before a rewind: swap, then delete it
            old = root / f".old-step{step}-0"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
        _point_latest(root, final.name)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - OSError, torch's and safetensors' own errors
        shutil.rmtree(tmp, ignore_errors=True)
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.unlink(missing_ok=True)
        raise KilnError(
            f"could not write checkpoint {final} ({save_failure(e, root)}); earlier checkpoints "
            f"are untouched and the partial one was removed; free disk space and resume: kiln "
            f"train {run_dir}"
        ) from None
    if keep_last > 0:
        prune(run_dir, keep_last)
    return final


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never the latest one)."""
    keep_last = max(1, keep_last)
    found = list_checkpoints(run_dir)
    latest = latest_checkpoint(run_dir)
    removed = []
    for p in found[:-keep_last]:
        if p == latest:
            continue
        gone = p.with_name(f".del-{p.name}")  # renamed first: a kill mid-delete leaves no
        os.rename(p, gone)  # half-deleted step{N}, and .del-* is removed by the next save
        shutil.rmtree(gone, ignore_errors=True)
        removed.append(p)
    return removed


# --------------------------------------------------------------------------------------------
# Manifests: what a checkpoint held when it was written


def sha256_of(f: Path) -> str:
    return file_digest(f, "sha256")


def write_manifest(folder: Path, step: int) -> None:
    """Record the size and SHA-256 of every file in `folder` (shards included), read back
    from the page cache right after writing, in folder/manifest.json."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST)
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL
        digests = list(pool.map(sha256_of, files))
    config = folder / "config.yaml"
    manifest = {
        "kiln_version": __version__,
        "step": step,
        "config_sha256": sha256_of(config) if config.is_file() else None,
        "files": {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": d}
                  for f, d in zip(files, digests)},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(path: Path) -> dict[str, dict[str, Any]] | None:
    """{file: {"bytes", "sha256"}} from a checkpoint's manifest; None for a checkpoint written
    before manifests. A damaged manifest is refused in one line."""
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        files = json.loads(f.read_text())["files"]
        ok = isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int)
            and isinstance(e.get("sha256"), str) and not Path(name).is_absolute()
            and ".." not in Path(name).parts for name, e in files.items())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KilnError(f"{f} is damaged ({one_line(e)[:80]}); restore it, or delete it to load "
                        "the checkpoint without size checks") from None
    if not ok:
        raise KilnError(f"{f} is damaged (a file entry is not {{bytes, sha256}}); restore it, or "
                        "delete it to load the checkpoint without size checks")
    return files


# Verifying what is read against the manifest. Every command checks the parts it reads:
# "full" compares size and SHA-256, "size" the size alone, "off" nothing. Small files are
# hashed from the bytes the command reads (read once); large ones (weights, optimizer state,
# shards) in threads beside the load, and nothing loaded is used before they pass.

VERIFY_MODES = ("full", "size", "off")


def _selected(files: dict[str, Any], parts: list[str] | None) -> list[str]:
    return [n for n in files if parts is None or n in parts or n.split("/")[0] in parts]


def _warn_unverified(path: Path) -> None:
    warn(f"{path} has no {MANIFEST} (written by an earlier kiln, or copied without it): its "
         "files cannot be verified")


def _size_problem(path: Path, name: str, entry: dict[str, Any] | None) -> str | None:
    f = path / name
    if entry is None:
        return (f"{f} is not in the manifest written at save (added after it); remove it, or "
                "restore the checkpoint's own file" if f.is_file() else None)
    if not f.is_file():
        return f"{f} is missing (the manifest written at save lists it)"
    if (size := f.stat().st_size) != entry["bytes"]:
        return (f"{f} differs from the manifest written at save: {size:,} bytes, not "
                f"{entry['bytes']:,} (truncated or replaced)")
    return None


def _hash_problem(f: Path, entry: dict[str, Any], digest: str) -> str | None:
    if digest == entry["sha256"]:
        return None
    return (f"{f} differs from the manifest written at save: its SHA-256 is {digest[:12]}..., "
            f"not {entry['sha256'][:12]}... (changed after it was written)")


_ahead: dict[tuple, Any] = {}  # (file, size, mtime, inode) -> Future of its SHA-256
_pool: list[Any] = []


def _file_key(f: Path) -> tuple:
    st = f.stat()
    return (str(f), st.st_size, st.st_mtime_ns, st.st_ino)


def hash_ahead(path: Path, parts: list[str], verify: str = "full") -> None:
    """Start hashing the files of checkpoint `path` named by `parts` now, in background
    threads (under torch.distributed, this rank's share), so that the hashing overlaps what
    comes before the load (a run calls this as soon as it knows its checkpoint, before it
    builds the model); the load's check then takes these digests. A file changed meanwhile is
    hashed again."""
    from concurrent.futures import ThreadPoolExecutor

    if verify != "full":
        return
    try:
        files = read_manifest(path)
    except KilnError:
        return  # the load refuses it
    if not files:
        return
    if not _pool:
        _pool.append(ThreadPoolExecutor(max_workers=4, thread_name_prefix="kiln-hash"))
    rank, world = _distributed()
    for name in _selected(files, parts)[rank::world]:
        f = path / name
        if f.is_file():
            key = _file_key(f)
            if key not in _ahead:
                _ahead[key] = _pool[0].submit(sha256_of, f)


def _digest(f: Path) -> str:
    ahead = _ahead.pop(_file_key(f), None)
    return ahead.result() if ahead is not None else sha256_of(f)


def _hash_all(path: Path, files: dict[str, Any], names: list[str]) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(4, len(names))) as pool:  # hashlib frees the GIL
        digests = list(pool.map(lambda n: _digest(path / n), names))
    return [p for n, d in zip(names, digests) if (p := _hash_problem(path / n, files[n], d))]


def verify_parts(path: Path, parts: list[str] | None, verify: str = "full") -> list[str]:
    """How the files of checkpoint `path` named by `parts` (files, or folders such as "dcp";
    None: every file) differ from its manifest: missing, another size, or (verify="full")
    other contents. [] for a checkpoint without a manifest (with a one-line warning)."""
    if verify == "off":
        return []
    files = read_manifest(path)
    if files is None:
        _warn_unverified(path)
        return []
    names = _selected(files, parts)
    extra = [n for n in parts or [] if n not in files and "/" not in n and n != SHARDED]
    problems = [p for n in names + extra if (p := _size_problem(path, n, files.get(n)))]
    if problems or verify != "full":
        return problems
    return _hash_all(path, files, names)


def size_problems(path: Path, parts: list[str] | None, verify: str = "full") -> list[str]:
    """The cheap half of :func:`verify_parts` (sizes only; nothing under verify="off"), for
    checks made before a load that hashes the contents anyway."""
    return verify_parts(path, parts, "off" if verify == "off" else "size")


def add_verify_argument(parser, default: str = "full") -> None:
    """--verify for a command that reads a checkpoint."""
    parser.add_argument("--verify", choices=VERIFY_MODES, default=default,
                        help="check the checkpoint files read against the manifest written at "
                        f"save: full (size and SHA-256), size, off (default {default})")


def refusal(path: Path, problem: str, verify: str = "full") -> KilnError:
    """A failed part of checkpoint `path`, in one line with the newest checkpoint that passes."""
    return KilnError(f"{problem}; {passing_offer(path, verify)}")


def read_part(path: Path, name: str, verify: str = "full") -> bytes:
    """The bytes of a small checkpoint file, checked against the manifest as they are read
    (one read: the hash is taken of these very bytes)."""
    f = path / name
    try:
        data = f.read_bytes()
    except OSError as e:
        raise _damaged(f, e.strerror or str(e)) from None
    if verify == "off":
        return data
    files = read_manifest(path)
    if files is None:
        _warn_unverified(path)
        return data
    problem = _size_problem(path, name, files.get(name))
    if problem is None and verify == "full":
        problem = _hash_problem(f, files[name], hashlib.sha256(data).hexdigest())
    if problem:
        raise refusal(path, problem, verify)
    return data


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def verified(path: Path, parts: list[str], verify: str = "full"):
    """For loading `parts` of checkpoint `path`: sizes are checked first, then the files are
    hashed in a thread while the body loads them; on exit a difference is refused in one line
    (also when the body failed: a damaged file explains a failed load best). Under
    torch.distributed every rank hashes its share of the files and all learn the verdict, so
    every rank must enter (as every rank loads)."""
    if verify == "off":
        yield
        return
    files = read_manifest(path)
    if files is None:
        _warn_unverified(path)
        yield
        return
    names = _selected(files, parts)
    if problems := [p for n in names if (p := _size_problem(path, n, files[n]))]:
        raise refusal(path, problems[0], verify)
    if verify != "full":  # sizes only: nothing to hash, nothing to agree on
        yield
        return
    rank, world = _distributed()
    found: list[str] = []
    mine = names[rank::world]
    worker = threading.Thread(target=lambda: found.extend(_hash_all(path, files, mine)),
                              name="kiln-verify", daemon=True)
    worker.start()
    try:
        yield
    except BaseException:
        worker.join()
        if found:
            raise refusal(path, found[0], verify) from None
        raise
    worker.join()
    if world > 1:
        import torch.distributed as dist

        everyone: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(everyone, found)
        found = [p for ps in everyone for p in ps]
    if found:
        raise refusal(path, found[0], verify)


# --------------------------------------------------------------------------------------------
# Loading


def read_meta(path: Path, verify: str = "full") -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, config) of a checkpoint folder, without reading any tensor. Both files
    are checked against the manifest and field by field (every field kiln reads is there and
    of its type, the config is a valid kiln config), so a damaged or swapped one is refused
    here in one line that names it."""
    return read_trainer_state(path, verify), read_config_dict(path, verify)


def _damaged(f: Path, what: str) -> KilnError:
    return KilnError(f"{f} is damaged ({what}); restore the file the run wrote, or use an "
                     "earlier checkpoint")


def read_trainer_state(path: Path, verify: str = "full") -> dict[str, Any]:
    """A checkpoint's trainer.json, checked against the manifest and field by field; its step
    must be the folder's (stepN)."""
    from kiln.schedule import LRSchedule

    f = path / "trainer.json"
    try:
        state = json.loads(read_part(path, "trainer.json", verify).decode("utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise _damaged(f, f"not valid JSON: {one_line(e)[:100]}") from None
    if not isinstance(state, dict):
        raise _damaged(f, "not a JSON object")

    def need(obj: dict, key: str, where: str = "") -> Any:
        if key not in obj:
            raise _damaged(f, f"no {where}{key!r}")
        return obj[key]

    for key in ("step", "tokens_seen", "total_steps"):
        v = need(state, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _damaged(f, f"{key!r} is {v!r}, not a count")
    if STEP_DIR.match(path.name) and state["step"] != step_of(path):
        raise _damaged(f, f"it is the state of step {state['step']}, in folder {path.name}; "
                       "it comes from another checkpoint")
    data = need(state, "data")
    if not isinstance(data, dict):
        raise _damaged(f, "'data' is not an object")
    for key in ("epoch", "tokens_in_epoch"):
        v = need(data, key, "data.")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _damaged(f, f"'data.{key}' is {v!r}, not a count")
    try:
        sched = LRSchedule.from_state(need(state, "schedule"))
        for seg in sched.segments:
            seg.lr(seg.start)  # an unknown shape raises
            if not all(map(_finite_number, (seg.lr_start, seg.lr_end))):
                raise ValueError("an LR that is not a finite number")
            if seg.shape == "inv_sqrt" and not (_finite_number(seg.timescale)
                                                and seg.timescale >= 0):
                raise ValueError("an inv_sqrt segment without a timescale >= 0")
    except KilnError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise _damaged(f, f"its LR schedule cannot be read: {one_line(e)}") from None
    return state


def _finite_number(x: Any) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_config_dict(path: Path, verify: str = "full") -> dict[str, Any]:
    """A checkpoint's config.yaml as a dict, checked against the manifest and refused unless
    it is a valid kiln config."""
    from kiln.config import config_from_dict, load_yaml_text

    f = path / "config.yaml"
    try:
        text = read_part(path, "config.yaml", verify).decode("utf-8")
    except UnicodeDecodeError:
        raise _damaged(f, "not text") from None
    raw = load_yaml_text(text, f)
    if not isinstance(raw, dict):
        raise _damaged(f, "not a YAML mapping of config sections")
    try:
        config_from_dict(raw)
    except KilnError as e:
        raise _damaged(f, str(e).split(";")[0]) from None
    return raw


def read_tokenizer(path: Path, verify: str = "full"):
    """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer`, checked against the
    manifest; one line when it is missing, swapped or damaged."""
    from kiln.data.tokenizers import load_tokenizer

    f = path / "tokenizer.json"
    if not f.is_file():
        raise KilnError(f"{f} is missing; pass the tokenizer the model was trained with: "
                        "--tokenizer PATH")
    return load_tokenizer(f, read_part(path, "tokenizer.json", verify))


def tensor_shapes(path: Path, verify: str = "full") -> dict[str, tuple[int, ...]]:
    """Names and shapes of the stored weights, read from file headers only (the weights'
    sizes are checked against the manifest; their contents are hashed when they are loaded)."""
    if problems := size_problems(path, WEIGHT_PARTS, verify):
        raise refusal(path, problems[0], verify)
    if is_sharded(path):
        meta = read_dcp_metadata(path / SHARDED).state_dict_metadata
        shapes = {k[len("model."):]: tuple(v.size) for k, v in meta.items()
                  if k.startswith("model.") and hasattr(v, "size")}
        config = read_config_dict(path, verify)
        if config.get("model", {}).get("tie_embeddings"):  # stored under both names there
            shapes.pop("lm_head.weight", None)
        return shapes
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise KilnError(f"cannot read {path / 'model.safetensors'}: {one_line(e)}; the file is "
                        "damaged") from None


def read_sharded_full(path: Path, verify: str = "full") -> dict[str, Any]:
    """{"model": full tensors, "optim": ...} of a sharded checkpoint folder, in one process."""
    with verified(path, [SHARDED], verify):
        state = dcp_load_full(path / SHARDED)
    if not isinstance(state.get("model"), dict):
        raise KilnError(f"sharded checkpoint {path} holds no model state; it is damaged")
    return state


def read_weights(path: Path, verify: str = "full") -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint folder of either format, verified as they load."""
    if is_sharded(path):
        return read_sharded_full(path, verify)["model"]
    with verified(path, ["model.safetensors"], verify):
        try:
            return load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError) as e:
            raise KilnError(f"cannot read {path / 'model.safetensors'}: {one_line(e)}; the file "
                            "is damaged") from None


def load(path: str | Path, *, with_optim: bool = True, with_rng: bool = False,
         verify: str = "full") -> Checkpoint:
    """Read an unsharded checkpoint (a checkpoint folder, or a RUN_DIR meaning its latest);
    the trainer state, optimizer and RNG state only `with_optim` (what needs the weights alone
    reads the weights and config.yaml alone, so a damaged trainer.json or optim.pt does not
    stop it). Every part read is verified against the manifest."""
    p = resolve(path, REQUIRED if with_optim else WEIGHTS_ONLY)
    config = read_config_dict(p, verify)
    trainer = read_trainer_state(p, verify) if with_optim else {}
    rng = None
    if with_rng and (p / "rng.pt").is_file():
        rng = load_pt(p / "rng.pt", data=read_part(p, "rng.pt", verify))
    with_optim = with_optim and (p / "optim.pt").is_file()
    with verified(p, ["model.safetensors"] + ["optim.pt"] * with_optim, verify):
        try:
            model = load_file(str(p / "model.safetensors"))
        except (SafetensorError, OSError) as e:
            raise KilnError(f"cannot read {p / 'model.safetensors'}: {one_line(e)}; the file "
                            "is damaged") from None
        optim = load_pt(p / "optim.pt") if with_optim else None
    return Checkpoint(path=p, model=model, trainer=trainer, config=config, optim=optim, rng=rng)


def read_rng(f: Path, device: torch.device, verify: str = "full") -> dict[str, torch.Tensor]:
    """A checkpoint's rng.pt, verified against the manifest and checked to hold the generator
    states this device restores."""
    rng = load_pt(f, data=read_part(f.parent, f.name, verify))
    need = ["cpu"] + (["cuda"] if device.type == "cuda" else [])
    for key in need:
        t = rng.get(key) if isinstance(rng, dict) else None
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            if key == "cuda" and isinstance(rng, dict) and "cpu" in rng:
                warn(f"{f} has no CUDA generator state (written on CPU); GPU random numbers "
                     "start fresh")
                continue
            raise KilnError(f"{f} holds no {key} generator state; it is not this run's rng.pt: "
                            "restore the file the run wrote")
    try:  # a byte tensor of the wrong length is refused by torch: try it on a scratch copy
        torch.Generator().set_state(rng["cpu"])
    except RuntimeError as e:
        raise KilnError(f"{f} holds a cpu generator state torch rejects ({one_line(e)[:80]}); "
                        "restore the file the run wrote") from None
    return {k: rng[k] for k in need if k in rng}


def check_shapes(saved: dict[str, Any], model_state: dict[str, torch.Tensor],
                 where: Path, tied: bool | None = None) -> None:
    """Refuse a checkpoint written by another model shape, naming the first mismatch.

    `saved` maps names to tensors or to shapes (see tensor_shapes)."""
    if tied is None and "lm_head.weight" in model_state and "embed.weight" in model_state:
        tied = model_state["lm_head.weight"].data_ptr() == model_state["embed.weight"].data_ptr()
    for name, t in model_state.items():
        if name not in saved:
            if name == "lm_head.weight" and "embed.weight" in saved:
                if tied:
                    continue  # a tied head is saved once
                raise KilnError(
                    f"{where} has a tied output head (model.tie_embeddings=true) but "
                    "this model is untied; set model.tie_embeddings=true"
                )
            raise KilnError(
                f"{where} has no tensor {name!r}: it was written by a different "
                "model shape; use the model config it was trained with or another run_dir"
            )
        shape = tuple(getattr(saved[name], "shape", saved[name]))
        if shape != tuple(t.shape):
            raise KilnError(
                f"{where} was written by a different model shape: {name} is "
                f"{list(shape)} there and {list(t.shape)} here; use the model "
                "config it was trained with or another run_dir"
            )
    if tied and "lm_head.weight" in saved and "embed.weight" in saved:
        raise KilnError(
            f"{where} has a separate output head (model.tie_embeddings=false) but "
            "this model ties it to the embedding; set model.tie_embeddings=false"
        )
    extra = [k for k in saved if k not in model_state]
    if extra:
        raise KilnError(
            f"{where} has tensor {extra[0]!r} that this model lacks: it was written "
            "by a different model shape"
        )


# --------------------------------------------------------------------------------------------
# Model + optimizer state at any world size (plain, DDP or FSDP2-sharded modules)


def gather_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Full (unsharded) model and optimizer state on CPU; with FSDP, on rank 0 only (all ranks
    must call). Optimizer state is keyed by parameter name, so it loads into any layout."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        msd, osd = get_model_state_dict(model, options=opts), None
    else:
        msd, osd = get_state_dict(model, optimizer, options=opts)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.tie_embeddings:  # gathered shards are separate tensors: the
        msd.pop("lm_head.weight", None)  # tied head is saved once, as embed.weight
    return msd, osd


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                  ) -> dict[str, Any]:
    """This rank's shards, in the layout torch.distributed.checkpoint saves and loads."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def load_into(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
              tied: bool, verify: str = "full") -> None:
    """Load a checkpoint's weights (and optimizer state if `optimizer`) into `model`, whatever
    the checkpoint's format (unsharded or sharded) and the model's (plain or sharded, any
    world size): torch.distributed.checkpoint reshards as needed. The files read are verified
    against the manifest while they load (`verify`); under torch.distributed every rank must
    call this."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    if is_sharded(path):
        state = sharded_state(model, optimizer)
        with verified(path, [SHARDED], verify):
            dcp_load(state, path / SHARDED)
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        return
    c = load(path, with_optim=optimizer is not None, verify=verify)
    msd = dict(c.model)
    if (tied and "lm_head.weight" in msd and "embed.weight" in msd
            and torch.equal(msd["lm_head.weight"], msd["embed.weight"])):
        del msd["lm_head.weight"]  # a tied head stored twice (unsharded by an older kiln)
    check_shapes(msd, model.state_dict(), path / "model.safetensors", tied=tied)
    if tied and "lm_head.weight" not in msd and "embed.weight" in msd:
        msd["lm_head.weight"] = msd["embed.weight"]
    opts = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_model_state_dict(model, msd, options=opts)
        return
    if c.optim is None:
        raise KilnError(f"{path / 'optim.pt'} is missing, so {path} holds no optimizer state; "
                        "start with a fresh optimizer: init.load_optimizer=false")
    check_optim_state(c.optim, model, path / "optim.pt")
    try:
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=c.optim,
                       options=opts)
    except (KeyError, ValueError, RuntimeError) as e:
        raise KilnError(f"optimizer state in {path} does not fit this model: {e}") from e


def check_resumable(path: Path, run_dir: Path, verify: str = "full") -> None:
    """Refuse to resume from a checkpoint that lacks a part an exact resume needs, or whose
    parts differ in size from its manifest (contents are hashed as they load)."""
    gone = [n for n in resume_parts(path) if not (path / n).is_file()]
    if gone:
        f = path / gone[0]
        fresh = " --init.load_optimizer=false" if gone[0] == "optim.pt" else ""
        raise KilnError(
            f"{f} is missing, so {path.name} cannot be resumed exactly; restore the file, or "
            f"start a new run from its weights: kiln train {run_dir} "
            f"--trainer.run_dir=NEW_DIR --init.from={path}{fresh}"
        )
    if problems := size_problems(path, STATE_PARTS, verify):
        raise KilnError(f"{problems[0]}, so {path.name} cannot be resumed; "
                        f"{passing_offer(path, verify)}")


def resume_parts(path: Path) -> list[str]:
    """The files beyond weights and metadata that an exact resume needs (a sharded
    checkpoint keeps its optimizer state in dcp/)."""
    return ["optim.pt", "rng.pt"] if not is_sharded(path) else ["rng.pt"]


def resume_problems(path: Path, verify: str = "full") -> list[str]:
    """Reasons (no tensor read) why `path` cannot be resumed exactly: parts that are missing,
    torch files whose archive is truncated, files that differ from the manifest."""
    import zipfile

    problems = []
    for name in resume_parts(path):
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            problems.append(f"{name} is damaged ({one_line(e)[:60]})")
    try:
        sizes = verify_parts(path, STATE_PARTS, verify)
    except KilnError:
        return [*problems, f"{MANIFEST} is damaged"]
    named = " ".join(problems)
    return problems + [p.removeprefix(f"{path}/") for p in sizes
                       if p.removeprefix(f"{path}/").split()[0] not in named]


def check_optim_state(osd: Any, model: torch.nn.Module, where: Path) -> None:
    """Refuse optimizer state that does not hold Adam state for every trained parameter (a
    foreign or emptied optim.pt would silently restart Adam)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = osd.get("state") if isinstance(osd, dict) else None
    if not isinstance(state, dict) or not isinstance(osd.get("param_groups"), list):
        raise KilnError(f"{where} is not an optimizer state dict (no state / param_groups); "
                        "replace it with the file the run wrote")
    missing = [n for n in names if not isinstance(state.get(n), dict) or "exp_avg" not in
               state[n]]
    if missing:
        raise KilnError(f"{where} has no Adam state for {len(missing)} of {len(names)} "
                        f"parameters (e.g. {missing[0]!r}); it is not this run's optimizer "
                        "state: replace it with the file the run wrote, or start a new run "
                        "from these weights with a fresh optimizer (init.load_optimizer=false)")


def unshard(src: str | Path, out: str | Path, verify: str = "full") -> Path:
    """Turn a sharded checkpoint into the unsharded format (a complete checkpoint folder).
    Every file it carries over is verified first: the new manifest must not vouch for a
    damaged part."""
    src = resolve(src)
    out = Path(out)
    if not is_sharded(src):
        raise KilnError(f"{src} is not a sharded checkpoint (no {SHARDED}/.metadata)")
    if out.exists():
        raise KilnError(f"{out} exists; choose a new output folder")
    trainer, config = read_meta(src, verify)
    listed = (read_manifest(src) or {}) if verify != "off" else {}
    small = {}
    for name in ("trainer.json", "config.yaml", "rng.pt", "tokenizer.json"):
        if (src / name).is_file():
            small[name] = read_part(src, name, verify)
        elif name in listed:  # carried over whole, or not at all
            raise refusal(src, _size_problem(src, name, listed[name]), verify)
    state = read_sharded_full(src, verify)
    if config.get("model", {}).get("tie_embeddings"):  # stored under both names there
        state["model"].pop("lm_head.weight", None)
    with staged_folder(out) as staging:
        save_file(dedupe_tied(state["model"]), str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        if "optim" in state:
            torch.save(state["optim"], staging / "optim.pt")
        for name, data in small.items():
            (staging / name).write_bytes(data)
        write_manifest(staging, int(trainer["step"]))
    return out


@contextmanager
def staged_folder(out: str | Path):
    """For writing a new folder `out` all or nothing: yields a hidden folder beside it, which
    is fsynced and renamed to `out` on success and removed on any error."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise KilnError(f"{out} exists; choose a new output folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    except OSError as e:
        raise KilnError(f"cannot create a folder beside {out}: {e.strerror or e}") from e
    try:
        yield staging
        for f in staging.rglob("*"):
            if f.is_file():
                fsync_file(f)
        if out.exists():
            raise KilnError(f"{out} appeared while it was being written; choose a new output "
                            "folder")
        os.rename(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise KilnError(f"could not write {out} ({e.strerror or e}); nothing was written; free "
                        "disk space or choose another folder") from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
