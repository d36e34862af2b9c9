"""Hugging Face safetensors checkpoint -> Megatron-Core `dist_checkpointing` checkpoint.

Streaming: every Megatron parameter is assembled from its HF tensors only when the checkpoint
writer reaches it, so a process holds about one parameter at a time. With `nproc > 1` the
parameters are split by size across processes that write one checkpoint together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rift_megatron import __version__
from rift_megatron.convert.checkpoint_files import (
    HF_ASSETS,
    MANIFEST,
    copy_hf_assets,
    load_architecture,
    write_json,
)
from rift_megatron.convert.dcp_writer import LazyChunk, LazyObject, write_megatron_checkpoint
from rift_megatron.convert.errors import ConversionError
from rift_megatron.convert.layout import StoredChunk, sharded_model_state, stored_layout
from rift_megatron.convert.mapping import IGNORED_HF_SUFFIXES, ParamMapping, expand, megatron_rows
from rift_megatron.convert.megatron_world import tp1_megatron_world
from rift_megatron.convert.processes import run_in_processes, split_by_size
from rift_megatron.convert.safetensors_io import DTYPES, HFCheckpointReader
from rift_megatron.convert.tensor_hashes import StreamingTensorHashes
from rift_megatron.models.hf_config import ModelArchitecture
from rift_megatron.parallel import private_rendezvous
from rift_megatron.staging import check_writable, staged_directory
from rift_megatron.trust.checksums import write_checksums

TARGET_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class SourceModel:
    """A validated HF checkpoint: its architecture, tensor index and the mappings that apply."""

    hf_dir: Path
    arch: ModelArchitecture
    reader: HFCheckpointReader
    mappings: tuple[ParamMapping, ...]


def inspect_source(hf_dir: str | Path) -> SourceModel:
    """Read config and safetensors headers and check every tensor before converting anything."""
    hf_dir = Path(hf_dir)
    arch = load_architecture(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    mappings = tuple(expand(arch))
    expected = {name: shape for m in mappings for name, shape in zip(m.hf, m.hf_shapes(arch))}
    present = set(reader.names())
    for name, shape in expected.items():
        if name not in present:
            raise ConversionError(f"{hf_dir}: tensor {name!r} is missing (config.json describes a {arch.architecture} "
                                  f"with {arch.num_layers} layers)")
        found = reader.info(name).shape
        if tuple(found) != tuple(shape):
            raise ConversionError(
                f"{reader.info(name).file}: tensor {name!r} has shape {list(found)}, but config.json implies {list(shape)}"
            )
    for name in sorted(present - set(expected)):
        if name.endswith(IGNORED_HF_SUFFIXES):
            continue
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            if not torch.equal(reader.read(name), reader.read("model.embed_tokens.weight")):
                raise ConversionError(
                    f"{hf_dir}: config.json says tie_word_embeddings=true but lm_head.weight differs from "
                    "model.embed_tokens.weight; converting would silently drop the head"
                )
            continue
        raise ConversionError(f"{reader.info(name).file}: unexpected tensor {name!r} for {arch.architecture}; "
                              "refusing to drop it silently")
    return SourceModel(hf_dir, arch, reader, mappings)


def resolve_target_dtype(dtype: str | None, source: SourceModel) -> torch.dtype:
    """The stored dtype: `--dtype` if given, else the source tensors' own dtype."""
    if dtype is not None:
        if dtype not in TARGET_DTYPES:
            raise ConversionError(f"--dtype must be one of {sorted(TARGET_DTYPES)}, got {dtype!r}")
        return TARGET_DTYPES[dtype]
    return source.reader.info(source.mappings[0].hf[0]).dtype


def cast_checked(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Cast, refusing values the target dtype cannot hold (fp16 overflow becomes inf silently).

    Only a cast to a narrower range (e.g. fp32 or bf16 -> fp16) is checked: the check is a full
    pass over the data, and a cost paid for nothing on the common same-dtype path.
    """
    if tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    narrower = dtype.is_floating_point and tensor.is_floating_point() and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max
    if narrower and not torch.isfinite(cast).all() and torch.isfinite(tensor).all():
        largest = tensor.abs().max().item()
        raise ConversionError(
            f"tensor {name!r}: values up to {largest:.4g} overflow {dtype} (max {torch.finfo(dtype).max:.4g}); "
            "choose a wider --dtype"
        )
    return cast


# Stored chunks larger than this are written as row blocks, each assembled from just the HF rows
# it needs, so memory does not grow with the largest tensor (a 128k x 8k embedding is 2 GB).
# Exports read the same blocks; torch's reader holds about three copies of one block, so the
# block size sets the conversion's memory above the ~0.4 GB of imports (bench/convert_bench.py).
STREAM_BLOCK_BYTES = 32 * 2**20


class _ChunkSource:
    """Produces this rank's stored chunks on demand from the HF files, one block in memory."""

    def __init__(self, source: SourceModel, dtype: torch.dtype) -> None:
        self.source, self.dtype = source, dtype
        self.checksums = StreamingTensorHashes(lambda name: source.reader.info(name).shape)

    def rows(self, mapping: ParamMapping, start: int, stop: int, sizes: tuple[int, ...]) -> torch.Tensor:
        data = megatron_rows(mapping, self._read, self.source.arch, start, stop)
        return cast_checked(data, self.dtype, mapping.hf[0]).reshape(sizes)

    def _read(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        tensor = self.source.reader.read(name, rows)
        self.checksums.update(name, rows, tensor)
        return tensor


def _row_blocks(chunk: StoredChunk, row_axis: int, splittable: bool, dtype: torch.dtype):
    """(offsets, sizes) of the blocks one stored chunk is written as, in row order."""
    rows = chunk.sizes[row_axis] if row_axis < len(chunk.sizes) else 1
    row_bytes = math.prod(chunk.sizes[row_axis + 1 :]) * dtype.itemsize
    step = rows if not splittable or row_bytes == 0 else max(1, STREAM_BLOCK_BYTES // row_bytes)
    for first in range(0, max(rows, 1), step):
        count = min(step, rows - first) if rows else 0
        offsets = list(chunk.offsets)
        sizes = list(chunk.sizes)
        if row_axis < len(sizes):
            offsets[row_axis] += first
            sizes[row_axis] = count
        yield tuple(offsets), tuple(sizes)


def _assign_to_ranks(mappings: tuple[ParamMapping, ...], source: SourceModel, world: int) -> list[list[ParamMapping]]:
    """The parameters each writer rank converts, balanced by bytes."""
    sizes = [sum(source.reader.info(name).nbytes for name in m.hf) for m in mappings]
    return split_by_size(mappings, sizes, world)


def _write_rank_share(source: SourceModel, staging: Path, dtype: torch.dtype) -> dict[str, str]:
    """Collective: write this rank's share of the checkpoint; return its tensors' checksums."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    state = sharded_model_state(source.arch)
    chunks, objects = stored_layout(state)
    if set(chunks) != {m.megatron for m in source.mappings}:
        raise RuntimeError(f"mapping table and Megatron model disagree: {sorted(set(chunks) ^ {m.megatron for m in source.mappings})}")
    producer = _ChunkSource(source, dtype)
    lazy = []
    for mapping in _assign_to_ranks(source.mappings, source, world)[rank]:
        param_rank = state[mapping.megatron].data.dim()
        for chunk in chunks[mapping.megatron]:
            row_axis = len(chunk.sizes) - param_rank  # after the stacked-layer axis, if any
            splittable = param_rank > 1 and mapping.row_pieces(source.arch, 0, 1) is not None
            for offsets, sizes in _row_blocks(chunk, row_axis, splittable, dtype):
                start = offsets[row_axis] if param_rank else 0
                stop = start + (sizes[row_axis] if param_rank else 1)
                lazy.append(LazyChunk(
                    chunk.key, offsets, sizes, chunk.global_shape, dtype,
                    produce=lambda m=mapping, a=start, b=stop, shape=sizes: producer.rows(m, a, b, shape),
                ))
    lazy_objects = [LazyObject(o.unique_key, o.data) for o in objects] if rank == 0 else []
    write_megatron_checkpoint(staging, lazy, lazy_objects)
    return producer.checksums.hexdigests()


def _manifest(source: SourceModel, dtype: torch.dtype, checksums: dict[str, str], copied: list[str]) -> dict:
    from rift_megatron.models.provider import padded_vocab_size

    arch, reader = source.arch, source.reader
    return {
        "format": "megatron-core dist_checkpointing torch_dist (written by rift convert hf-to-mcore)",
        "rift_megatron_version": __version__,
        "source": str(source.hf_dir.resolve()),
        "architecture": arch.architecture,
        "family": arch.family.name,
        "dtype": _DTYPE_NAMES[dtype],
        "vocab_size": arch.vocab_size,
        "padded_vocab_size": padded_vocab_size(arch.vocab_size, 1),
        "num_parameters": arch.num_parameters(),
        "hf_assets": copied,
        "tensors": [
            {
                "name": name,
                "megatron_param": mapping.megatron,
                "shape": list(reader.info(name).shape),
                "dtype": _DTYPE_NAMES[reader.info(name).dtype],
                "sha256": checksums[name],
            }
            for mapping in source.mappings
            for name in mapping.hf
        ],
    }


def _spawned_rank(rank: int, world: int, rendezvous: str, hf_dir: str, staging: str, dtype: torch.dtype) -> dict[str, str]:
    """One writer of an `nproc > 1` conversion: rank `rank` of a gloo group of `world` processes."""
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    source = inspect_source(hf_dir)
    with tp1_megatron_world():
        # A ConversionError found mid-write reaches every rank (DCP gathers failures), so all
        # ranks report the same line and the parent shows it once.
        return _write_rank_share(source, Path(staging), dtype)


def _write_with_processes(source: SourceModel, staging: Path, dtype: torch.dtype, nproc: int) -> dict[str, str]:
    rendezvous = private_rendezvous()
    jobs = [(rank, nproc, rendezvous, str(source.hf_dir), str(staging), dtype) for rank in range(nproc)]
    checksums: dict[str, str] = {}
    for share in run_in_processes(_spawned_rank, jobs):
        checksums.update(share)
    return checksums


def convert_hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    nproc: int = 1,
    overwrite: bool = False,
) -> Path:
    """Convert; returns the output directory. Raises ConversionError naming the bad input."""
    out_dir = Path(out_dir)
    if nproc < 1:
        raise ConversionError(f"--nproc must be >= 1, got {nproc}")
    check_writable(out_dir, overwrite)
    source = inspect_source(hf_dir)
    target = resolve_target_dtype(dtype, source)
    with staged_directory(out_dir, overwrite) as staging:
        if nproc == 1:
            with tp1_megatron_world():
                checksums = _write_rank_share(source, staging, target)
        else:
            checksums = _write_with_processes(source, staging, target, nproc)
        copied = copy_hf_assets(source.hf_dir, staging / HF_ASSETS)
        write_json(staging / MANIFEST, _manifest(source, target, checksums, copied))
        write_checksums(staging, unlisted=(HF_ASSETS,))
    return out_dir
