"""Unpickling checkpoint files without running code from them.

A torch_dist checkpoint holds three kinds of pickles, and PyTorch / Megatron-Core (as pinned)
read two of them with plain `pickle`, which runs whatever a crafted file asks for:

* `.metadata`: DCP's `FileSystemReader.read_metadata` is `pickle.load`. We unpickle it with an
  allow-list of the classes DCP metadata is made of (`METADATA_GLOBALS`, found by reading
  torch.distributed.checkpoint's metadata / planner / filesystem modules and by listing the
  globals of checkpoints written by `rift convert hf-to-mcore` and by the trainer).
* byte items inside `*.distcp` (Megatron's ShardedObjects, e.g. `_extra_state`):
  `DefaultLoadPlanner.load_bytes` is `torch.load(weights_only=False)`. We load them with
  `weights_only=True`.
* `common.pt` (Megatron's common state), the trainer's `rng/rank_*.pt` and any other `*.pt`:
  `torch.load` files, loaded with `weights_only=True`; numpy arrays (the RNG states hold one)
  are admitted too (`NUMPY_ARRAY_GLOBALS`), nothing else.

Tensor data itself is read by DCP with `weights_only=True` already.

`RestrictedFileSystemReader` is the reader our own DCP reads use; `restricted_dcp_loading()`
puts the same two restrictions into DCP's classes for the duration of a Megatron load, whose
reader and planner Megatron constructs itself; `check_pickled_parts` unpickles every part of a
checkpoint the restricted way before any loader touches it, so a crafted file is reported in
one line naming it, rather than from deep inside a collective load.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader, filesystem, metadata, planner
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from rift_megatron.exits import first_line
from rift_megatron.trust.errors import UntrustedCheckpointError

METADATA_FILE = ".metadata"

_METADATA_CLASSES = (
    metadata.Metadata, metadata.MetadataIndex, metadata.ChunkStorageMetadata, metadata.TensorProperties,
    metadata.TensorStorageMetadata, metadata.BytesStorageMetadata, metadata.StorageMeta,
    metadata._MEM_FORMAT_ENCODING,
    filesystem._StorageInfo,
    # Megatron's save stores its ranks' save plans in the metadata (`all_local_plans`).
    planner.SavePlan, planner.WriteItem, planner.WriteItemType, planner.TensorWriteData, planner.BytesIOWriteData,
    torch.Size,
    pathlib.PosixPath,  # StorageMeta.checkpoint_id
)
# (module, name) -> object: the only globals a `.metadata` file may name. Dtypes and layouts
# are pickled by name (`torch.float32`, `torch.serialization._get_layout('torch.strided')`).
METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    **{(cls.__module__, cls.__qualname__): cls for cls in _METADATA_CLASSES},
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
}
_METADATA_HOLDS = "PyTorch distributed-checkpoint metadata (tensor names, shapes, dtypes, file offsets)"

# A numpy array (np.random.get_state() is ('MT19937', a uint32 array, ...)) pickles through these.
NUMPY_ARRAY_GLOBALS = [np.dtype, np.dtypes.UInt32DType, np.ndarray, np._core.multiarray._reconstruct]
_WEIGHTS_ONLY_HOLDS = "tensors, numbers, strings and containers of them"


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return METADATA_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list; carries its dotted name."""


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"


def unpickle_metadata(source: BinaryIO, label: str | Path) -> metadata.Metadata:
    """A DCP `Metadata` from `source`, unpickled through `METADATA_GLOBALS` (`label` names the
    file in the error)."""
    try:
        loaded = _MetadataUnpickler(source).load()
    except _Refused as refused:
        raise UntrustedCheckpointError(
            f"{label}: refused to load '{refused}': checkpoint metadata may only hold {_METADATA_HOLDS}"
        ) from None
    except Exception as error:  # a cut or garbled file: say so in one line
        raise UntrustedCheckpointError(f"{label}: not a readable checkpoint metadata file ({_first_line(error)})") from None
    if not isinstance(loaded, metadata.Metadata):
        raise UntrustedCheckpointError(f"{label}: holds a {type(loaded).__name__}, not checkpoint metadata")
    return loaded


def read_dcp_metadata(path: Path) -> metadata.Metadata:
    """The `.metadata` file at `path`, unpickled through the allow-list."""
    try:
        with open(path, "rb") as handle:
            return unpickle_metadata(handle, path)
    except OSError as error:
        raise UntrustedCheckpointError(f"{path}: cannot read checkpoint metadata ({_first_line(error)})") from None


def load_weights_only(source: str | Path | BinaryIO, label: str | Path) -> Any:
    """`torch.load(source, weights_only=True)` (numpy arrays admitted too), its refusal as one
    line naming `label` and the refused global."""
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(error))
        what = f"refused to load '{refused.group(1) or refused.group(2)}'" if refused else "refused to load it"
        raise UntrustedCheckpointError(f"{label}: {what}: it may only hold {_WEIGHTS_ONLY_HOLDS}") from None
    except Exception as error:
        raise UntrustedCheckpointError(f"{label}: not a readable torch file ({_first_line(error)})") from None


def _restricted_read_metadata(self: FileSystemReader, *args: Any, **kwargs: Any) -> metadata.Metadata:
    # FileSystemReader.read_metadata with the allow-list in place of pickle.load.
    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as handle:
        loaded = unpickle_metadata(handle, path)
    if getattr(loaded, "storage_meta", None) is None:
        loaded.storage_meta = metadata.StorageMeta()
    loaded.storage_meta.load_id = self.load_id
    return loaded


def _weights_only_load_bytes(self: DefaultLoadPlanner, read_item: planner.ReadItem, value: io.BytesIO) -> None:
    # DefaultLoadPlanner.load_bytes with weights_only=True in place of weights_only=False.
    fqn = read_item.dest_index.fqn
    loaded = load_weights_only(value, f"checkpoint object {fqn!r}")
    if self.flatten_state_dict:
        from torch.distributed.checkpoint._traverse import set_element

        set_element(self.original_state_dict, self.mappings[fqn], loaded)
    else:
        self.state_dict[fqn] = loaded


class RestrictedFileSystemReader(FileSystemReader):
    """A DCP reader whose metadata is unpickled through the allow-list (our own reads)."""

    read_metadata = _restricted_read_metadata


@contextmanager
def restricted_dcp_loading() -> Iterator[None]:
    """Inside: every DCP `FileSystemReader` (Megatron's included) unpickles metadata through the
    allow-list, and every DCP load planner loads byte items with `weights_only=True`.

    Megatron's `dist_checkpointing.load` builds its reader and planner (subclasses of these)
    internally, so the restriction is put on the base classes for the duration of the load.
    """
    saved = FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes
    FileSystemReader.read_metadata = _restricted_read_metadata
    DefaultLoadPlanner.load_bytes = _weights_only_load_bytes
    try:
        yield
    finally:
        FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = saved


def _byte_items(directory: Path, loaded: metadata.Metadata) -> Iterator[tuple[str, Path, int, int]]:
    """(key, file, offset, length) of every stored non-tensor object."""
    for index, info in (loaded.storage_data or {}).items():
        if isinstance(loaded.state_dict_metadata.get(index.fqn), metadata.BytesStorageMetadata):
            yield index.fqn, directory / info.relative_path, info.offset, info.length


def check_pickled_parts(directory: Path) -> None:
    """Unpickle every pickled part of the checkpoint `directory` the restricted way (nothing
    is kept): `.metadata`, the byte items it points to and every `*.pt` file. Raises
    UntrustedCheckpointError naming the first file that is refused."""
    loaded = read_dcp_metadata(directory / METADATA_FILE)
    root = directory.resolve()
    for info in (loaded.storage_data or {}).values():
        if not (root / info.relative_path).resolve().is_relative_to(root):
            raise UntrustedCheckpointError(f"{directory / METADATA_FILE}: names a data file outside the checkpoint "
                                           f"({info.relative_path!r})")
    for key, path, offset, length in _byte_items(directory, loaded):
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except OSError as error:
            raise UntrustedCheckpointError(f"{path}: cannot read stored object {key!r} ({_first_line(error)})") from None
        load_weights_only(io.BytesIO(data), f"{path}: stored object {key!r}")
    for path in sorted(directory.rglob("*.pt")):
        load_weights_only(path, path)
