"""Loading distributed checkpoints without running code from them.

torch's DCP reader unpickles ``.metadata`` with plain ``pickle.load`` and loads non-tensor
entries (optimizer param groups) with ``torch.load(weights_only=False)``: a crafted
checkpoint directory would run arbitrary code on every rank that resumes from it, and in
``jobs/export.py``. tidal loads every checkpoint through :class:`SafeReader` (a restricted
unpickler that admits only DCP's own metadata classes, torch sizes, dtypes and layouts and
plain containers) and :class:`SafePlanner` (``weights_only=True`` for the byte entries).
Anything else is refused with :class:`UnsafeCheckpointError`, before it is constructed.
"""
from __future__ import annotations

import io
import pickle
import re
from typing import Any, Dict

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_DCP_META = "torch.distributed.checkpoint.metadata"
ALLOWED = {
    _DCP_META: {"Metadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
                "StorageMeta", "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # maps a layout's name to torch's own object
    "torch": {"Size"},  # plus dtypes (torch.float32, ...), checked by type below
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to construct something other than checkpoint data."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.where}: refused to load '{module}.{name}': a checkpoint's metadata may only "
            "hold checkpoint metadata, sizes, dtypes and plain values. This file was not written "
            "by torch.distributed.checkpoint as tidal uses it (tampered, or from an untrusted "
            "source); nothing in it was executed")


def restricted_load(data: bytes, where: str) -> Any:
    """Unpickle ``data`` admitting only the classes in ``ALLOWED`` (and torch dtypes)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), where).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbled: a damaged file, not an attack
        raise UnsafeCheckpointError(f"{where}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from e


def check_metadata(data: bytes, where: str) -> Metadata:
    """DCP metadata as the restricted loader reads it, its shard locations checked."""
    metadata = restricted_load(data, where)
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{where}: holds a {type(metadata).__name__}, not DCP metadata")
    _check_locations(metadata, where)
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = check_metadata(f.read(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_SHARD = re.compile(r"__\d+_\d+\.distcp")


def _check_locations(metadata: Metadata, where: str) -> None:
    """Every entry must point into one of the checkpoint's own shard files, at a sane byte
    range: DCP joins ``relative_path`` onto the checkpoint directory unchecked, so a crafted
    one (``/etc/...``, ``../other-run/...``, ``/dev/zero``) would read any file on the node."""
    data = metadata.storage_data
    if not isinstance(data, dict):
        raise UnsafeCheckpointError(f"{where}: storage data is not a mapping")
    for key, info in data.items():
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        ok = isinstance(rel, str) and _SHARD.fullmatch(rel) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length))
        if not ok or getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(
                f"{where}: entry '{getattr(key, 'fqn', key)}' points at {rel!r} "
                f"[{offset}, +{length}]: only the checkpoint's own __<rank>_<n>.distcp shards, "
                "untransformed, at non-negative offsets can be read")


class SafePlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = f"'{found.group(1)}'" if found else "a non-data object"
            raise UnsafeCheckpointError(
                f"checkpoint entry '{read_item.dest_index.fqn}': refused to load {what}: only "
                "tensors and plain values are accepted; nothing in it was executed") from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _unsafe_cause(exc: BaseException):
    """The UnsafeCheckpointError behind DCP's per-rank wrapping of failures, if any."""
    seen = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, UnsafeCheckpointError):
            return e
        for failure in getattr(e, "failures", {}).values():  # CheckpointException
            seen.append(failure[0] if isinstance(failure, tuple) else failure)  # (error, trace)
        if e.__cause__ is not None:
            seen.append(e.__cause__)
    return None


def load(state: Dict[str, Any], path: str, **kw) -> None:
    """``dcp.load`` of ``state`` from the local directory ``path``, safely: the metadata is
    checked up front (a clear error instead of DCP's per-rank fallbacks), then loaded."""
    from torch.distributed.checkpoint.api import CheckpointException

    reader = SafeReader(path)
    reader.read_metadata()  # raises UnsafeCheckpointError on a tampered file
    try:
        dcp.load(state, checkpoint_id=path, storage_reader=reader, planner=SafePlanner(**kw))
    except CheckpointException as e:
        cause = _unsafe_cause(e)
        if cause is not None:
            raise cause from None
        raise
