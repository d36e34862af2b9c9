"""`rift rollout` end to end, and the rollout engine's sampling contract, on a tiny local model.

The model (tests/rollout_fixtures.py) is a random-init 4-layer Llama (head_dim 32, fp32) with a
300-piece sentencepiece tokenizer trained on synthetic arithmetic; nothing is downloaded.
vLLM never runs in the pytest process: the CLI runs as `python -m rift_megatron.cli rollout` in a
subprocess, and the engine checks come from one single-process run of
tests/distributed/rollout_worker.py (shared with test_rollout_sync.py's TP1 checks).

Tolerance for log-probs: LOGPROB_ATOL = 1e-4 (fp32 engine vs fp32 transformers; measured
<= 3e-6; justification in tests/rollout_fixtures.py). The CLI is run with `--dtype float32`:
its default `auto` lets vLLM downcast a float32 checkpoint to bfloat16 on CPU (~0.05 off).

test_adjacent_requests_do_not_share_random_streams guards the hashed request seeds: vLLM seeds
the K children of a request with seed + j, so per-request seeds 1 apart would share streams.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict

import pytest

from tests.rollout_fixtures import (
    LOGPROB_ATOL,
    REPO_ROOT,
    arithmetic_prompts,
    parity_reward,
    shared_tiny_model,
    single_process_report,
    subprocess_env,
    tiny_config,
    write_jsonl,
)

COLUMNS = ["prompt_id", "prompt", "response", "prompt_ids", "response_ids", "behavior_logprobs", "reward", "correct"]
NUM_PROMPTS, K, MAX_TOKENS = 3, 4, 10
R_POS, R_NEG = 0.75, -0.25  # not the defaults: the flags must reach the buffer
SEED = 3
EOS_ID = tiny_config()["eos_token_id"]


def rift(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rift_megatron.cli", *argv],
        env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )


# ------------------------------------------------------------------------------ rift rollout


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def rollout(model, tmp_path_factory) -> dict:
    """One `rift rollout` run: 3 prompts x K=4, two generate batches (--batch-prompts 2), a
    response-dependent reward function so the buffer holds correct and incorrect samples."""
    from datasets import load_dataset

    work = tmp_path_factory.mktemp("rollout-cli")
    records = arithmetic_prompts(NUM_PROMPTS)
    prompts = write_jsonl(work / "prompts.jsonl", records)
    out = work / "buffer"
    result = rift(
        "rollout", "--model", str(model["hf"]), "--prompts", str(prompts), "-k", str(K), "--out", str(out),
        "--max-tokens", str(MAX_TOKENS), "--reward", "tests.rollout_fixtures:parity_reward",
        "--r-pos", str(R_POS), "--r-neg", str(R_NEG), "--seed", str(SEED), "--batch-prompts", "2",
        # vLLM's "auto" (the CLI default) downcasts a float32 checkpoint to bfloat16 on CPU, whose
        # log-probs differ from fp32 by ~0.05: the fp32 comparison below needs fp32 sampling.
        "--dtype", "float32",
    )
    assert result.returncode == 0, f"rift rollout failed ({result.returncode}):\n{result.stderr[-8000:]}"
    table = load_dataset("parquet", data_files=str(out / "rollout.parquet"), split="train", cache_dir=str(work / "hf-cache"))
    return {
        "records": records, "prompts_file": prompts, "out": out, "table": table, "rows": table.to_list(),
        "manifest": json.loads((out / "manifest.json").read_text()), "stdout": result.stdout,
    }


def test_buffer_has_n_times_k_rows_with_exactly_the_documented_columns(rollout):
    assert sorted(p.name for p in rollout["out"].iterdir()) == ["manifest.json", "rollout.parquet"]
    assert rollout["table"].column_names == COLUMNS
    rows = rollout["rows"]
    assert len(rows) == NUM_PROMPTS * K
    per_prompt = defaultdict(int)
    for row in rows:
        per_prompt[row["prompt_id"]] += 1
    assert dict(per_prompt) == {i: K for i in range(NUM_PROMPTS)}


def test_rows_carry_the_prompt_they_were_sampled_from(rollout, model):
    """prompt_id -> the file's prompt text -> its token ids (BOS + text): the batching over
    `--batch-prompts` must not mix prompts up."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model["hf"])
    for row in rollout["rows"]:
        record = rollout["records"][row["prompt_id"]]
        assert row["prompt"] == record["prompt"]
        assert row["prompt_ids"] == tokenizer(record["prompt"]).input_ids
        assert row["prompt_ids"][0] == tokenizer.bos_token_id
        assert isinstance(row["response"], str)


def test_behaviour_logprobs_have_response_length_and_match_transformers(rollout, model):
    """One finite log-prob <= 0 per response token, equal (fp32) to transformers' log-prob of that
    token given the prompt and the response so far."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model["hf"], dtype=torch.float32).eval()
    worst = 0.0
    for row in rollout["rows"]:
        response, logprobs = row["response_ids"], row["behavior_logprobs"]
        assert 1 <= len(response) <= MAX_TOKENS
        assert len(logprobs) == len(response)
        assert all(math.isfinite(x) and x <= 0 for x in logprobs)
        with torch.no_grad():
            full = hf(torch.tensor([row["prompt_ids"] + response])).logits.float().log_softmax(-1)[0]
        start = len(row["prompt_ids"]) - 1
        reference = [float(full[start + i, token]) for i, token in enumerate(response)]
        worst = max(worst, max(abs(a - b) for a, b in zip(logprobs, reference)))
    assert worst <= LOGPROB_ATOL


def test_rewards_are_the_verifiers_verdict_mapped_to_r_pos_and_r_neg(rollout):
    rows = rollout["rows"]
    for row in rows:
        answer = rollout["records"][row["prompt_id"]]["answer"]
        assert row["correct"] == parity_reward(row["prompt"], row["response"], answer), row
        assert row["reward"] == (R_POS if row["correct"] else R_NEG), row
    # both verdicts occur, so the checks above saw both branches
    assert {row["reward"] for row in rows} == {R_POS, R_NEG}


def _pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_manifest_counts_accuracy_and_pass_at_k_agree_with_the_rows(rollout, model):
    rows, manifest = rollout["rows"], rollout["manifest"]
    by_prompt = defaultdict(list)
    for row in rows:
        by_prompt[row["prompt_id"]].append(row["correct"])
    counts = manifest["counts"]
    assert counts["prompts"] == NUM_PROMPTS
    assert counts["samples"] == len(rows) == NUM_PROMPTS * K
    assert counts["correct_samples"] == sum(row["correct"] for row in rows)
    assert counts["accuracy"] == pytest.approx(sum(row["correct"] for row in rows) / len(rows))
    assert counts["pass@1"] == pytest.approx(sum(sum(v) / len(v) for v in by_prompt.values()) / NUM_PROMPTS)
    assert counts[f"pass@{K}"] == pytest.approx(
        sum(_pass_at_k(len(v), sum(v), K) for v in by_prompt.values()) / NUM_PROMPTS
    )
    assert counts[f"pass@{K}"] == pytest.approx(sum(any(v) for v in by_prompt.values()) / NUM_PROMPTS)  # k = n
    assert counts["mean_response_tokens"] == pytest.approx(sum(len(r["response_ids"]) for r in rows) / len(rows))
    # a sample is truncated when it has max_tokens tokens and did not end with EOS
    truncated = sum(len(r["response_ids"]) == MAX_TOKENS and r["response_ids"][-1] != EOS_ID for r in rows)
    assert counts["truncated"] == truncated
    assert counts["verifier_timeouts"] == 0
    assert manifest["k"] == K and manifest["seed"] == SEED
    assert manifest["sampling"]["max_tokens"] == MAX_TOKENS
    assert (manifest["reward"]["r_pos"], manifest["reward"]["r_neg"]) == (R_POS, R_NEG)
    assert manifest["reward"]["function"] == "tests.rollout_fixtures:parity_reward"
    assert manifest["model"] == str(model["hf"].resolve())
    assert manifest["prompts_file"] == str(rollout["prompts_file"].resolve())
    assert f"wrote {len(rows)} samples" in rollout["stdout"]


# ------------------------------------------------------------------------------ bad prompt files

BAD_FILES = {
    # name: (file content, the line the error must name or None, a fragment of the message)
    "missing_field": ('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "What is 2 + 2?"}\n', 2, "answer"),
    "malformed_line": ('{"prompt": "What is 1 + 1?", "answer": "2"}\n\n{"prompt": "What is 2 + 2?", "answer": 4\n',
                       3, "malformed JSON"),
    "empty_file": ("", None, "empty"),
}


@pytest.fixture(scope="module")
def bad_file_runs(model, tmp_path_factory) -> dict:
    """`rift rollout` on every bad file, the processes run concurrently (each pays the imports)."""
    work = tmp_path_factory.mktemp("rollout-bad-prompts")
    runs = {}
    for name, (content, _, _) in BAD_FILES.items():
        path = work / f"{name}.jsonl"
        path.write_text(content)
        out = work / f"out-{name}"
        process = subprocess.Popen(
            [sys.executable, "-m", "rift_megatron.cli", "rollout", "--model", str(model["hf"]), "--prompts", str(path),
             "-k", "2", "--max-tokens", "8", "--out", str(out)],  # 8: the default 512 fills the tiny model's context
            env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        runs[name] = (path, out, process)
    results = {}
    for name, (path, out, process) in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = {"path": path, "out": out, "returncode": process.returncode, "stdout": stdout, "stderr": stderr}
    return results


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_prompt_file_exits_2_with_one_line_naming_file_and_line(bad_file_runs, case):
    run = bad_file_runs[case]
    _, line, fragment = BAD_FILES[case]
    assert run["returncode"] == 2, run["stderr"][-4000:]
    lines = [text for text in run["stderr"].splitlines() if text.strip()]
    assert len(lines) == 1, run["stderr"][-4000:]
    message = lines[0]
    assert message.startswith("rift rollout: error: ")
    where = f"{run['path']}:{line}:" if line is not None else f"{run['path']}:"
    assert where in message
    assert fragment in message
    assert "Traceback" not in run["stdout"] + run["stderr"]
    assert not run["out"].exists()  # nothing written


# ------------------------------------------------------------------------------ the engine's sampling


@pytest.fixture(scope="module")
def engine_checks(tmp_path_factory) -> dict:
    return single_process_report(tmp_path_factory)["engine_checks"]


def _samples(records: list[dict]) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(r["prompt_index"], r["sample_index"], tuple(r["response_ids"])) for r in records]


def _logprob_diff(a: list[dict], b: list[dict]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra["behavior_logprobs"], rb["behavior_logprobs"]))


def _responses_of(records: list[dict], prompt_index: int) -> list[tuple[int, ...]]:
    return [tuple(r["response_ids"]) for r in records if r["prompt_index"] == prompt_index]


def test_generate_returns_k_samples_per_prompt_in_order(engine_checks):
    k, prompts, step0 = engine_checks["k"], engine_checks["prompts"], engine_checks["step0"]
    assert [(r["prompt_index"], r["sample_index"]) for r in step0] == [(i, j) for i in range(len(prompts)) for j in range(k)]
    for r in step0:
        assert r["prompt_ids"] == prompts[r["prompt_index"]]
        assert 1 <= len(r["response_ids"]) <= engine_checks["max_tokens"]
        assert len(r["behavior_logprobs"]) == len(r["response_ids"])
    for i in range(len(prompts)):
        assert len(set(_responses_of(step0, i))) == k  # K different samples, not one repeated


def test_same_seed_step_and_prompt_index_reproduce_the_samples(engine_checks):
    assert _samples(engine_checks["step0_again"]) == _samples(engine_checks["step0"])
    assert _logprob_diff(engine_checks["step0_again"], engine_checks["step0"]) <= 1e-6


def test_another_step_gives_other_samples(engine_checks):
    step0, step1 = engine_checks["step0"], engine_checks["step1"]
    for i in range(len(engine_checks["prompts"])):
        assert set(_responses_of(step0, i)).isdisjoint(_responses_of(step1, i)), i


def test_samples_do_not_depend_on_how_prompts_are_split(engine_checks):
    """[0..3] in one call == [0, 1] then [2, 3] with prompt_indices == [3, 1] alone."""
    step0 = engine_checks["step0"]
    assert _samples(engine_checks["split"]) == _samples(step0)
    assert _logprob_diff(engine_checks["split"], step0) <= LOGPROB_ATOL
    by_index = {i: [r for r in step0 if r["prompt_index"] == i] for i in (3, 1)}
    assert _samples(engine_checks["reordered"]) == _samples(by_index[3] + by_index[1])


def test_the_global_prompt_index_seeds_a_request(engine_checks):
    """The same prompt under index 0 reproduces index 0's samples; under index 5 it is a new request."""
    records = engine_checks["same_prompt_other_index"]
    assert _responses_of(records, 0) == _responses_of(engine_checks["step0"], 0)
    assert set(_responses_of(records, 5)).isdisjoint(_responses_of(records, 0))


def test_adjacent_requests_do_not_share_random_streams(engine_checks):
    """A prompt duplicated at indices 0 and 1 must give independent samples. vLLM seeds the n=K
    children of a request with seed + j, so per-request seeds that differ by 1 per prompt index
    make sample j+1 of prompt i reuse the random stream of sample j of prompt i+1."""
    records = engine_checks["adjacent_duplicate"]
    shared = set(_responses_of(records, 0)) & set(_responses_of(records, 1))
    assert not shared, f"{len(shared)} identical sample(s) for a prompt at indices 0 and 1: {sorted(shared)}"


def test_finish_reason_is_length_exactly_when_max_tokens_is_hit(engine_checks):
    for name, max_tokens in (("short", engine_checks["short_max_tokens"]), ("step0", engine_checks["max_tokens"])):
        for r in engine_checks[name]:
            assert r["finish_reason"] in ("length", "stop"), r
            assert r["truncated"] == (r["finish_reason"] == "length")
            if r["finish_reason"] == "length":
                assert len(r["response_ids"]) == max_tokens, r
            else:  # stopped on EOS, which is part of the response (and has a behaviour log-prob)
                assert r["response_ids"][-1] == EOS_ID and len(r["response_ids"]) <= max_tokens, r
    assert any(r["finish_reason"] == "length" for r in engine_checks["short"])


def test_sleep_and_wake_up_are_no_ops_on_cpu(engine_checks):
    """After sleep / wake_up(["weights"]) / wake_up(["kv_cache"]) / sleep / wake_up() the engine
    still holds its weights: the same request gives the same samples and log-probs."""
    assert _samples(engine_checks["after_sleep"]) == _samples(engine_checks["step0"])
    assert _logprob_diff(engine_checks["after_sleep"], engine_checks["step0"]) <= LOGPROB_ATOL


def test_the_engine_refuses_to_generate_while_asleep_or_discarded(engine_checks):
    """The CPU engine keeps a GPU engine's sleep state (training/handoff.py's order relies on it):
    generating with the KV cache asleep, or after a level-2 sleep before any push, is refused in
    one line; a push of the same weights lifts it and sampling is unchanged."""
    asleep, discarded = engine_checks["refusals"]
    assert asleep is not None and "kv_cache memory is asleep" in asleep, asleep
    assert discarded is not None and "discarded its weights" in discarded, discarded
    assert _samples(engine_checks["after_discard_and_push"]) == _samples(engine_checks["step0"])
