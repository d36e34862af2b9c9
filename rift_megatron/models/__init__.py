"""Llama-family model providers for Megatron-Core, built from Hugging Face configs.

The provider names (which need torch and megatron) are loaded on first use, so that importing
the torch-free parts (`hf_config`, `vocab`, the memory model built on them) stays fast.
"""

from rift_megatron.models.families import FAMILIES, Family
from rift_megatron.models.hf_config import (
    ModelArchitecture,
    ModelConfigError,
    load_hf_config,
    parse_hf_config,
)
from rift_megatron.models.vocab import padded_vocab_size

_PROVIDER_NAMES = ("GPTModelProvider", "PrecisionConfig", "build_transformer_config")


def __getattr__(name: str):
    if name in _PROVIDER_NAMES:
        from rift_megatron.models import provider

        return getattr(provider, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
