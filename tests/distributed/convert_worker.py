"""Worker for tests/distributed/test_convert_layouts.py, launched once by torchrun on 4 processes.

For every converted checkpoint named in the JSON spec it

* runs Megatron's forward pass at TP1, TP2, PP2 and TP2xPP2 (or the job's "layouts"; DP fills
  the rest of the 4-process world) with `verify_worker.megatron_logits` - the code path of
  `rift convert verify` - and saves the full-vocabulary logits for the test to compare with
  `transformers`;
* "save": loads the checkpoint into the model at TP2xPP2 and at TP1 and saves it back as a
  training checkpoint (`save_model_checkpoint` + `hf_assets`), unchanged ("step0");
* "train": trains one RIFT step from it at both layouts (same global batch) and saves that too
  ("step1").

All assertions run in the test process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from rift_megatron.convert.checkpoint_files import HF_ASSETS, copy_hf_assets, load_architecture
from rift_megatron.convert.verify_worker import megatron_logits
from rift_megatron.loss import LossSettings
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
from rift_megatron.training.batch import shard_for_data_parallel
from rift_megatron.training.checkpoint import load_model_checkpoint, save_model_checkpoint
from rift_megatron.training.setup import OptimConfig, build_model_chunks, setup_training
from rift_megatron.training.step import train_step
from tests.synthetic_batch import mixed_reward_batch
from rift_megatron.models.provider import GPTModelProvider

LOGIT_LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))
SAVE_LAYOUTS = ((2, 2), (1, 1))
TRAIN_LR = 2e-5


def _name(tp: int, pp: int) -> str:
    return f"tp{tp}pp{pp}"


def _finish_save(ckpt: Path, saved: Path) -> None:
    """What the trainer will do itself later: put the model's hf_assets next to the tensors."""
    if dist.get_rank() == 0:
        copy_hf_assets(ckpt / HF_ASSETS, saved / HF_ASSETS)
    dist.barrier()


def logits_at_layouts(ckpt: Path, tokens: torch.Tensor, out: Path, layouts) -> None:
    for tp, pp in layouts:
        logits = megatron_logits(ckpt, ParallelLayout(tensor=tp, pipeline=pp), tokens)
        if logits is not None:  # last pipeline stage, TP rank 0, DP rank 0: exactly one rank
            torch.save(logits, out / f"logits-{_name(tp, pp)}.pt")
        dist.barrier()


def resave_unchanged(ckpt: Path, out: Path) -> None:
    arch = load_architecture(ckpt / HF_ASSETS)
    for tp, pp in SAVE_LAYOUTS:
        layout = ParallelLayout(tensor=tp, pipeline=pp)
        init_model_parallel(layout, seed=1234)
        chunks = build_model_chunks(GPTModelProvider(arch, layout))
        load_model_checkpoint(chunks, ckpt)
        saved = save_model_checkpoint(chunks, out / f"step0-{_name(tp, pp)}")
        _finish_save(ckpt, saved)
        destroy_model_parallel()


def train_one_step(ckpt: Path, out: Path) -> None:
    from megatron.core import parallel_state as ps

    arch = load_architecture(ckpt / HF_ASSETS)
    for tp, pp in SAVE_LAYOUTS:
        layout = ParallelLayout(tensor=tp, pipeline=pp)
        init_model_parallel(layout, seed=1234)
        state = setup_training(arch, layout, OptimConfig(lr=TRAIN_LR), total_steps=1, initial_weights=ckpt)
        batch = mixed_reward_batch(seed=7, vocab_size=arch.vocab_size)
        shard = shard_for_data_parallel(batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        metrics = train_step(state, shard, LossSettings(), micro_batch_size=2)
        saved = save_model_checkpoint(state.unwrapped_chunks(), out / f"step1-{_name(tp, pp)}")
        _finish_save(ckpt, saved)
        if dist.get_rank() == 0:
            (out / f"step1-{_name(tp, pp)}.json").write_text(json.dumps(metrics))
        destroy_model_parallel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    spec = json.loads(Path(parser.parse_args().spec).read_text())
    init_distributed()
    torch.set_num_threads(1)
    for job in spec["jobs"]:
        ckpt, out = Path(job["ckpt"]), Path(job["out"])
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        logits_at_layouts(ckpt, torch.load(job["tokens"]), out, job.get("layouts", LOGIT_LAYOUTS))
        if job.get("save"):
            resave_unchanged(ckpt, out)
        if job.get("train"):
            train_one_step(ckpt, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
