"""The Llama-family architectures we support, declared as data.

All three share Megatron-Core's GPT block (RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query
attention); they differ only in the switches below. Adding a family that fits this shape is one
entry here; one that does not (MoE, sliding-window attention used for real, other activations)
is refused by `parse_hf_config` until it has its own module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture maps onto the shared GPT block."""

    name: str
    hf_model_type: str
    # q/k/v biases: fixed for the family. `qkv_bias_field` names a config.json switch that
    # parse_hf_config refuses when true (Llama's attention_bias also biases o_proj).
    qkv_bias_default: bool
    qkv_bias_field: str | None
    tied_embeddings_default: bool
    # Field that switches a per-layer sliding window on (Qwen2: refused, since Megatron's window
    # applies to every layer). None: `sliding_window` alone decides and applies to every layer,
    # as in Mistral.
    sliding_window_flag: str | None = None


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(
        name="llama",
        hf_model_type="llama",
        qkv_bias_field="attention_bias",
        qkv_bias_default=False,
        tied_embeddings_default=False,
    ),
    "Qwen2ForCausalLM": Family(
        name="qwen2",
        hf_model_type="qwen2",
        qkv_bias_field=None,  # Qwen2 always has q/k/v biases
        qkv_bias_default=True,
        tied_embeddings_default=False,
        sliding_window_flag="use_sliding_window",
    ),
    "MistralForCausalLM": Family(
        name="mistral",
        hf_model_type="mistral",
        qkv_bias_field=None,
        qkv_bias_default=False,
        tied_embeddings_default=False,
    ),
}
