"""sha256 of HF tensors, streamed block by block: recorded in `rift_manifest.json` by
`hf-to-mcore`, checked against it by `mcore-to-hf`.

The hash is over a tensor's bytes in row-major order, in its source dtype. A converted
checkpoint stored in that same dtype holds exactly those bytes, so its export must hash the
same; a mismatch means the checkpoint was changed after conversion, and the export is refused
instead of writing a wrong tensor. Tensors the checkpoint stores in another dtype (converted
with `--dtype`) cannot be checked this way; `rift_checksums.json` still covers their files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from rift_megatron.convert.checkpoint_files import MANIFEST
from rift_megatron.convert.errors import ConversionError

Block = tuple[str, int, torch.Tensor]  # (HF name, first row, rows)


class StreamingTensorHashes:
    """sha256 of every tensor fed to it, block by block, each tensor's blocks in row order."""

    def __init__(self, shape_of: Callable[[str], Sequence[int]]) -> None:
        self._shape_of = shape_of
        self._state: dict[str, tuple[int, "hashlib._Hash"]] = {}

    def update(self, name: str, rows: tuple[int, int] | None, tensor: torch.Tensor) -> bool:
        """Add rows [start, stop) of tensor `name` (None: all of it); True once it is complete."""
        shape = self._shape_of(name)
        total = shape[0] if shape else 1
        start, stop = rows if rows is not None else (0, total)
        if start == stop:
            return False
        done, digest = self._state.get(name, (0, hashlib.sha256()))
        if start != done:  # blocks come in row order; anything else is a bug of the caller
            raise RuntimeError(f"internal: {name} rows {start}..{stop} hashed after rows up to {done}")
        digest.update(tensor.contiguous().view(torch.uint8).numpy())
        self._state[name] = (stop, digest)
        return stop == total

    def hexdigest(self, name: str) -> str:
        return self._state[name][1].hexdigest()

    def hexdigests(self) -> dict[str, str]:
        return {name: digest.hexdigest() for name, (_, digest) in self._state.items()}


def manifest_tensor_hashes(checkpoint: Path) -> dict[str, str]:
    """HF name -> sha256 for the tensors of `rift_manifest.json` whose bytes the checkpoint
    stores unchanged (source dtype = stored dtype); empty without a manifest."""
    path = checkpoint / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
        return {entry["name"]: entry["sha256"] for entry in manifest["tensors"] if entry["dtype"] == manifest["dtype"]}
    except (ValueError, KeyError, TypeError) as error:
        raise ConversionError(f"{path}: not a valid manifest ({type(error).__name__}: {error})") from None


def checked_against_manifest(
    checkpoint: Path, blocks: Iterator[Block], shape_of: Callable[[str], Sequence[int]],
    files_of: Callable[[str], Sequence[str]],
) -> Iterator[Block]:
    """`blocks` (stored dtype), each tensor the manifest hashes compared when its last row has
    passed; a mismatch raises ConversionError naming the tensor and the files holding it."""
    expected = manifest_tensor_hashes(checkpoint)
    hashes = StreamingTensorHashes(shape_of)
    for name, first_row, tensor in blocks:
        if name in expected:
            rows = (first_row, first_row + tensor.shape[0]) if tensor.dim() else None
            if hashes.update(name, rows, tensor) and hashes.hexdigest(name) != expected[name]:
                raise ConversionError(
                    f"{checkpoint}: tensor {name!r} (in {', '.join(files_of(name))}) does not match the sha256 "
                    f"{MANIFEST} recorded at conversion: the checkpoint was changed or corrupted since"
                )
        yield name, first_row, tensor
