"""Run checkpoint conversion as it runs on a GPU node, on this CPU machine (issue 12, item 6).

`torch.cuda.is_available()` is made to answer True before the project is imported, so every
platform decision takes its CUDA branch (no CPU compatibility layer, NCCL as the default backend,
Transformer Engine by default), while this CPU build of torch raises ("Torch not compiled with
CUDA enabled") at the first real CUDA call: a GPU allocation, a device bind, the CUDA RNG, a
stream sync. Conversion must finish anyway: it is CPU work on every machine, and on a real GPU
node any of those calls would create a CUDA context or place weights on the GPU.

    python tests/unit/gpu_node_probe.py layout             # Llama-3-70B layout: RSS growth, seconds
    python tests/unit/gpu_node_probe.py convert HF MC HF2  # hf-to-mcore then mcore-to-hf via the CLI

Prints one JSON line prefixed with PROBE.
"""

from __future__ import annotations

import json
import sys

import torch

torch.cuda.is_available = lambda: True  # a CUDA machine, as far as the code can tell


def layout() -> dict:
    import time

    import psutil

    from rift_megatron.convert.layout import sharded_model_state, stored_layout
    from rift_megatron.convert.megatron_world import tp1_megatron_world
    from rift_megatron.models.hf_config import parse_hf_config
    from rift_megatron.models.presets import LLAMA3_70B

    arch = parse_hf_config(LLAMA3_70B)
    with tp1_megatron_world():
        before = psutil.Process().memory_info().rss
        started = time.perf_counter()
        chunks, _ = stored_layout(sharded_model_state(arch))
        after = psutil.Process().memory_info().rss
    return {"rss_growth_mib": (after - before) / 2**20, "seconds": time.perf_counter() - started,
            "parameters": len(chunks), "num_parameters": arch.num_parameters()}


def convert(hf: str, mcore: str, hf2: str) -> dict:
    from rift_megatron.cli import main
    from rift_megatron.platform import current_platform

    codes = [main(["convert", "hf-to-mcore", "--hf", hf, "--out", mcore]),
             main(["convert", "mcore-to-hf", "--ckpt", mcore, "--out", hf2])]
    return {"exit_codes": codes, "platform": current_platform().kind}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    result = layout() if command == "layout" else convert(*args)
    print("PROBE " + json.dumps(result), flush=True)
