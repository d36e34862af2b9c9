"""Megatron forward pass for `rift convert verify`, run under torchrun at a given TP/PP.

Loads the checkpoint into the real Megatron model at the requested layout, runs the fixed token
batch through Megatron's forward-only schedule, gathers the vocab-parallel logits of the last
stage (a verification tool may gather; training never does), strips vocabulary padding and saves
them for the parent process to compare with `transformers`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from rift_megatron.convert.checkpoint_files import find_hf_assets, load_architecture, resolve_checkpoint
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
from rift_megatron.training.checkpoint import load_model_checkpoint
from rift_megatron.training.forward import forward_only
from rift_megatron.training.setup import build_model_chunks
from rift_megatron.models.provider import GPTModelProvider


def megatron_logits(checkpoint: Path, layout: ParallelLayout, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary fp32 logits [batch, seq, vocab] on the last stage's TP rank 0, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    arch = load_architecture(find_hf_assets(checkpoint))
    init_model_parallel(layout, seed=0)
    try:
        chunks = build_model_chunks(GPTModelProvider(arch, layout))
        load_model_checkpoint(chunks, checkpoint)
        result = forward_only(chunks, tokens, lambda logits: {"logits": logits.detach()})
        if result is None:
            return None
        logits = gather_from_tensor_model_parallel_region(result["logits"])
        if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
            return None
        return logits[..., : arch.vocab_size].float()
    finally:
        destroy_model_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tokens", required=True, help="torch.save'd int64 [batch, seq] token ids")
    parser.add_argument("--out", required=True, help="where the logits are torch.save'd")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    init_distributed()
    logits = megatron_logits(
        resolve_checkpoint(args.ckpt), ParallelLayout(tensor=args.tp, pipeline=args.pp), torch.load(args.tokens)
    )
    if logits is not None:
        torch.save(logits, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
