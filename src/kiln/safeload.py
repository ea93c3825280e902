"""Reading files that may come from anywhere, without running code they contain.

A checkpoint folder is input like any other: it may be damaged, or crafted. kiln never
unpickles arbitrary objects from it:

* ``.pt`` files (optimizer and RNG state, OLMo's files) go through :func:`load_pt`:
  ``torch.load(weights_only=True)``, which rebuilds tensors and plain values only;
* a sharded checkpoint's ``dcp/.metadata`` is a pickle written by
  ``torch.distributed.checkpoint``, which torch reads with a plain ``pickle.load``. kiln reads
  it with :class:`_MetadataUnpickler`, which rebuilds only the metadata classes DCP writes
  (and tensor dtypes, sizes, paths) and refuses every other global;
* the non-tensor items of a sharded checkpoint (optimizer hyperparameters) are read with
  ``weights_only=True`` as well, instead of torch's ``weights_only=False``.

Every refusal is one :class:`KilnError` line naming the file.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnError, one_line  # noqa: F401 - one_line is re-exported


def _forbidden_global(e: BaseException) -> str:
    """'a pickled posix.system', or what else torch's restricted unpickler rejected."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global '?([\w.]+)", text)
    if found:
        return f"a pickled {found.group(1)}"
    detail = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", text, re.S)
    reason = one_line(detail.group(1))[:100] if detail else one_line(text)[:100]
    return f"pickle data that torch's restricted loader rejects ({reason})"


def load_pt(path: str | Path, extra_globals: list[tuple[Any, str]] | None = None,
            mmap: bool = False, data: bytes | None = None) -> Any:
    """torch.load(path, weights_only=True) with one-line errors naming the file.

    `extra_globals` are (object, pickled name) pairs allowed beside tensors and plain values;
    each must be a plain data type. `data`: the file's bytes, already read (and verified)."""
    path = Path(path)
    if data is None and not path.is_file():
        raise KilnError(f"{path} does not exist")
    ctx = (torch.serialization.safe_globals(extra_globals) if extra_globals else
           contextlib.nullcontext())
    try:
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols and defaults
            if mmap:
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
            source = io.BytesIO(data) if data is not None else path
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise KilnError(f"{path} holds {_forbidden_global(e)}, which kiln does not "
                        "unpickle (it loads tensors and plain values only); the file is not "
                        "one kiln wrote: replace it with a trusted copy") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad magic number, ...
        text = one_line(e)
        if "central directory" in text or "zip archive" in text:
            text = "its zip archive is incomplete"  # what torch's miniz says, in short
        raise KilnError(f"cannot read {path} ({text[:200]}): the file is truncated or "
                        "damaged; replace it with a good copy") from None


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)


def _allowed_metadata_globals() -> dict[tuple[str, str], Any]:
    """The globals a DCP .metadata pickle may name: DCP's metadata dataclasses and enums,
    tensor sizes, dtypes and layouts, and paths. None of them runs code when rebuilt."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                 "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "_MEM_FORMAT_ENCODING"):
        if hasattr(md, name):
            allowed[(md.__name__, name)] = getattr(md, name)
    allowed[(fs.__name__, "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for mod in ("pathlib", "pathlib._local"):
        for name in ("PosixPath", "PurePosixPath"):
            allowed[(mod, name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, allowed: dict[tuple[str, str], Any]):
        super().__init__(f)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise _Forbidden(f"global {module}.{name}") from None


class _Forbidden(pickle.UnpicklingError):
    """A global the metadata unpickler does not allow (as opposed to a truncated file)."""


def read_dcp_metadata(dcp_dir: str | Path):
    """The Metadata object of a DCP checkpoint folder, unpickled with only DCP's own metadata
    classes allowed."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(dcp_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f, _allowed_metadata_globals()).load()
    except _Forbidden as e:
        raise KilnError(f"{path} holds {_forbidden_global(e)}, which is not part of "
                        "a sharded checkpoint's metadata; kiln refuses it (the file is not one "
                        "kiln wrote): replace the checkpoint with a trusted copy") from None
    except OSError as e:
        raise KilnError(f"cannot read {path} ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - truncated pickle, wrong layout
        raise KilnError(f"cannot read {path} ({one_line(e)[:200]}): the file is truncated or "
                        "damaged") from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise KilnError(f"{path} is not a sharded checkpoint's metadata; the file is damaged")
    if getattr(meta, "storage_meta", None) is None:
        meta.storage_meta = StorageMeta()
    _check_shard_files(Path(dcp_dir), meta)
    return meta


def _check_shard_files(dcp_dir: Path, meta: Any) -> None:
    """Refuse a missing or truncated shard file before anything reads it (torch would read
    short and fail deep inside, or with luck not at all)."""
    need: dict[str, int] = {}
    for info in (getattr(meta, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise KilnError(f"{dcp_dir / '.metadata'} names a shard file {name!r} outside its "
                            "folder; the checkpoint is damaged or not one kiln wrote")
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        need[name] = max(need.get(name, 0), end)
    for name, end in sorted(need.items()):
        f = dcp_dir / name
        if not f.is_file():
            raise KilnError(f"shard file {f} is missing; the sharded checkpoint is incomplete: "
                            "restore it, or use an earlier checkpoint")
        size = f.stat().st_size
        if size < end:
            raise KilnError(f"shard file {f} is truncated ({size:,} bytes, its metadata needs "
                            f"{end:,}); restore it, or use an earlier checkpoint")


def _readers():
    """(reader class, planner class, full-state planner class), built on first use so that
    importing kiln does not import torch.distributed.checkpoint."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    try:
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    except ImportError:  # pragma: no cover - a torch without it
        _EmptyStateDictLoadPlanner = None

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader whose metadata is read by the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            if kwargs.get("rank") is not None:
                raise KilnError(f"{self.path} uses per-rank metadata files, which kiln does "
                                "not write or read")
            meta = read_dcp_metadata(self.path)
            meta.storage_meta.load_id = self.load_id
            return meta

    def load_bytes(planner, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        where = getattr(planner, "kiln_where", "a sharded checkpoint")
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise KilnError(f"item {fqn!r} of {where} holds {_forbidden_global(e)}, "
                            "which kiln does not unpickle; the checkpoint is not one kiln "
                            "wrote: replace it with a trusted copy") from None
        except Exception as e:  # noqa: BLE001
            raise KilnError(f"cannot read item {fqn!r} of {where} ({one_line(e)[:160]}): the "
                            "checkpoint is damaged") from None
        if planner.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(planner.original_state_dict, planner.mappings[fqn], obj)
        else:
            planner.state_dict[fqn] = obj

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner whose non-tensor items load with weights_only=True."""

        def load_bytes(self, read_item, value):
            load_bytes(self, read_item, value)

    full = None
    if _EmptyStateDictLoadPlanner is not None:
        class SafeFullStatePlanner(_EmptyStateDictLoadPlanner):
            """Loads everything a checkpoint holds into an empty dict, safely."""

            def load_bytes(self, read_item, value):
                load_bytes(self, read_item, value)

        full = SafeFullStatePlanner
    return SafeFileSystemReader, SafeLoadPlanner, full


def dcp_root_cause(e: BaseException) -> BaseException:
    """The first rank's own exception inside torch's CheckpointException (a BaseException
    whose text is several tracebacks), or `e` itself."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        for wrapped in failures.values():
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            if isinstance(inner, KilnError):
                return inner
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


@contextlib.contextmanager
def dcp_errors(what: str):
    """Turn any failure of torch.distributed.checkpoint (including its CheckpointException,
    which is not an Exception) into one KilnError line; a KilnError raised inside (by kiln's
    reader or planner) comes out as it was."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except KilnError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        cause = dcp_root_cause(e)
        if isinstance(cause, KilnError):
            raise cause from None
        raise KilnError(f"{what} ({one_line(cause)[:300]})") from None


def dcp_load(state: dict[str, Any], dcp_dir: str | Path) -> None:
    """torch.distributed.checkpoint.load into `state` (in place, resharding as needed), with
    the metadata and the non-tensor items read safely."""
    import torch.distributed.checkpoint as dcp

    read_dcp_metadata(dcp_dir)  # refused here, in one line, before torch touches it
    reader, planner, _ = _readers()
    plan = planner()
    plan.kiln_where = str(dcp_dir)
    with dcp_errors(f"cannot read sharded checkpoint {dcp_dir}"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load")
        dcp.load(state, storage_reader=reader(str(dcp_dir)), planner=plan)


def dcp_load_full(dcp_dir: str | Path) -> dict[str, Any]:
    """Everything a DCP checkpoint folder holds, as one nested dict of full CPU tensors and
    plain values (single process), read safely."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader, _, full = _readers()
    if full is None:  # pragma: no cover - older torch
        raise KilnError("this torch version cannot read a sharded checkpoint in one process; "
                        "upgrade torch")
    read_dcp_metadata(dcp_dir)
    state: dict[str, Any] = {}
    plan = full()
    plan.kiln_where = str(dcp_dir)
    with dcp_errors(f"cannot read sharded checkpoint {dcp_dir}"):
        _load_state_dict(state, storage_reader=reader(str(dcp_dir)), planner=plan, no_dist=True)
    return state
