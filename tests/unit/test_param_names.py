"""One name per weight for Transformer Engine and local-spec models (issue 12, item 1).

With Transformer Engine the layer norms are parameters of the fused linears
(`self_attention.linear_qkv.layer_norm_weight`), with the local spec they are modules of their own
(`input_layernorm.weight`). Megatron-Core reconciles the two in checkpoints through the local
spec's `sharded_state_dict_keys_map`; the conversion / weight-push table is keyed by those
checkpoint names, and live models reach them through `param_names.checkpoint_name`, which applies
the same map read from the layer. These tests derive every expected name from megatron-core
itself (the ShardedTensor keys it writes), never from a second hand-written list.

Transformer Engine cannot be installed on the CPU machines CI runs on, so a TE model is stood in
for by a module tree holding the local model's very parameters under TE's names (the names the
key map says TE uses), with an empty key map, as TE layers have.
"""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

from rift_megatron.convert.mapping import expand  # noqa: E402
from rift_megatron.models.hf_config import parse_hf_config  # noqa: E402
from rift_megatron.models.param_names import checkpoint_name, named_checkpoint_parameters  # noqa: E402
from rift_megatron.models.presets import tiny_hf_config  # noqa: E402
from rift_megatron.models.provider import GPTModelProvider  # noqa: E402
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel  # noqa: E402

VARIANTS = {
    "llama": tiny_hf_config("LlamaForCausalLM"),
    "llama-tied": tiny_hf_config("LlamaForCausalLM", tie_word_embeddings=True),
    "qwen2-bias-tied": tiny_hf_config("Qwen2ForCausalLM", tie_word_embeddings=True),
    "mistral": tiny_hf_config("MistralForCausalLM", sliding_window=64),
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@pytest.fixture()
def megatron_world():
    init_distributed()
    init_model_parallel(ParallelLayout(), seed=1234)
    yield
    destroy_model_parallel()


def _megatron_checkpoint_keys(model) -> dict[str, str]:
    """local state-dict name -> the key Megatron's dist_checkpointing stores, with the layer
    index written back in (Megatron stacks layers along an axis and drops the index)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    keys = {}
    for name, sharded in model.sharded_state_dict().items():
        if isinstance(sharded, ShardedObject):
            continue
        match = _LAYER.match(name)
        key = sharded.key
        if match:
            assert key.startswith("decoder.layers."), key
            key = f"decoder.layers.{match.group(1)}." + key[len("decoder.layers."):]
        keys[name] = key
    return keys


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_table_is_keyed_by_megatrons_checkpoint_keys(megatron_world, variant):
    arch = parse_hf_config(VARIANTS[variant])
    model = GPTModelProvider(arch, ParallelLayout())()
    expected = _megatron_checkpoint_keys(model)
    for local, key in expected.items():
        assert checkpoint_name(model, local) == key, local
    assert {m.megatron for m in expand(arch)} == set(expected.values())
    # the key map is live: local norm names are not checkpoint names
    renamed = {local for local, key in expected.items() if local != key}
    assert {n.split(".", 3)[3] for n in renamed} == {"input_layernorm.weight", "pre_mlp_layernorm.weight"}


def _transformer_engine_stand_in(model) -> torch.nn.Module:
    """A module tree with `model`'s parameters at Transformer Engine's names: each local name
    with the spec's key map applied (what megatron-core says TE calls it), and TE's empty map."""
    root = torch.nn.Module()
    root.decoder = torch.nn.Module()
    root.decoder.layers = torch.nn.ModuleList()
    for layer in model.decoder.layers:
        stand_in = torch.nn.Module()
        stand_in.layer_number = layer.layer_number
        stand_in.submodules_config = SimpleNamespace(sharded_state_dict_keys_map={})
        root.decoder.layers.append(stand_in)
    for local, param in model.named_parameters():
        te_name = checkpoint_name(model, local)
        match = _LAYER.match(te_name)
        owner, path = (root.decoder.layers[int(match.group(1))], te_name[match.end():]) if match else (root, te_name)
        *modules, leaf = path.split(".")
        for part in modules:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, param)
    return root


@pytest.mark.parametrize("variant", ["llama", "qwen2-bias-tied"])
def test_transformer_engine_names_push_the_same_weights(megatron_world, variant):
    """The weight push reads a TE model exactly as a local one: same HF names, same tensors."""
    from rift_megatron.rollout.weight_sync import hf_weights

    arch = parse_hf_config(VARIANTS[variant])
    model = GPTModelProvider(arch, ParallelLayout())()
    te_model = _transformer_engine_stand_in(model)
    te_names = {name for name, _ in te_model.named_parameters()}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te_names
    assert not any("input_layernorm" in name for name in te_names)

    local_params = named_checkpoint_parameters([model])
    te_params = named_checkpoint_parameters([te_model])
    assert local_params.keys() == te_params.keys()
    assert all(local_params[name] is te_params[name] for name in local_params)

    local = list(hf_weights([model], arch))
    from_te = list(hf_weights([te_model], arch))
    assert [name for name, _ in local] == [name for name, _ in from_te]
    assert "model.layers.0.input_layernorm.weight" in dict(local)
    for (name, a), (_, b) in zip(local, from_te):
        assert torch.equal(a, b), name
