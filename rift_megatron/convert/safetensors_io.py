"""Streaming safetensors reading and writing for checkpoint conversion.

Conversion must handle 70B models, so a process may hold only a few tensors at a time, never a
shard. Two consequences shape this module:

* Reading never mmaps: `safetensors.safe_open` keeps the whole file mapped while open and
  file-backed pages count in RSS. `HFCheckpointReader.read` seeks and `readinto`s one tensor's
  bytes straight into the storage of the tensor it returns (no intermediate copy, no mapping).
* Writing is done by hand: `safetensors.save_file` needs every tensor of a shard in memory.
  The format is simple (8-byte little-endian header length N, N bytes of JSON header, raw
  little-endian tensor bytes), and names, shapes and dtypes are known up front, so the header is
  written first and tensors are streamed after it. A process killed mid-write therefore leaves a
  file whose header promises more bytes than it has, which the reader reports as truncated.

Assumes a little-endian host (every platform we run on), so tensor bytes are written as is.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import TracebackType

import torch

from rift_megatron.convert.errors import ConversionError
from rift_megatron.hf_folder import safetensors_problem

if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
    raise ImportError("rift_megatron.convert.safetensors_io requires a little-endian host")

DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Same cap as the safetensors library: stops a garbage length prefix from making us read GBs.
_MAX_HEADER_BYTES = 100_000_000

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]
_Entry = tuple[torch.dtype, tuple[int, ...], int, int]  # dtype, shape, begin, end


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, known from headers alone (no data read)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    nbytes: int


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _parse_header(path: Path) -> tuple[int, dict[str, _Entry]]:
    """Read and validate one file's header with plain file I/O.

    Returns (absolute offset of the data section, {name: (dtype, shape, begin, end)}). Checking
    the file size against the largest offset here turns a cut download into a clear error up
    front instead of a failure hours into a conversion.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise ConversionError(
                f"cannot parse safetensors header of {path}: it declares a {n}-byte header but the "
                f"file has {size} bytes (not a safetensors file, or truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConversionError(f"cannot parse safetensors header of {path}: {e}") from None
    entries: dict[str, _Entry] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape = entry["dtype"], tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ConversionError(
                f"malformed header entry for tensor {name!r} in {path}: {entry!r}") from None
        if dtype_name not in DTYPES:
            raise ConversionError(f"tensor {name!r} in {path} has unsupported dtype {dtype_name} "
                                  f"(supported: {', '.join(DTYPES)})")
        dtype = DTYPES[dtype_name]
        if end - begin != _nbytes(shape, dtype):
            raise ConversionError(f"tensor {name!r} in {path}: data_offsets [{begin}, {end}] "
                                  f"do not match shape {list(shape)} x {dtype_name}")
        entries[name] = (dtype, shape, begin, end)
    needed = 8 + n + max((e[3] for e in entries.values()), default=0)
    if size < needed:
        raise ConversionError(
            f"{path} is truncated: expected at least {needed} bytes, found {size}")
    return 8 + n, entries


class HFCheckpointReader:
    """Index of every tensor of a Hugging Face safetensors checkpoint; reads one tensor at a time.

    All headers are parsed and cross-checked in `__init__` so a broken checkpoint fails before
    any conversion work; `read` then holds the file open only for the one tensor it returns.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ConversionError(f"checkpoint directory {self.model_dir} does not exist")
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            self._load_index(index)
            return
        single = self.model_dir / SINGLE_NAME
        files = [single] if single.is_file() else sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.model_dir} {safetensors_problem(self.model_dir)}")
        for file in files:
            data_start, entries = _parse_header(file)
            for name, entry in entries.items():
                if name in self._infos:
                    raise ConversionError(
                        f"tensor {name!r} appears in both {self._infos[name].file} and {file}, "
                        f"and there is no {INDEX_NAME} to choose between them")
                self._add(name, file, data_start, entry)

    def _load_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of tensor name -> shard file name")
        except (ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"invalid index {index}: {type(e).__name__}: {e}") from None
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in sorted(by_shard.items()):
            file = self.model_dir / shard
            if not file.is_file():
                raise ConversionError(f"index {index} names shard {shard} for tensor {names[0]!r} "
                                      f"but {file} does not exist")
            data_start, entries = _parse_header(file)
            for name in names:  # tensors in the shard but not in the index are ignored, as by HF
                if name not in entries:
                    raise ConversionError(f"index {index} places tensor {name!r} in {file}, "
                                          "but that shard's header has no such tensor")
                self._add(name, file, data_start, entries[name])

    def _add(self, name: str, file: Path, data_start: int, entry: _Entry) -> None:
        dtype, shape, begin, end = entry
        self._infos[name] = TensorInfo(name, shape, dtype, file, end - begin)
        self._offsets[name] = data_start + begin

    def names(self) -> list[str]:
        return sorted(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ConversionError(f"tensor {name!r} not found in {self.model_dir}") from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows [start, stop) of it), contiguous and owning its memory, bytes read
        straight into its storage: reading a big tensor in row blocks bounds memory by the block."""
        info = self.info(name)
        shape, offset, nbytes = info.shape, self._offsets[name], info.nbytes
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise ValueError(f"rows {rows} out of range for tensor {name!r} of shape {list(shape)}")
            row_bytes = nbytes // shape[0] if shape[0] else 0
            shape, offset, nbytes = (stop - start, *shape[1:]), offset + start * row_bytes, (stop - start) * row_bytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            with open(info.file, "rb") as f:
                f.seek(offset)
                got = f.readinto(memoryview(buf.numpy()))
            if got != nbytes:
                raise ConversionError(f"{info.file} is truncated: tensor {name!r} needs {nbytes} "
                                      f"bytes at offset {offset}, only {got} could be read")
        return buf.view(info.dtype).reshape(shape)

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})


class StreamingSafetensorsWriter:
    """Write a safetensors file one tensor at a time: header first, then each tensor's bytes.

    Tensors must be written in the declared order with the declared shape and dtype (the header
    is already on disk, so anything else would corrupt the file). An incomplete file is deleted
    by `close()`/`__exit__` so no half-written shard is ever mistaken for a checkpoint.
    """

    def __init__(self, path: Path, tensors: Sequence[TensorSpec],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._specs = [(name, tuple(shape), dtype) for name, shape, dtype in tensors]
        if len({s[0] for s in self._specs}) != len(self._specs):
            raise ValueError(f"duplicate tensor names declared for {self.path}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in (metadata or {}).items()):
            raise ValueError(f"safetensors metadata for {self.path} must map str -> str")
        # "format": "pt" always: transformers refuses safetensors files without it.
        header: dict[str, object] = {"__metadata__": {**(metadata or {}), "format": "pt"}}
        offset = 0
        for name, shape, dtype in self._specs:
            if dtype not in _DTYPE_NAMES or any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r}: shape {list(shape)} / dtype {dtype} "
                                 "is not supported")
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8 + len(raw) is then 8-byte aligned, as safetensors does
        self.data_start = 8 + len(raw)
        self.expected_size = self.data_start + offset
        self._next = 0
        self._rows_done = 0
        self._file = open(self.path, "wb")
        try:
            self._file.write(len(raw).to_bytes(8, "little") + raw)
            self._file.flush()
        except BaseException:  # e.g. disk full: leave no header-only file behind
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next declared tensor whole; ValueError (nothing written) if it is not that one."""
        _, shape, dtype = self._current_spec(name)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r}: declared {list(shape)} {dtype}, got {list(tensor.shape)} {tensor.dtype}")
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Append rows [start, start + len(rows)) of the next declared tensor.

        Lets a caller stream one tensor in row blocks (a 151k-row embedding, say) without ever
        holding it whole. Blocks must come in row order; the tensor is complete with its last row.
        """
        want, shape, dtype = self._current_spec(name)
        whole = shape == () or start == 0 and tuple(rows.shape) == shape
        if rows.dtype != dtype or not whole and (not shape or tuple(rows.shape[1:]) != shape[1:]):
            raise ValueError(f"tensor {name!r}: declared {list(shape)} {dtype}, "
                             f"got rows of shape {list(rows.shape)} {rows.dtype}")
        count = rows.shape[0] if rows.dim() else 1
        if start != self._rows_done or (shape and start + count > shape[0]):
            raise ValueError(f"tensor {name!r}: rows {start}..{start + count} written out of order "
                             f"(next row is {self._rows_done} of {shape[0] if shape else 0})")
        if rows.numel():
            # Only non-contiguous or non-CPU tensors are copied; the uint8 view (bf16 has no numpy
            # dtype) hands the tensor's own storage to write() through the buffer protocol.
            flat = rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            self._file.write(memoryview(flat.numpy()))
            self._file.flush()  # keep nothing buffered: the file grows block by block
        self._rows_done = 0 if whole else self._rows_done + count
        if whole or self._rows_done == shape[0]:
            self._next += 1
            self._rows_done = 0

    def _current_spec(self, name: str) -> TensorSpec:
        if self._file is None:
            raise ValueError(f"writer for {self.path} is closed; cannot write tensor {name!r}")
        if self._next >= len(self._specs):
            raise ValueError(f"tensor {name!r}: all tensors declared for {self.path} are written")
        spec = self._specs[self._next]
        if name != spec[0]:
            raise ValueError(f"tensor {name!r} written to {self.path} out of order: expected {spec[0]!r} next")
        return spec

    def close(self) -> None:
        """Check every declared tensor was written, then fsync; otherwise delete the file."""
        if self._file is None:
            return
        if self._next < len(self._specs):
            missing = [s[0] for s in self._specs[self._next:]]
            self.abort()
            raise ValueError(f"{self.path} closed with {len(missing)} declared tensor(s) never "
                             f"written (first: {missing[0]!r}); the incomplete file was deleted")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def abort(self) -> None:
        """Close and delete the partial file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def plan_shards(tensors: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors greedily, in order, into shards of at most `max_shard_bytes` of data.

    Order is kept (no bin packing) so related tensors stay together and the output is
    deterministic; a tensor larger than the limit gets a shard of its own, like transformers.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    used = 0
    for spec in tensors:
        size = _nbytes(spec[1], spec[2])
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(spec)
        used += size
    if current:
        shards.append(current)
    return shards


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, '123' -> 123 bytes (transformers' units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: expected bytes or a number with a unit "
                         "(KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '5GB'")
    value = int(Decimal(m.group(1)) * _UNITS[unit])  # Decimal: '70.3GB' is exact
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be positive")
    return value


def shard_file_names(n: int) -> list[str]:
    """transformers' shard names, so the output looks like any Hub checkpoint."""
    if n < 1:
        raise ValueError(f"number of shards must be >= 1, got {n}")
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write `model.safetensors.index.json`, the file transformers uses to find sharded tensors."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
