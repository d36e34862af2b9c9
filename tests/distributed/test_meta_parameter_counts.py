"""Per-rank parameter counts of the memory model (rift_megatron/memory_model.py `stage_parameters`)
against real megatron-core GPTModels built on the meta device, on 4 real gloo ranks (issue 16).

The single-process unit test checks every stage kind at TP1 only: Megatron 0.16's layers read the
TP size from real process groups, and GPTModel needs a real pipeline group to build the tied output
layer's copy on the last stage. Here one torchrun launch builds, for each TP / PP / VPP layout
below, every rank's chunk(s) of Llama-3-70B, Qwen2.5-72B and a tiny model with tied embeddings
(meta device: no memory), and each rank's count must equal the prediction for its pipeline stage
exactly: TP shards of the layers (Qwen's q/k/v biases included), replicated norms, the vocabulary
padded to 128 x TP, the output layer on the last stage (the tied copy at PP > 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rift_megatron.memory_model import Layout, stage_parameters
from rift_megatron.models import parse_hf_config
from tests.distributed.launch import run_torchrun
from tests.distributed.meta_count_worker import MODELS

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("meta_count_worker.py")
WORLD = 4
LAYOUTS = [
    {"tp": 4, "pp": 1},
    {"tp": 2, "pp": 2},
    {"tp": 1, "pp": 4},
    {"tp": 2, "pp": 2, "vpp": 2},
    {"tp": 1, "pp": 4, "vpp": 2},
]


def test_every_rank_holds_the_parameters_the_memory_model_counts(tmp_path):
    """Every (layout, model, rank) reported once, and each count equal to its stage's prediction."""
    run_torchrun(WORKER, WORLD, {"work_dir": str(tmp_path), "layouts": LAYOUTS, "models": list(MODELS)}, tmp_path,
                 timeout=300)
    counts = json.loads((tmp_path / "counts.json").read_text())
    checked = {(json.dumps(row["layout"]), row["model"], row["rank"]) for row in counts}
    assert checked == {(json.dumps(layout), model, rank) for layout in LAYOUTS for model in MODELS
                       for rank in range(WORLD)} and len(counts) == len(checked)
    wrong = []
    for row in counts:
        entry = row["layout"]
        layout = Layout(tensor=entry["tp"], pipeline=entry["pp"], virtual_pipeline=entry.get("vpp"))
        predicted = stage_parameters(parse_hf_config(MODELS[row["model"]]), layout, row["stage"])
        if row["parameters"] != predicted:
            wrong.append(f"{entry} {row['model']} rank {row['rank']} (stage {row['stage']}, TP rank {row['tp_rank']}): "
                         f"built {row['parameters']}, predicted {predicted}")
    assert not wrong, "\n".join(wrong)

