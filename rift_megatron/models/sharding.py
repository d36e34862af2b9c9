"""Which tensor / pipeline sizes Megatron can shard a model into: the one rule.

Torch-free, so the planner (rift_megatron/planner/) can test thousands of layouts without
importing Megatron; `provider.validate_layout` raises with the same message before a model is built.
"""

from __future__ import annotations

from rift_megatron.models.hf_config import ModelArchitecture


def sharding_problem(arch: ModelArchitecture, tensor: int, pipeline: int, virtual_pipeline: int | None = None) -> str | None:
    """Why Megatron cannot split `arch` over `tensor` x `pipeline` (x `virtual_pipeline` chunks), naming
    the config.json field, or None. TP splits the attention heads, the key/value heads (query
    groups) and the FFN columns; the pipeline's chunks split the layers evenly."""
    checks = (
        ("num_attention_heads", arch.num_attention_heads, tensor, "tensor"),
        ("num_key_value_heads", arch.num_kv_heads, tensor, "tensor"),
        ("intermediate_size", arch.ffn_hidden_size, tensor, "tensor"),
        ("num_hidden_layers", arch.num_layers, pipeline * (virtual_pipeline or 1), "pipeline x virtual_pipeline"),
    )
    for name, value, divisor, what in checks:
        if value % divisor:
            return f"{arch.source}: '{name}'={value} is not divisible by the {what} parallel size {divisor}"
    return None
