"""Megatron-Core `dist_checkpointing` checkpoint -> Hugging Face safetensors folder.

Works for converted checkpoints and for training checkpoints saved at any TP/PP (the stored
tensors are global; Megatron's loader reassembles them). Streaming: parameters are loaded one
layer at a time, split into HF tensors and written straight into pre-planned safetensors shards,
so a process holds about one layer, never a shard or the model. With `nproc > 1` the planned
shard files are split by bytes over that many processes, each streaming only its files' tensors;
the output is byte for byte the one a single process writes.

Nothing is read before the checkpoint is admitted (rift_megatron/trust: its files' sha256, its
pickles hold only data); tensors that `rift_manifest.json` hashes are checked as they stream.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Set
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from rift_megatron.convert.checkpoint_files import (
    copy_hf_assets,
    find_hf_assets,
    load_architecture,
    resolve_checkpoint,
)
from rift_megatron.convert.errors import ConversionError
from rift_megatron.exits import first_line
from rift_megatron.convert.hf_to_mcore import TARGET_DTYPES, cast_checked
from rift_megatron.convert.processes import run_in_processes, split_by_size
from rift_megatron.convert.dcp_reader import Region, read_metadata, read_regions
from rift_megatron.convert.layout import param_region, sharded_model_state, stored_layout
from rift_megatron.convert.mapping import ParamMapping, expand, hf_row_blocks
from rift_megatron.convert.megatron_world import tp1_megatron_world
from rift_megatron.convert.safetensors_io import (
    StreamingSafetensorsWriter,
    TensorSpec,
    parse_size,
    plan_shards,
    shard_file_names,
    write_index,
)
from rift_megatron.convert.tensor_hashes import checked_against_manifest
from rift_megatron.models.hf_config import ModelArchitecture
from rift_megatron.staging import check_writable, staged_directory
from rift_megatron.trust.admission import admit_checkpoint

_CONFIG_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _stored_dtypes(checkpoint: Path, chunks: dict) -> dict[str, torch.dtype]:
    """Dtype of every model parameter as stored; errors if the checkpoint lacks one or its shape
    differs (e.g. a config.json that does not describe this checkpoint)."""
    stored = read_metadata(checkpoint).state_dict_metadata
    dtypes = {}
    for param, pieces in chunks.items():
        key, shape = pieces[0].key, pieces[0].global_shape
        if key not in stored:
            raise ConversionError(f"{checkpoint}: checkpoint has no tensor {key!r} (needed for {param}); "
                                  "is hf_assets/config.json the config of this model?")
        if tuple(stored[key].size) != tuple(shape):
            raise ConversionError(f"{checkpoint}: tensor {key!r} is stored with shape {list(stored[key].size)} but "
                                  f"hf_assets/config.json implies {list(shape)}")
        dtypes[param] = stored[key].properties.dtype
    return dtypes


def _layer_of(mapping: ParamMapping) -> int:
    parts = mapping.megatron.split(".")
    return int(parts[2]) if mapping.megatron.startswith("decoder.layers.") else -1


def export_groups(arch: ModelArchitecture) -> list[list[ParamMapping]]:
    """Parameters in the order they are loaded and written, one group per load: the embedding,
    each transformer layer, then the final norm and LM head (HF's own tensor order)."""
    mappings = expand(arch)
    layers: dict[int, list[ParamMapping]] = {}
    for mapping in mappings:
        if _layer_of(mapping) >= 0:
            layers.setdefault(_layer_of(mapping), []).append(mapping)
    embedding = [m for m in mappings if m.megatron.startswith("embedding.")]
    tail = [m for m in mappings if _layer_of(m) < 0 and m not in embedding]
    return [embedding] + [layers[layer] for layer in sorted(layers)] + [tail]


def _row_blocks(stored_chunks, region: Region, row_axis: int) -> list[tuple[int, int]]:
    """Row ranges of a parameter's region, cut where stored chunks start.

    Reading a block costs reading every stored chunk it overlaps, so blocks follow the stored
    chunking: a checkpoint written in row blocks is exported in the same blocks, one saved with
    whole tensors is read one tensor at a time, each byte read once.
    """
    rows = region.sizes[row_axis]
    cuts = {0, rows}
    for chunk in stored_chunks:
        overlaps = all(
            chunk.offsets[d] < region.offsets[d] + region.sizes[d] and region.offsets[d] < chunk.offsets[d] + chunk.sizes[d]
            for d in range(len(region.sizes))
        )
        if overlaps:
            cuts.add(min(max(chunk.offsets[row_axis] - region.offsets[row_axis], 0), rows))
    edges = sorted(cuts)
    return list(zip(edges, edges[1:])) or [(0, 0)]


def iter_hf_blocks(
    checkpoint: Path, arch: ModelArchitecture, names: Set[str] | None = None
) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(HF name, first row, rows) covering the whole model in HF tensor order, each tensor's
    blocks in row order; tensors of non-row-wise mappings come whole (first row 0).

    Memory is one stored chunk (or one layer's fused QKV). Blocks are in the stored dtype
    (bit-exact round trips). `names`: only these HF tensors; blocks holding none of them are not
    read (a fused QKV or gate/up split across two processes' shards is read by both, a few MB).
    Needs a TP1 Megatron world.
    """
    state = sharded_model_state(arch)
    chunks, _ = stored_layout(state)
    metadata = read_metadata(checkpoint).state_dict_metadata
    stored = _stored_dtypes(checkpoint, chunks)
    for mapping in (m for group in export_groups(arch) for m in group):
        if names is not None and names.isdisjoint(mapping.hf):
            continue
        param_shape = tuple(state[mapping.megatron].data.shape)
        region = param_region(chunks[mapping.megatron])
        row_axis = len(region.sizes) - len(param_shape)
        row_wise = len(param_shape) > 1 and mapping.row_pieces(arch, 0, 1) is not None
        blocks = _row_blocks(metadata[region.key].chunks, region, row_axis) if row_wise else [(0, param_shape[0])]
        for start, stop in blocks:
            if names is not None and row_wise and all(
                mapping.hf[piece.hf_index] not in names for piece in mapping.row_pieces(arch, start, stop)
            ):
                continue
            offsets = list(region.offsets)
            sizes = list(region.sizes)
            offsets[row_axis] += start
            sizes[row_axis] = stop - start
            block = _read_block(checkpoint, Region(region.key, tuple(offsets), tuple(sizes)), stored[mapping.megatron])
            block = block.reshape(stop - start, *param_shape[1:])
            pieces = hf_row_blocks(mapping, arch, block, start) if row_wise else None
            if pieces is None:
                pieces = [(name, 0, tensor) for name, tensor in zip(mapping.hf, mapping.to_hf(block, arch))]
            for name, first_row, tensor in pieces:
                if names is None or name in names:
                    yield name, first_row, tensor


def _read_block(checkpoint: Path, region: Region, dtype: torch.dtype) -> torch.Tensor:
    """One region, with a failed read (a missing or cut .distcp file) reported as one line
    naming the checkpoint files that hold the tensor (DCP's own error names neither)."""
    try:
        (block,) = read_regions(checkpoint, [region], [dtype])
    except CheckpointException as error:
        causes = [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
        cause = causes[0] if causes else error
        files = _files_holding(checkpoint, region.key)
        missing = [name for name in files if not (checkpoint / name).is_file()]
        reason = (f"{', '.join(missing)} does not exist" if missing else
                  "the file ends early (truncated: an interrupted copy or write?)" if isinstance(cause, EOFError) else
                  f"{type(cause).__name__}: {first_line(cause)}")
        raise ConversionError(f"{checkpoint}: cannot read stored tensor {region.key!r} "
                              f"(from {', '.join(files)}): {reason}") from None
    return block


def _files_holding(checkpoint: Path, key: str) -> list[str]:
    """The checkpoint's data files that hold stored tensor `key`."""
    return sorted({info.relative_path for index, info in read_metadata(checkpoint).storage_data.items()
                   if index.fqn == key})


def _hf_tensor_files(checkpoint: Path, arch: ModelArchitecture) -> Callable[[str], list[str]]:
    """HF tensor name -> the checkpoint's data files holding it (to name them in errors)."""
    chunks, _ = stored_layout(sharded_model_state(arch))
    keys = {name: param_region(chunks[m.megatron]).key for m in expand(arch) for name in m.hf}
    return lambda name: _files_holding(checkpoint, keys[name])


def _hf_specs(arch: ModelArchitecture, dtypes: dict[str, torch.dtype], dtype: torch.dtype | None):
    """(name, shape, dtype) of every HF tensor in write order, known before reading any data."""
    specs = []
    for mapping in (m for group in export_groups(arch) for m in group):
        for name, shape in zip(mapping.hf, mapping.hf_shapes(arch)):
            specs.append((name, tuple(shape), dtype or dtypes[mapping.megatron]))
    return specs


def _write_shards(staging: Path, shards: dict[str, list[TensorSpec]], weight_map: dict[str, str], blocks) -> None:
    """Stream blocks into their pre-planned shard files (in order)."""
    writer = None
    try:
        for name, first_row, rows in blocks:
            file_name = weight_map[name]
            if writer is None or writer.path.name != file_name:
                if writer is not None:
                    writer.close()
                writer = StreamingSafetensorsWriter(staging / file_name, shards[file_name], metadata={"format": "pt"})
            writer.write_rows(name, first_row, rows)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    unwritten = [file_name for file_name in shards if not (staging / file_name).is_file()]
    if unwritten:  # every planned tensor is yielded by iter_hf_blocks; anything else is a bug here
        raise RuntimeError(f"internal: no tensor was written to {unwritten[0]}")


def export_shard_files(checkpoint: str, dtype: torch.dtype | None, staging: str, shards: dict[str, list[TensorSpec]]) -> None:
    """Write the planned shard files `shards` (file name -> its tensors, in file order) into
    `staging`, reading only the checkpoint regions their tensors come from, and checking the
    tensors against the sha256 of `rift_manifest.json` where it has them (see tensor_hashes).

    One call writes a whole export (nproc 1) or one process's share of it; module-level with
    plain arguments so that `run_in_processes` can spawn it.
    """
    checkpoint_dir = Path(checkpoint)
    arch = load_architecture(find_hf_assets(checkpoint_dir))
    weight_map = {name: file_name for file_name, specs in shards.items() for name, _, _ in specs}
    shapes = {name: shape for specs in shards.values() for name, shape, _ in specs}
    with tp1_megatron_world():
        blocks = iter_hf_blocks(checkpoint_dir, arch, names=frozenset(weight_map))
        blocks = checked_against_manifest(checkpoint_dir, blocks, shapes.__getitem__, _hf_tensor_files(checkpoint_dir, arch))
        if dtype is not None:
            blocks = ((name, first_row, cast_checked(rows, dtype, name)) for name, first_row, rows in blocks)
        _write_shards(Path(staging), shards, weight_map, blocks)


def _split_shard_files(shards: dict[str, list[TensorSpec]], nproc: int) -> list[dict[str, list[TensorSpec]]]:
    """Whole shard files per process, balanced by bytes, each process's files in file order (the
    order iter_hf_blocks yields their tensors in)."""
    files = list(shards)
    sizes = [sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in shards[name]) for name in files]
    parts = split_by_size(files, sizes, min(nproc, len(files)))
    return [{name: shards[name] for name in sorted(part, key=files.index)} for part in parts]


def _export_config(assets: Path, out_dir: Path, dtype: torch.dtype) -> None:
    config = json.loads((assets / "config.json").read_text())
    key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
    config[key] = _CONFIG_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not (out_dir / "generation_config.json").exists():
        from transformers import GenerationConfig, PretrainedConfig

        GenerationConfig.from_model_config(PretrainedConfig.from_dict(config)).save_pretrained(out_dir)


def convert_mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    nproc: int = 1,
    overwrite: bool = False,
) -> Path:
    """Export a Megatron checkpoint as an HF folder that transformers and vLLM load unedited.

    `nproc > 1` writes the shard files in that many processes (at most one per file); the
    parent plans the shards up front and writes the index, config and tokenizer files itself,
    so the output is identical to one process's. A failure in any process stops the others and
    leaves no output (everything is written into a staging directory renamed at the end).
    """
    out_dir = Path(out_dir)
    if nproc < 1:
        raise ConversionError(f"--nproc must be >= 1, got {nproc}")
    check_writable(out_dir, overwrite)
    checkpoint = resolve_checkpoint(ckpt_dir)
    admit_checkpoint(checkpoint)
    assets = find_hf_assets(checkpoint)
    arch = load_architecture(assets)
    if dtype is not None and dtype not in TARGET_DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(TARGET_DTYPES)}, got {dtype!r}")
    target = TARGET_DTYPES.get(dtype) if dtype else None
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as error:
        raise ConversionError(f"--max-shard-size: {error}") from None
    with tp1_megatron_world(), staged_directory(out_dir, overwrite) as staging:
        stored = _stored_dtypes(checkpoint, stored_layout(sharded_model_state(arch))[0])
        planned = plan_shards(_hf_specs(arch, stored, target), shard_bytes)
        shards = dict(zip(shard_file_names(len(planned)), planned))
        shares = _split_shard_files(shards, nproc)
        if len(shares) == 1:
            export_shard_files(str(checkpoint), target, str(staging), shares[0])
        else:
            run_in_processes(export_shard_files, [(str(checkpoint), target, str(staging), share) for share in shares])
        weight_map = {name: file_name for file_name, specs in shards.items() for name, _, _ in specs}
        total = sum(math.prod(shape) * spec_dtype.itemsize for specs in planned for _, shape, spec_dtype in specs)
        write_index(staging, weight_map, total)
        copy_hf_assets(assets, staging)
        export_dtype = target or next(iter(stored.values()))
        _export_config(assets, staging, export_dtype)
    return out_dir
