"""The Llama-family architectures we support, declared as data.

All three share Megatron-Core's GPT block (RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query
attention); they differ only in the switches below. Adding a family that fits this shape is one
entry here; one that does not (MoE, sliding-window attention used for real, other activations)
needs its own module and is refused by `parse_hf_config` until it exists.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture maps onto the shared GPT block."""

    name: str
    hf_model_type: str
    # q/k/v biases: fixed for the family (field None) or switched by a config.json field.
    qkv_bias_default: bool
    qkv_bias_field: str | None
    tied_embeddings_default: bool
    # Field that must be true for `sliding_window` to be in effect (None: `sliding_window` alone
    # decides, as in Mistral).
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
