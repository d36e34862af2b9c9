"""Llama-family model providers for Megatron-Core, built from Hugging Face configs."""

from rift_megatron.models.families import FAMILIES, Family
from rift_megatron.models.hf_config import (
    ModelArchitecture,
    ModelConfigError,
    load_hf_config,
    parse_hf_config,
)
from rift_megatron.models.provider import (
    GPTModelProvider,
    PrecisionConfig,
    build_transformer_config,
    padded_vocab_size,
)

__all__ = [
    "FAMILIES",
    "Family",
    "GPTModelProvider",
    "ModelArchitecture",
    "ModelConfigError",
    "PrecisionConfig",
    "build_transformer_config",
    "load_hf_config",
    "padded_vocab_size",
    "parse_hf_config",
]
