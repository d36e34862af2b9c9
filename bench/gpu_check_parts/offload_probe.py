"""The trainer offload on one device, measured (issue 15 section 1): run as a subprocess by
`check_trainer_offload` (`python bench/gpu_check_parts/offload_probe.py --hf DIR --out JSON`).

Builds the trainer as `rift train` does (bf16, Megatron DDP, distributed optimizer) on the HF
folder's architecture with random weights, takes one optimizer step (so Adam's state exists),
then offloads every part (`rollout.param_offload` / `grad_offload` / `optimizer_offload`) and
reloads it, reading `torch.cuda.memory_allocated` before, while offloaded and after, and a
checksum of every offloaded storage before and after; then one more step must train. Without
CUDA it runs the same code host to host and reports no device memory (null).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _allocated() -> int | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _checksums(storages: dict) -> dict[str, list[list[int]]]:
    """Per part, per storage: the sum of its bytes and of its bytes times their position mod 251
    (a moved or reordered byte changes the second), in chunks of 64 MiB (int64 copies of whole
    storages would not fit next to them)."""
    from rift_megatron.training.offload import bytes_view

    out = {}
    for part, items in storages.items():
        sums = []
        for storage in items:
            plain = weighted = 0
            for start, chunk in _chunks(bytes_view(storage, storage.nbytes())):
                values = chunk.to(torch.int64)
                positions = (torch.arange(chunk.numel(), device=chunk.device) + start) % 251
                plain += int(values.sum())
                weighted += int((values * positions).sum())
            sums.append([plain, weighted])
        out[part] = sums
    return out


def _chunks(view: torch.Tensor, size: int = 2**26):
    for start in range(0, view.numel(), size):
        yield start, view[start:start + size]


def _all_zero(storage) -> bool:
    from rift_megatron.training.offload import bytes_view

    return not any(bool(chunk.any()) for _, chunk in _chunks(bytes_view(storage, storage.nbytes())))


def probe(hf_dir: Path) -> dict:
    from rift_megatron.loss import LossSettings
    from rift_megatron.models.hf_config import load_hf_config
    from rift_megatron.models.provider import PrecisionConfig
    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
    from rift_megatron.training.offload import OffloadParts, TrainerOffload
    from rift_megatron.training.setup import OptimConfig, setup_training
    from rift_megatron.training.step import train_step
    from tests.synthetic_batch import mixed_reward_batch

    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)
    arch = load_hf_config(hf_dir)
    state = setup_training(arch, ParallelLayout(), OptimConfig(lr=1e-5), PrecisionConfig("bf16"),
                           total_steps=2, layer_impl="local")
    batch = mixed_reward_batch(seed=7, seq_len=256, vocab_size=arch.vocab_size)
    first = train_step(state, batch, LossSettings(), micro_batch_size=4)
    offload = TrainerOffload(state, OffloadParts(params=True, grads=True, optimizer=True))
    storages = offload.storages()
    part_bytes = {part: sum(s.nbytes() for s in items) for part, items in storages.items()}
    before_sums = _checksums({k: v for k, v in storages.items() if k != "grads"})  # grads come back zeroed
    before = _allocated()
    started = time.perf_counter()
    offload.offload()
    offload_seconds = time.perf_counter() - started
    offloaded = _allocated()
    released_sizes = [s.nbytes() for items in storages.values() for s in items]
    metrics = offload.reload()
    reloaded = _allocated()
    after_sums = _checksums({k: v for k, v in storages.items() if k != "grads"})
    grads_zero = all(_all_zero(s) for s in storages["grads"])
    second = train_step(state, batch, LossSettings(), micro_batch_size=4)
    destroy_model_parallel()
    return {
        "cuda": torch.cuda.is_available(), "part_bytes": part_bytes, "offloaded_bytes": sum(part_bytes.values()),
        "allocated_before": before, "allocated_offloaded": offloaded, "allocated_reloaded": reloaded,
        "storages_empty_while_offloaded": all(size == 0 for size in released_sizes),
        "checksums_equal": before_sums == after_sums, "grads_zero_after_reload": grads_zero,
        "offload_seconds": offload_seconds, "reload_seconds": metrics["trainer_reload_seconds"],
        "loss_first_step": first["loss"], "loss_after_reload": second["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.write_text(json.dumps(probe(args.hf), indent=2))


if __name__ == "__main__":
    main()
