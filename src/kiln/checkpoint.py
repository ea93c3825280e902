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

Loading checks the size of every tensor file it reads against the manifest (a file truncated
or replaced later is refused in one line naming it); ``kiln checkpoint verify`` also checks
every checksum. Checkpoints written before manifests existed load without these checks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kiln import __version__
from kiln.errors import KilnError, warn
from kiln.files import fsync_dir, fsync_file, write_atomic
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


def is_complete(path: Path) -> bool:
    return path.is_dir() and not missing_parts(path)


def is_sharded(path: Path) -> bool:
    return (path / SHARDED / ".metadata").is_file()


def weights_path(path: Path) -> Path:
    """Where a checkpoint's weights live: model.safetensors, or the dcp/ folder if sharded."""
    return path / (SHARDED if is_sharded(path) else "model.safetensors")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def missing_parts(path: Path) -> list[str]:
    """The files a checkpoint folder needs but lacks."""
    need = list(REQUIRED) + ([] if is_sharded(path) else ["model.safetensors"])
    return [f for f in need if not (path / f).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names. kiln points `latest` only at complete checkpoints, so a
    damaged one there was damaged afterwards: that is refused rather than silently replaced
    by an older one. A pointer to a folder that is gone falls back, with a warning, to the
    newest complete checkpoint."""
    root = checkpoints_dir(run_dir)
    pointer = root / "latest"
    found = list_checkpoints(run_dir)
    if pointer.is_file():
        name = pointer.read_text().strip()
        candidate = root / name
        if STEP_DIR.match(name) and is_complete(candidate):
            return candidate
        if STEP_DIR.match(name) and candidate.is_dir():
            older = (f"; to resume from {found[-1].name}: kiln train {run_dir} "
                     f"--resume-from={found[-1].name}" if found else "")
            raise KilnError(f"checkpoint {candidate} (named by {pointer}) is damaged: "
                            f"{', '.join(missing_parts(candidate))} missing{older}")
        if found:
            warn(f"{pointer} names {name!r}, which does not exist; using {found[-1]}, the newest "
                 "complete checkpoint")
    return found[-1] if found else None


STATE_PARTS = ["model.safetensors", "optim.pt", "rng.pt", SHARDED]
WEIGHT_PARTS = ["model.safetensors", SHARDED]


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def resume_point(run_dir: str | Path, resume_from: str | None = None) -> Path | None:
    """The checkpoint `kiln train RUN_DIR` resumes from: the one `latest` names, or the
    `--resume-from` one. Refused when its weights are not the size the manifest records,
    offering the newest earlier checkpoint that passes (the optimizer and RNG state are
    checked when the run loads them, see check_resumable; a plan reads the weights alone)."""
    root = checkpoints_dir(run_dir)
    if resume_from is not None:
        name = resume_from if resume_from.startswith("step") else f"step{resume_from}"
        p = root / name
        if not STEP_DIR.match(name) or not is_complete(p):
            have = ", ".join(c.name for c in list_checkpoints(run_dir)) or "none"
            raise KilnError(f"--resume-from={resume_from}: {p} is not a complete checkpoint; "
                            f"complete ones in {root}: {have}")
        problems = manifest_problems(p, WEIGHT_PARTS)
        if problems:
            raise KilnError(f"--resume-from={resume_from}: {problems[0]}; "
                            f"{_passing_offer(run_dir, p)}")
        return p
    latest = latest_checkpoint(run_dir)
    if latest is not None and (problems := manifest_problems(latest, WEIGHT_PARTS)):
        raise KilnError(f"{problems[0]}, so {latest.name} cannot be resumed; "
                        f"{_passing_offer(run_dir, latest)}")
    return latest


def _passing_offer(run_dir: str | Path, bad: Path) -> str:
    older = [c for c in list_checkpoints(run_dir)
             if step_of(c) < step_of(bad) and not manifest_problems(c, STATE_PARTS)]
    if not older:
        return "no earlier checkpoint passes; restore the file from a copy"
    return (f"resume from the newest checkpoint that passes: kiln train {run_dir} "
            f"--resume-from={older[-1].name}")


def rewind_to(run_dir: str | Path, source: Path) -> None:
    """Make `source` the latest checkpoint (for --resume-from). Newer checkpoint folders that
    are incomplete or fail their size check are kept aside as stepN-damaged-K (nothing is
    deleted); newer intact ones stay until this run's saves replace them."""
    root = checkpoints_dir(run_dir)
    for p in sorted(root.iterdir()):
        if (STEP_DIR.match(p.name) and p.is_dir() and step_of(p) > step_of(source)
                and (not is_complete(p) or manifest_problems(p, STATE_PARTS))):
            aside = _put_aside(p)
            warn(f"{p} is damaged; kept it as {aside} (resuming from {source.name})")
    _point_latest(root, source.name)


def _put_aside(p: Path) -> Path:
    n = 1
    while (aside := p.with_name(f"{p.name}-damaged-{n}")).exists():
        n += 1
    os.rename(p, aside)
    return aside


def _point_latest(root: Path, name: str) -> None:
    write_atomic(root / "latest", name + "\n")  # through .latest.tmp
    fsync_dir(root)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from either a RUN_DIR (its latest checkpoint) or a checkpoint."""
    p = Path(path)
    if is_complete(p):
        return p
    if p.is_dir():
        latest = latest_checkpoint(p)
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
            shutil.rmtree(stale, ignore_errors=True)
        for gone in root.glob(".del-step*"):  # a crash during retention
            shutil.rmtree(gone, ignore_errors=True)
        for old in root.glob(".old-step*"):  # a crash mid-swap: delete only if replaced
            if is_complete(root / old.name[len(".old-"):].rsplit("-", 1)[0]):
                shutil.rmtree(old, ignore_errors=True)
    return root / f".tmp-step{step}"


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


_faults_done = [0]


def _injected_fault(step: int) -> None:
    """KILN_FAULT_SAVE=N: the first N saves of this process fail with an I/O error after
    writing their weights; KILN_FAULT_SAVE=stepS: every save of step S does (drills for
    checkpoint.on_save_error, async saves and the cleanup)."""
    spec = os.environ.get("KILN_FAULT_SAVE") or "0"
    if spec == f"step{step}" or (spec.isdigit() and _faults_done[0] < int(spec)):
        _faults_done[0] += 1
        raise OSError(errno.EIO, "Input/output error (injected by KILN_FAULT_SAVE)")


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
        _injected_fault(step)
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
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


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


def manifest_problems(path: Path, parts: list[str] | None = None,
                      checksums: bool = False) -> list[str]:
    """How `path` differs from its manifest: missing files, other sizes and (with `checksums`)
    other contents. `parts` limits the check to those files and folders (e.g. "dcp")."""
    files = read_manifest(path)
    if files is None:
        return []
    problems = []
    for name, entry in files.items():
        if parts is not None and name not in parts and name.split("/")[0] not in parts:
            continue
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif (size := f.stat().st_size) != entry["bytes"]:
            problems.append(f"{f} is {size:,} bytes but the manifest says {entry['bytes']:,} "
                            "(truncated or replaced)")
        elif checksums and sha256_of(f) != entry["sha256"]:
            problems.append(f"{f} does not match its SHA-256 in the manifest (changed after "
                            "it was written)")
    return problems


def check_sizes(path: Path, parts: list[str], fix: str = "") -> None:
    """Refuse, in one line naming the file, a part of `path` whose size is not the one its
    manifest records."""
    problems = manifest_problems(path, parts)
    if problems:
        raise KilnError(f"{problems[0]}; " + (fix or "restore it, or load an earlier checkpoint "
                                              "(kiln checkpoint verify RUN_DIR lists those "
                                              "that pass)"))


# --------------------------------------------------------------------------------------------
# Loading


def read_meta(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, config) of a checkpoint folder, without reading any tensor. Both files
    are checked (every field kiln reads is there and of its type, the config is a valid kiln
    config), so a damaged one is refused here in one line that names it."""
    return read_trainer_state(path / "trainer.json"), read_config_dict(path / "config.yaml")


def _damaged(f: Path, what: str) -> KilnError:
    return KilnError(f"{f} is damaged ({what}); restore the file the run wrote, or use an "
                     "earlier checkpoint")


def read_trainer_state(f: Path) -> dict[str, Any]:
    """A checkpoint's trainer.json, checked field by field."""
    from kiln.schedule import LRSchedule

    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except OSError as e:
        raise _damaged(f, e.strerror or str(e)) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise _damaged(f, f"not valid JSON: {one_line(e)}") from None
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
    except KilnError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise _damaged(f, f"its LR schedule cannot be read: {one_line(e)}") from None
    return state


def _finite_number(x: Any) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_config_dict(f: Path) -> dict[str, Any]:
    """A checkpoint's config.yaml as a dict, refused unless it is a valid kiln config."""
    from kiln.config import config_from_dict, load_yaml_text

    try:
        text = f.read_text(encoding="utf-8")
    except OSError as e:
        raise _damaged(f, e.strerror or str(e)) from None
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


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the stored weights, read from file headers only."""
    if is_sharded(path):
        meta = read_dcp_metadata(path / SHARDED).state_dict_metadata
        shapes = {k[len("model."):]: tuple(v.size) for k, v in meta.items()
                  if k.startswith("model.") and hasattr(v, "size")}
        config = read_config_dict(path / "config.yaml")
        if config.get("model", {}).get("tie_embeddings"):  # stored under both names there
            shapes.pop("lm_head.weight", None)
        return shapes
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise KilnError(f"cannot read {path / 'model.safetensors'}: {one_line(e)}; the file is "
                        "damaged") from None


def read_sharded_full(path: Path) -> dict[str, Any]:
    """{"model": full tensors, "optim": ...} of a sharded checkpoint folder, in one process."""
    state = dcp_load_full(path / SHARDED)
    if not isinstance(state.get("model"), dict):
        raise KilnError(f"sharded checkpoint {path} holds no model state; it is damaged")
    return state


def load(path: str | Path, *, with_optim: bool = True, with_rng: bool = False) -> Checkpoint:
    """Read a checkpoint (a checkpoint folder, or a RUN_DIR meaning its latest); the trainer
    state, optimizer and RNG state only `with_optim` (what needs the weights alone reads the
    weights and config.yaml alone, so a damaged trainer.json or optim.pt does not stop it)."""
    p = resolve(path)
    check_sizes(p, ["model.safetensors"] + ["optim.pt"] * with_optim + ["rng.pt"] * with_rng)
    try:
        model = load_file(str(p / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise KilnError(f"cannot read {p / 'model.safetensors'}: {one_line(e)}; the file is "
                        "damaged") from None
    config = read_config_dict(p / "config.yaml")
    trainer = read_trainer_state(p / "trainer.json") if with_optim else {}
    optim = rng = None
    if with_optim and (p / "optim.pt").is_file():
        optim = load_pt(p / "optim.pt")
    if with_rng and (p / "rng.pt").is_file():
        rng = load_pt(p / "rng.pt")
    return Checkpoint(path=p, model=model, trainer=trainer, config=config, optim=optim, rng=rng)


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
        return get_model_state_dict(model, options=opts), None
    return get_state_dict(model, optimizer, options=opts)


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                  ) -> dict[str, Any]:
    """This rank's shards, in the layout torch.distributed.checkpoint saves and loads."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def load_into(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
              tied: bool) -> None:
    """Load a checkpoint's weights (and optimizer state if `optimizer`) into `model`, whatever
    the checkpoint's format (unsharded or sharded) and the model's (plain or sharded, any
    world size): torch.distributed.checkpoint reshards as needed."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    if is_sharded(path):
        check_sizes(path, [SHARDED])
        state = sharded_state(model, optimizer)
        dcp_load(state, path / SHARDED)
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        return
    c = load(path, with_optim=optimizer is not None)
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


def check_resumable(path: Path, run_dir: Path) -> None:
    """Refuse to resume from a checkpoint that lacks a part an exact resume needs."""
    gone = [n for n in resume_parts(path) if not (path / n).is_file()]
    if gone:
        f = path / gone[0]
        fresh = " --init.load_optimizer=false" if gone[0] == "optim.pt" else ""
        raise KilnError(
            f"{f} is missing, so {path.name} cannot be resumed exactly; restore the file, or "
            f"start a new run from its weights: kiln train {run_dir} "
            f"--trainer.run_dir=NEW_DIR --init.from={path}{fresh}"
        )
    problems = manifest_problems(path, STATE_PARTS)
    if problems:
        raise KilnError(f"{problems[0]}, so {path.name} cannot be resumed; "
                        f"{_passing_offer(run_dir, path)}")


def resume_parts(path: Path) -> list[str]:
    """The files beyond weights and metadata that an exact resume needs (a sharded
    checkpoint keeps its optimizer state in dcp/)."""
    return ["optim.pt", "rng.pt"] if not is_sharded(path) else ["rng.pt"]


def resume_problems(path: Path) -> list[str]:
    """Cheap reasons (no tensor read) why `path` cannot be resumed exactly: parts that are
    missing, or torch files whose archive is truncated."""
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
        sizes = manifest_problems(path, STATE_PARTS)
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


def unshard(src: str | Path, out: str | Path) -> Path:
    """Turn a sharded checkpoint into the unsharded format (a complete checkpoint folder)."""
    src = resolve(src)
    out = Path(out)
    if not is_sharded(src):
        raise KilnError(f"{src} is not a sharded checkpoint (no {SHARDED}/.metadata)")
    if out.exists():
        raise KilnError(f"{out} exists; choose a new output folder")
    trainer, config = read_meta(src)
    check_sizes(src, [SHARDED])
    state = read_sharded_full(src)
    if config.get("model", {}).get("tie_embeddings"):  # stored under both names there
        state["model"].pop("lm_head.weight", None)
    with staged_folder(out) as staging:
        save_file(dedupe_tied(state["model"]), str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        if "optim" in state:
            torch.save(state["optim"], staging / "optim.pt")
        for name in ("trainer.json", "config.yaml", "rng.pt", "tokenizer.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, staging / name)
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
