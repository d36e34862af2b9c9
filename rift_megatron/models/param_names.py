"""Checkpoint names of a live Megatron model's parameters: one name per weight, whatever the
layer implementation and pipeline layout.

The same weight has different `named_parameters()` names in a Transformer Engine model and in a
local-spec model: TE fuses the layer norms into the linears
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`) where the
local spec has separate modules (`input_layernorm.weight`, `pre_mlp_layernorm.weight`). Megatron
itself reconciles them for `dist_checkpointing`: every TransformerLayer applies its spec's
`sharded_state_dict_keys_map` (local -> TE prefixes; empty for TE) to its keys. We apply the very
same map, read from the live layer, so there is no second, hand-written list; layer indices are
made global (a pipeline stage's or virtual chunk's layer 0 is `layer_number - 1` of the model).

The resulting name, e.g. `decoder.layers.17.self_attention.linear_qkv.layer_norm_weight`, is the
per-layer form of the key Megatron stores in a checkpoint, and the key of the conversion table
(`convert/mapping.py`), which therefore serves TE and local models alike.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def checkpoint_name(chunk: torch.nn.Module, local_name: str) -> str:
    """`local_name` (a `chunk.named_parameters()` / state-dict name of an unwrapped GPTModel
    chunk) -> the checkpoint name with the global layer index."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    layer = chunk.decoder.layers[int(match.group(1))]
    rest = local_name[match.end():]
    keys_map = getattr(getattr(layer, "submodules_config", None), "sharded_state_dict_keys_map", None) or {}
    for old, new in keys_map.items():  # Megatron's apply_prefix_mapping: the first match wins
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def named_checkpoint_parameters(chunks: list[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """Checkpoint name -> parameter for this rank's (unwrapped) model chunks.

    A tied output layer on the last pipeline stage (a second copy of the embedding that Megatron
    keeps in sync) is reported under `output_layer.weight`; callers that follow the conversion
    table simply never ask for it when embeddings are tied.
    """
    params: dict[str, torch.nn.Parameter] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            params[checkpoint_name(chunk, name)] = param
    return params
