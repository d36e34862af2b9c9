"""Worker for test_meta_parameter_counts.py, launched by torchrun on 4 processes.

Per layout of the spec it initialises Megatron's model-parallel groups (Megatron 0.16's layers read
the TP size from real process groups, so TP shards need real ranks), builds this rank's chunk(s) of
each model with the trainer's own `model_chunks` on the meta device (a 72B model, no memory),
counts their parameters and tears the groups down again. Rank 0 writes every rank's counts to
`<work_dir>/counts.json`; the test compares them with the memory model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from rift_megatron.models import parse_hf_config
from rift_megatron.models.presets import LLAMA3_70B, QWEN25_72B, tiny_hf_config
from rift_megatron.models.provider import GPTModelProvider
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
from rift_megatron.platform import Platform
from rift_megatron.training.setup import model_chunks

# 8 layers and 4 KV heads so that every layout of the test (up to TP4, PP4 x VPP2) splits it; tied
# embeddings, so at PP > 1 the last stage holds the output layer's copy of the embedding.
MODELS = {
    "llama3_70b": LLAMA3_70B,
    "qwen25_72b": QWEN25_72B,
    "tiny_tied": tiny_hf_config(num_hidden_layers=8, num_key_value_heads=4, tie_word_embeddings=True),
}


def layout_of(entry: dict) -> ParallelLayout:
    return ParallelLayout(tensor=entry["tp"], pipeline=entry["pp"], virtual_pipeline=entry.get("vpp"))


def count_parameters(arch, layout: ParallelLayout) -> int:
    """This rank's parameters of `arch` at `layout` (all its virtual chunks), built on the meta device
    with CPU initialisation and local layers as conversion builds its TP1 model."""
    provider = GPTModelProvider(arch, layout, platform=Platform(kind="cpu", backend="gloo"), layer_impl="local")
    with torch.device("meta"):
        chunks = model_chunks(provider)
    return sum(param.numel() for chunk in chunks for param in chunk.parameters())


def main() -> None:
    from megatron.core import parallel_state as ps

    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    spec = json.loads(Path(parser.parse_args().spec).read_text())
    init_distributed(cpu_only=True)
    mine = []
    for entry in spec["layouts"]:
        init_model_parallel(layout_of(entry), seed=None)
        for model in spec["models"]:
            mine.append({"layout": entry, "model": model, "rank": dist.get_rank(),
                         "stage": ps.get_pipeline_model_parallel_rank(),
                         "tp_rank": ps.get_tensor_model_parallel_rank(),
                         "parameters": count_parameters(parse_hf_config(MODELS[model]), layout_of(entry))})
        destroy_model_parallel()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        (Path(spec["work_dir"]) / "counts.json").write_text(json.dumps([row for rank in gathered for row in rank]))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
