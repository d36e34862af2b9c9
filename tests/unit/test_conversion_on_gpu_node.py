"""Checkpoint conversion on a GPU node uses no GPU (issue 12, item 6), shown on the CPU.

`gpu_node_probe.py` runs the conversion code with `torch.cuda.is_available()` answering True, so
every platform decision takes its CUDA branch, while this CPU build of torch raises at the first
real CUDA call. On today's GPU nodes the same calls would create a CUDA context or allocate the
model on GPU 0 (the layout model was built with CUDA initialisation and TE layers: ~290 GB for a
72B model). The GPU check (`bench/gpu_check.py`) measures the real thing with NVML.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.rollout_fixtures import REPO_ROOT, shared_tiny_model, subprocess_env

PROBE = Path(__file__).with_name("gpu_node_probe.py")
# "A few hundred MB": the 70B layout is metadata only (measured: ~16 MiB of growth, 0.4-2 s).
LAYOUT_RSS_LIMIT_MIB = 256


def _probe(*args: str) -> dict:
    result = subprocess.run([sys.executable, str(PROBE), *args], env=subprocess_env(), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert result.returncode == 0 and lines, f"probe failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return json.loads(lines[-1][len("PROBE "):])


def test_llama3_70b_layout_costs_no_memory_on_a_gpu_node():
    report = _probe("layout")
    assert report["num_parameters"] > 70e9
    assert report["parameters"] == 2 + 80 * 6 + 1  # embedding, head, final norm + 6 per layer
    assert report["rss_growth_mib"] < LAYOUT_RSS_LIMIT_MIB, report


def test_conversion_round_trip_touches_no_cuda_on_a_gpu_node(tmp_path_factory, tmp_path):
    model = shared_tiny_model(tmp_path_factory)
    mcore, exported = tmp_path / "mcore", tmp_path / "hf"
    report = _probe("convert", str(model["hf"]), str(mcore), str(exported))
    assert report == {"exit_codes": [0, 0], "platform": "cuda"}
    source = load_file(model["hf"] / "model.safetensors")
    exported_tensors = {}
    for shard in exported.glob("*.safetensors"):
        exported_tensors.update(load_file(shard))
    assert exported_tensors.keys() == source.keys()
    for name, tensor in source.items():
        assert tensor.dtype == exported_tensors[name].dtype and torch_equal_bits(tensor, exported_tensors[name]), name


def torch_equal_bits(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
