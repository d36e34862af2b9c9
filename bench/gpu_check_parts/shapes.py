"""The model and run shapes the GPU check uses: `--size full` (~0.9B), `--size quick` (~20M),
and the CPU-sized parity model. Nothing here runs anything; the shapes are read by the fixtures
(what to build) and the checks (what to run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """A Llama shape; head_dim = hidden / heads (>= 32, like every model in this project)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    max_positions: int

    def hf_config(self, torch_dtype: str) -> dict[str, Any]:
        from rift_megatron.models.presets import tiny_hf_config

        return tiny_hf_config(hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                              num_key_value_heads=self.kv_heads, intermediate_size=self.ffn, vocab_size=self.vocab,
                              max_position_embeddings=self.max_positions, torch_dtype=torch_dtype)

    def num_parameters(self) -> int:
        from rift_megatron.models import parse_hf_config

        return parse_hf_config(self.hf_config("float32")).num_parameters()


@dataclass(frozen=True)
class RunShape:
    """An offline run: `steps` global batches of equal-length samples (no padding)."""

    steps: int
    global_batch: int
    micro_batch: int
    prompt_len: int
    response_len: int

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len


# ~0.89B parameters (TinyLlama-like width, 16 layers, GQA 16/8, head_dim 128), bf16 ~1.8 GB.
BIG = ModelShape("llama-0.9b", 2048, 16, 16, 8, 5632, 32000, 2048)
BIG_RUN = RunShape(steps=5, global_batch=16, micro_batch=4, prompt_len=256, response_len=768)
# --size quick (and the default without CUDA): ~20M parameters, seconds on two CPU cores.
SMALL = ModelShape("llama-20m", 512, 4, 8, 4, 1408, 8000, 256)
SMALL_RUN = RunShape(steps=5, global_batch=8, micro_batch=4, prompt_len=32, response_len=96)
# The parity model, CPU-sized: ~3.4M parameters.
PARITY = ModelShape("llama-3m", 256, 4, 4, 2, 688, 1000, 256)
PARITY_RUN = RunShape(steps=5, global_batch=16, micro_batch=4, prompt_len=32, response_len=96)
SEED = 1234
