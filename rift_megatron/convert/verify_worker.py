"""Megatron forward pass for `rift convert verify`, run under torchrun at a given TP/PP.

Loads the checkpoint into the real Megatron model at the requested layout, runs the fixed token
batch through Megatron's forward-only schedule, gathers the vocab-parallel logits of the last
stage (a verification tool may gather; training never does), strips vocabulary padding and saves
them for the parent process to compare with `transformers`.

`--layers N` builds the model with only its first N transformer layers (plus embedding, final
norm and LM head) and loads it from the full checkpoint with Megatron's own loader; see
`load_first_layers`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rift_megatron.convert.checkpoint_files import find_hf_assets, load_architecture, resolve_checkpoint
from rift_megatron.convert.dcp_reader import read_metadata
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
from rift_megatron.training.checkpoint import load_model_checkpoint
from rift_megatron.training.forward import forward_only
from rift_megatron.training.setup import build_model_chunks
from rift_megatron.models.provider import GPTModelProvider

# Stacked per-layer checkpoint keys (`decoder.layers.<param>`, layer index on axis 0).
_LAYER_KEY_PREFIX = "decoder.layers."


def _first_layers_of(checkpoint_shapes: dict[str, tuple[int, ...]], layers: int, total: int):
    """A function that re-addresses one entry of an N-layer model's sharded state dict to the
    first N layers of the checkpoint's `total`-layer stacked tensors (factories are wrapped so
    that it applies to what they build)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    def first_layers(value: Any) -> Any:
        if isinstance(value, ShardedTensorFactory):
            build = value.build_fn
            value.build_fn = lambda *args: dict_list_map_inplace(first_layers, build(*args))
            return value
        if not isinstance(value, (ShardedTensor, ShardedObject)) or not value.key.startswith(_LAYER_KEY_PREFIX):
            return value
        if value.global_shape[0] != layers or value.global_offset[0] >= layers:
            raise RuntimeError(f"internal: {value.key} is not stacked over the {layers} built layers: "
                               f"global shape {value.global_shape}, offset {value.global_offset}")
        if isinstance(value, ShardedObject):
            value.global_shape = (total, *value.global_shape[1:])  # its checkpoint key encodes the shape
        else:
            stored = checkpoint_shapes.get(value.key)
            if stored != (total, *value.global_shape[1:]):
                raise ValueError(f"checkpoint tensor {value.key!r} has shape {stored}, expected "
                                 f"{(total, *value.global_shape[1:])} ({total} layers)")
            value.allow_shape_mismatch = True
        return value

    return first_layers


def load_first_layers(chunks: list[torch.nn.Module], checkpoint: Path, layers: int, total: int) -> None:
    """Collectively load an N-layer model's chunks from a checkpoint of `total` layers, reading
    only the first N layers' tensors, through Megatron's `dist_checkpointing.load`.

    Megatron stores each per-layer parameter as one tensor stacked over all layers (global shape
    [total, ...]; layer i at offset i on axis 0, one stored chunk per layer, at every TP/PP). An
    N-layer model's sharded state dict names the same keys with global shape [N, ...] and
    offsets 0..N-1: exactly the first N layers' chunks. Checked against Megatron 0.16.1
    (dist_checkpointing/serialization.py, strategies/torch.py, validation.py):

    * Tensors are marked `allow_shape_mismatch`, Megatron's flag for a stored tensor larger than
      the model's (padding): `MCoreLoadPlanner` then plans with the model's [N, ...] shape and
      PyTorch DCP reads only the stored chunks that overlap the requested boxes. The global
      shape check that the flag skips is done here instead (stored == [total, ...]).
      (Widening the model's shape to [total, ...] instead fails: Megatron's torch ShardedTensor
      conversion must place the chunks it does not load on another rank, impossible at world
      size 1.)
    * `_extra_state` objects' checkpoint keys encode the stacked shape (`.../shard_i_<total>`),
      so their shape is widened to `total`.
    * `validate_access_integrity` is off (the only check `load` then skips,
      validation.validate_integrity_and_strict_load): it checks that the ranks together load
      each requested tensor and object exactly once, and the widened objects of layers N.. are
      by design not loaded. The tensors' coverage it would check is that of an ordinary
      N-layer Megatron layout.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    from rift_megatron.trust.admission import load_megatron_checkpoint

    shapes = {key: tuple(item.size) for key, item in read_metadata(checkpoint).state_dict_metadata.items()
              if hasattr(item, "size")}
    sharded = {f"chunk{index}": chunk.sharded_state_dict() for index, chunk in enumerate(chunks)}
    dict_list_map_inplace(_first_layers_of(shapes, layers, total), sharded)
    # `rift convert verify` checked the checksums before starting this worker; the pickles are
    # checked again here (cheap), the tensors read are only those of the first layers.
    loaded = load_megatron_checkpoint(sharded, checkpoint, checksums=False, validate_access_integrity=False)
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"chunk{index}"])


def megatron_logits(
    checkpoint: Path, layout: ParallelLayout, tokens: torch.Tensor, layers: int | None = None
) -> torch.Tensor | None:
    """Full-vocabulary fp32 logits [batch, seq, vocab] on the last stage's TP rank 0, else None.

    `layers`: build and load only the first `layers` transformer layers (None: all).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    arch = load_architecture(find_hf_assets(checkpoint))
    model_arch = arch if layers is None else dataclasses.replace(arch, num_layers=layers)
    init_model_parallel(layout, seed=0)
    try:
        chunks = build_model_chunks(GPTModelProvider(model_arch, layout))
        if layers is None:
            load_model_checkpoint(chunks, checkpoint)
        else:
            load_first_layers(chunks, checkpoint, layers, arch.num_layers)
        result = forward_only(chunks, tokens, lambda logits: {"logits": logits.detach()})
        if result is None:
            return None
        logits = gather_from_tensor_model_parallel_region(result["logits"])
        if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
            return None
        return logits[..., : arch.vocab_size].float().cpu()  # the parent compares on the CPU
    finally:
        destroy_model_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tokens", required=True, help="torch.save'd int64 [batch, seq] token ids")
    parser.add_argument("--out", required=True, help="where the logits are torch.save'd")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="build and load only the first N layers")
    args = parser.parse_args()
    init_distributed()
    logits = megatron_logits(
        resolve_checkpoint(args.ckpt), ParallelLayout(tensor=args.tp, pipeline=args.pp),
        torch.load(args.tokens, weights_only=True), args.layers,
    )
    if logits is not None:
        torch.save(logits, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
