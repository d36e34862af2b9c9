"""Megatron-Core `dist_checkpointing` checkpoint -> Hugging Face safetensors folder.

Works for converted checkpoints and for training checkpoints saved at any TP/PP (the stored
tensors are global; Megatron's loader reassembles them). Streaming: parameters are loaded one
layer at a time, split into HF tensors and written straight into pre-planned safetensors shards,
so a process holds about one layer, never a shard or the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from rift_megatron.convert.checkpoint_files import (
    copy_hf_assets,
    find_hf_assets,
    load_architecture,
    resolve_checkpoint,
)
from rift_megatron.convert.errors import ConversionError
from rift_megatron.convert.hf_to_mcore import TARGET_DTYPES, cast_checked
from rift_megatron.convert.dcp_reader import Region, read_metadata, read_regions
from rift_megatron.convert.layout import param_region, sharded_model_state, stored_layout
from rift_megatron.convert.mapping import ParamMapping, expand, hf_row_blocks
from rift_megatron.convert.megatron_world import tp1_megatron_world
from rift_megatron.convert.safetensors_io import (
    StreamingSafetensorsWriter,
    parse_size,
    plan_shards,
    shard_file_names,
    write_index,
)
from rift_megatron.models.hf_config import ModelArchitecture
from rift_megatron.staging import check_writable, staged_directory

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
    checkpoint: Path, arch: ModelArchitecture, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(HF name, first row, rows) covering the whole model in HF tensor order, each tensor's
    blocks in row order; tensors of non-row-wise mappings come whole (first row 0).

    Memory is one stored chunk (or one layer's fused QKV). `dtype=None` keeps the stored dtype
    (bit-exact round trips). Needs a TP1 Megatron world.
    """
    state = sharded_model_state(arch)
    chunks, _ = stored_layout(state)
    metadata = read_metadata(checkpoint).state_dict_metadata
    stored = _stored_dtypes(checkpoint, chunks)
    for mapping in (m for group in export_groups(arch) for m in group):
        param_shape = tuple(state[mapping.megatron].data.shape)
        region = param_region(chunks[mapping.megatron])
        row_axis = len(region.sizes) - len(param_shape)
        row_wise = len(param_shape) > 1 and mapping.row_pieces(arch, 0, 1) is not None
        blocks = _row_blocks(metadata[region.key].chunks, region, row_axis) if row_wise else [(0, param_shape[0])]
        for start, stop in blocks:
            offsets = list(region.offsets)
            sizes = list(region.sizes)
            offsets[row_axis] += start
            sizes[row_axis] = stop - start
            (block,) = read_regions(checkpoint, [Region(region.key, tuple(offsets), tuple(sizes))], [stored[mapping.megatron]])
            block = block.reshape(stop - start, *param_shape[1:])
            pieces = hf_row_blocks(mapping, arch, block, start) if row_wise else None
            if pieces is None:
                pieces = [(name, 0, tensor) for name, tensor in zip(mapping.hf, mapping.to_hf(block, arch))]
            for name, first_row, tensor in pieces:
                yield name, first_row, tensor if dtype is None else cast_checked(tensor, dtype, name)


def _hf_specs(arch: ModelArchitecture, dtypes: dict[str, torch.dtype], dtype: torch.dtype | None):
    """(name, shape, dtype) of every HF tensor in write order, known before reading any data."""
    specs = []
    for mapping in (m for group in export_groups(arch) for m in group):
        for name, shape in zip(mapping.hf, mapping.hf_shapes(arch)):
            specs.append((name, tuple(shape), dtype or dtypes[mapping.megatron]))
    return specs


def _write_shards(staging: Path, shards: dict[str, list], weight_map: dict[str, str], blocks) -> int:
    """Stream blocks into their pre-planned shard files (in order); returns the bytes written."""
    writer, total = None, 0
    try:
        for name, first_row, rows in blocks:
            file_name = weight_map[name]
            if writer is None or writer.path.name != file_name:
                if writer is not None:
                    writer.close()
                writer = StreamingSafetensorsWriter(staging / file_name, shards[file_name], metadata={"format": "pt"})
            writer.write_rows(name, first_row, rows)
            total += rows.numel() * rows.element_size()
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return total


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
    overwrite: bool = False,
) -> Path:
    """Export a Megatron checkpoint as an HF folder that transformers and vLLM load unedited."""
    out_dir = Path(out_dir)
    check_writable(out_dir, overwrite)
    checkpoint = resolve_checkpoint(ckpt_dir)
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
        shards = plan_shards(_hf_specs(arch, stored, target), shard_bytes)
        names = shard_file_names(len(shards))
        weight_map = {name: file_name for file_name, shard in zip(names, shards) for name, _, _ in shard}
        total = _write_shards(staging, dict(zip(names, shards)), weight_map, iter_hf_blocks(checkpoint, arch, target))
        write_index(staging, weight_map, total)
        copy_hf_assets(assets, staging)
        export_dtype = target or next(iter(stored.values()))
        _export_config(assets, staging, export_dtype)
    return out_dir
