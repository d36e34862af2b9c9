"""The shard push's per-rank conversion against vLLM's own weight loaders (CPU proxy for TP2 / TP4).

For every HF tensor of a tiny model (8 heads in 4 query groups, vocabulary 300, Llama and Qwen2
with its q/k/v biases), vLLM's real layer for tensor-parallel rank r of R loads (a) the full HF
tensor, as the gather path hands it over, and (b) the tensor the shard path builds on Megatron's
TP rank r from Megatron's own shard r (`local_hf_shards` + `full_shaped`); the loaded parameters
must be bit-identical, for every rank at R = 2 and 4. The layers are vLLM's classes built in this
process with vLLM's TP rank / size queries answering r and R (one process cannot hold a real
vLLM TP group of 4); everything else, the loaders' narrowing included, is vLLM's code. The
vocabulary rows a worker needs from a neighbour arrive by point-to-point exchange, which the
engine-TP2 torchrun run of tests/distributed/test_rollout_sync.py checks (received bytes exact,
log-probs after the push); here the rows are taken as `engine_vocab_rows` says.
"""

from __future__ import annotations

import pytest
import torch

from rift_megatron.convert.mapping import FusedGateUp, FusedQKV, VocabRows, expand
from rift_megatron.models import parse_hf_config
from rift_megatron.models.presets import tiny_hf_config
from rift_megatron.rollout.shard_push import engine_vocab_rows, full_shaped, local_hf_shards

VOCAB = 300  # vLLM pads to 320, Megatron to 384 (TP2) / 512 (TP4): the row ranges differ


@pytest.fixture
def vllm_rank(monkeypatch):
    """Set the TP rank and size vLLM's layers see: `vllm_rank(r, size)`."""
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab
    import vllm.model_executor.parameter as parameter

    def place(rank: int, size: int) -> None:
        for module in (linear, vocab, parameter):
            for name, value in (("get_tensor_model_parallel_rank", rank), ("get_tensor_model_parallel_world_size", size)):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, lambda value=value: value)

    return place


def _vllm_layer(hf_name: str, arch):
    """(vLLM layer that loads `hf_name`, parameter name, shard id) as the model's loader uses them."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    d, h, f = arch.head_dim, arch.hidden_size, arch.ffn_hidden_size
    kind = hf_name.rsplit(".", 1)[-1]
    part = hf_name.split(".")[-2]
    if part in ("q_proj", "k_proj", "v_proj"):
        layer = QKVParallelLinear(h, d, arch.num_attention_heads, arch.num_kv_heads, bias=arch.qkv_bias,
                                  params_dtype=torch.float32)
        return layer, kind, part[0]
    if part in ("gate_proj", "up_proj"):
        return MergedColumnParallelLinear(h, [f, f], bias=False, params_dtype=torch.float32), kind, int(part == "up_proj")
    if part == "o_proj":
        return RowParallelLinear(arch.num_attention_heads * d, h, bias=False, params_dtype=torch.float32), kind, None
    if part == "down_proj":
        return RowParallelLinear(f, h, bias=False, params_dtype=torch.float32), kind, None
    if part == "embed_tokens":
        return VocabParallelEmbedding(arch.vocab_size, h, params_dtype=torch.float32), kind, None
    if part == "lm_head":
        return ParallelLMHead(arch.vocab_size, h, params_dtype=torch.float32), kind, None
    return None  # norms: replicated, loaded as they are


def _load(hf_name: str, tensor: torch.Tensor, arch) -> torch.Tensor | None:
    built = _vllm_layer(hf_name, arch)
    if built is None:
        return None
    layer, param_name, shard = built
    param = getattr(layer, param_name)
    param.data.zero_()
    param.weight_loader(param, tensor) if shard is None else param.weight_loader(param, tensor, shard)
    return param.data.clone()


def _megatron_shard(mapping, full: torch.Tensor, hf: list[torch.Tensor], rank: int, size: int) -> torch.Tensor:
    """Megatron's TP shard `rank` of a parameter: whole query groups of the fused QKV, [gate_r; up_r]
    of the SwiGLU fc1 (Megatron's TP layout), input columns of o_proj / down_proj."""
    if isinstance(mapping, FusedQKV):
        return full.chunk(size, dim=0)[rank]
    if isinstance(mapping, FusedGateUp):
        return torch.cat([hf[0].chunk(size)[rank], hf[1].chunk(size)[rank]])
    return full.chunk(size, dim=1)[rank] if full.dim() == 2 else full


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("size", [2, 4])
def test_each_ranks_shard_loads_into_vllm_exactly_like_the_full_tensor(vllm_rank, architecture, size):
    arch = parse_hf_config(tiny_hf_config(architecture, vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                          num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=1))
    generator = torch.Generator().manual_seed(0)
    compared = set()
    for mapping in expand(arch):
        hf = [torch.randn(shape, generator=generator) for shape in mapping.hf_shapes(arch)]
        full = mapping.to_megatron(hf, arch)
        partition_dim = None if full.dim() == 1 and not isinstance(mapping, FusedQKV) else (
            1 if mapping.megatron.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0)
        for rank in range(size):
            vllm_rank(rank, size)
            if isinstance(mapping, VocabRows):
                start, stop = engine_vocab_rows(arch, rank, size)
                shards = [hf[0][start:stop]]  # what the boundary exchange delivers
            else:
                shards = local_hf_shards(mapping, _megatron_shard(mapping, full, hf, rank, size), arch, size)
            for name, reference, shard in zip(mapping.hf, hf, shards):
                placed = full_shaped(shard, tuple(reference.shape), mapping, arch, partition_dim, rank, size)
                expected = _load(name, reference, arch)
                if expected is None:
                    assert torch.equal(placed, reference), name
                else:
                    got = _load(name, placed, arch)
                    assert torch.equal(got, expected), (name, rank, size)
                    assert torch.isfinite(got).all(), (name, rank, size)
                compared.add(name.rsplit(".", 2)[-2])
    expected_parts = {"embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "lm_head", "input_layernorm", "post_attention_layernorm", "norm"}
    assert expected_parts <= compared, compared
