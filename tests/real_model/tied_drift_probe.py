"""Trainer + in-process engine on SmolLM2 (fp32), pushing after every training step; run twice:
with the project's push, and with vLLM's reload alone (the tied-LM-head refresh disabled).

    python tests/real_model/tied_drift_probe.py HF_DIR WORK_DIR

Each step trains on the engine's fresh samples (4 prompts x 2, <= 24 tokens, lr 1e-5) with the
trainer's sync check at the fp32 default; the check's statistics and verdict are recorded. Prints
one JSON line prefixed with PROBE.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = 3
TOLERANCE = 2e-4


def main(hf_dir: str, work: str) -> dict:
    import torch
    from transformers import AutoTokenizer

    from rift_megatron.convert.checkpoint_files import load_architecture
    from rift_megatron.convert.hf_to_mcore import convert_hf_to_mcore
    from rift_megatron.loss import LossSettings
    from rift_megatron.parallel import ParallelLayout, init_distributed, init_model_parallel
    from rift_megatron.rollout import worker_extension
    from rift_megatron.rollout.batching import Sample, build_train_batch
    from rift_megatron.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
    from rift_megatron.rollout.weight_sync import LogprobMismatch, WeightSyncError, check_mismatch, push_weights
    from rift_megatron.training.setup import OptimConfig, setup_training
    from rift_megatron.training.step import train_step
    from tests.real_model.helpers import addition_prompts

    mcore = Path(work) / "mcore"
    convert_hf_to_mcore(hf_dir, mcore)
    init_distributed()
    arch = load_architecture(Path(hf_dir))
    engine = None
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for r in addition_prompts(4)]
    report = {}
    refresh = worker_extension.refresh_tied_modules
    for mode in ("vllm_reload_alone", "refresh"):  # the stale run first, on a fresh engine
        init_model_parallel(ParallelLayout(), seed=0)
        state = setup_training(arch, ParallelLayout(), OptimConfig(lr=1e-5), total_steps=STEPS,
                               initial_weights=mcore)
        if engine is None:
            engine = RolloutEngine(EngineConfig(model=hf_dir, dtype="float32", max_model_len=512, seed=0))
        worker_extension.refresh_tied_modules = refresh if mode == "refresh" else (lambda model, loaded: 0)
        push_weights(engine, state.unwrapped_chunks(), arch)  # the engine starts from this trainer's weights
        steps = []
        for step in range(STEPS):
            generations = engine.generate(prompts, 2, SamplingConfig(max_tokens=24), step=step)
            batch = build_train_batch([Sample(g.prompt_ids, g.response_ids, g.behavior_logprobs, 1.0 if i % 2 == 0 else -0.2)
                                       for i, g in enumerate(generations)], pad_id=tokenizer.pad_token_id)
            seen = {}

            def check(metrics: dict) -> None:
                seen.update(mean=metrics["logprob_diff_mean"], max=metrics["logprob_diff_max"])
                check_mismatch(LogprobMismatch(metrics["logprob_diff_mean"], metrics["logprob_diff_max"],
                                               metrics["token_mult_prob_error"], int(metrics["response_tokens"])),
                               TOLERANCE, f"push {step}")

            try:
                train_step(state, batch, LossSettings(), micro_batch_size=4, check=check)
                caught = None
            except WeightSyncError as error:
                caught = str(error)
            steps.append({**seen, "caught": caught})
            if caught:
                break
            push_weights(engine, state.unwrapped_chunks(), arch)
        report[mode] = steps
        del state
        from rift_megatron.parallel import destroy_model_parallel

        destroy_model_parallel()
        torch.manual_seed(0)
    return report


if __name__ == "__main__":
    print("PROBE " + json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
