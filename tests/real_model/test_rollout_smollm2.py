"""`rift rollout` on a real chat model: SmolLM2-135M-Instruct, its chat template, math rewards.

One run, as a user types it (the brief's command):

    rift rollout --model <smollm2> --prompts adds.jsonl -k 2 --chat-template --reward math \\
        --max-tokens 64 --dtype float32 --out <buf>

on 12 two-number additions. The buffer is checked row by row against independent computations:

* prompt_ids are exactly the tokenizer's own ``apply_chat_template(..., add_generation_prompt=True)``
  (SmolLM2's template adds a default system turn; the ids start with ``<|im_start|>system``);
* response text is the decoding of response_ids; a response that stopped ends with the EOS id
  (``<|im_end|>``, which is also SmolLM2's pad token);
* rewards are r_pos / r_neg (1.0 / -0.2, the defaults) and agree with ``correct``;
* behaviour log-probs are finite, <= 0, one per response token, and equal `transformers`' float32
  log-probs of the same tokens (1e-3; measured 4.7e-5 over 1083 tokens). This also shows that
  ``--dtype float32`` reached the engine although the checkpoint is bf16: bf16 sampling is ~0.05 off;
* the reward's verdict agrees with an independent reading of the response on every sample whose
  answer is unambiguous (see :func:`clear_claim`). No accuracy level is asserted: the 135M model
  mostly answers wrongly (here 2/24 "correct"), and which samples are right is not the point.

Measured here (2026-12-06, 2 shared cores): the rollout command 47 s (engine start + 24 samples,
53 generated tok/s in fp32), the check probe ~15 s.

Found while writing this: both samples the math reward accepted in the measured run never state
the sum. They were cut at 64 tokens right after restating the question ("... 94 + 77 converts to",
"'98 + 86 = ("); the reward's last fallback takes the last plain expression anywhere ("94 + 77"),
which evaluates to the answer. :func:`clear_claim` leaves such samples out (the last number is
not a stated result), so this test does not decide that question; it prints them with -s.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.real_model.helpers import addition_prompts, describe, rift, run_probe, write_jsonl

pytestmark = pytest.mark.real_model

NUM_PROMPTS, K, MAX_TOKENS = 12, 2, 64
R_POS, R_NEG = 1.0, -0.2  # `rift rollout` defaults; read back from the manifest
EOS_ID = 2  # <|im_end|>
# fp32 engine vs fp32 transformers on the same tokens: kernels and summation order differ, so a
# few ulps per layer over 30 layers; measured 4.7e-5. A bf16 engine is ~0.05 off, wrong weights O(1).
LOGPROB_ATOL = 1e-3
# Samples with an unambiguous answer in the measured run: 8 of 24. The agreement check below is
# only meaningful when it checks something; at least 3 must be clear (a run of empty or garbled
# responses fails here instead of passing vacuously).
MIN_CLEAR_SAMPLES = 3


_BOXED_ANY = re.compile(r"\\boxed\s*\{")
_BOXED_FLAT = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
# What may stand right before a stated result: "= 47", "is 47", "equals 47", "is: 47", "**= 47".
_RESULT_LEAD = re.compile(r"(?:=|\bis\b|\bequals\b)[\s:*]*$", re.IGNORECASE)


def clear_claim(response: str) -> float | None:
    r"""The number a response unambiguously gives as its answer, or None when it does not.

    Deliberately narrower than the reward (its own code, not a copy of it):

    * boxed: every ``\boxed{`` in the response has flat content (no nested braces) and the last
      one holds just a number (``$``, spaces, thousands commas allowed) -> that number;
    * plain: no ``\boxed``, no LaTeX delimiters (``$``, ``\(``, ``\[``), no "answer" anchor and no
      ``####`` (the reward reads those first, so the last number need not be what it reads); the
      response's last number is either the whole response or directly follows "=", "is" or
      "equals" -> that number ("66 + 57 = 22." -> 22, "9." -> 9).

    Everything else (no number, "... 94 + 77 converts to", "which is 15*3") is not clear.
    """
    if _BOXED_ANY.search(response):
        flat = _BOXED_FLAT.findall(response)
        if len(flat) != len(_BOXED_ANY.findall(response)):
            return None
        content = flat[-1].replace("$", "").replace(",", "").strip()
        return float(content) if re.fullmatch(r"-?\d+(?:\.\d+)?", content) else None
    if any(mark in response for mark in ("$", "\\(", "\\[", "####")) or re.search(r"answer", response, re.IGNORECASE):
        return None
    numbers = list(_NUMBER.finditer(response))
    if not numbers:
        return None
    last = numbers[-1]
    value = float(last.group().replace(",", ""))
    if response.strip().rstrip(".").strip() == last.group():
        return value
    return value if _RESULT_LEAD.search(response[: last.start()]) else None


def test_clear_claim_reads_only_unambiguous_answers() -> None:
    """The independent reader itself, on the response shapes seen from SmolLM2 (no model needed)."""
    assert clear_claim("66 + 57 = 22.") == 22
    assert clear_claim("9.") == 9
    assert clear_claim("Think of it this way: 39 + 81 = 146. That's three and a half truncated digits.") == 146
    assert clear_claim("The sum is 1,234.") == 1234
    assert clear_claim("So we get \\boxed{ $117$ }.") == 117
    assert clear_claim("First \\boxed{3}, then \\boxed{117}") == 117
    # Not clear: the question restated and cut off, an operand last, anchors/LaTeX the reward reads first,
    # an empty or nested box, no number at all.
    assert clear_claim("To add 94 + 77, ... \n\n94 + 77 converts to") is None
    assert clear_claim("147 + 1, which is 15*3, which is") is None
    assert clear_claim("The answer is 27. Then 3 = 4") is None
    assert clear_claim("so $12+35$ is 48") is None
    assert clear_claim("result: \\boxed{}6") is None
    assert clear_claim("\\boxed{\\frac{1}{2}}") is None
    assert clear_claim("What can I do for you?") is None


# ------------------------------------------------------------------------------ the rollout

CHECK_PROBE = """
import math, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from rift_megatron.rollout.buffer import load_buffer
tok = AutoTokenizer.from_pretrained(ARGS["model"])
rows = load_buffer(ARGS["buffer"])
rendered = {}
for row in rows:
    if row.prompt not in rendered:
        out = tok.apply_chat_template([{"role": "user", "content": row.prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)
        rendered[row.prompt] = list(out["input_ids"])
template_head = tok("<|im_start|>system\\n", add_special_tokens=False)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(ARGS["model"], dtype=torch.float32)
# One right-padded batch: causal attention, so padding after a row never changes its logits.
seqs = [row.prompt_ids + row.response_ids for row in rows]
width = max(len(s) for s in seqs)
tokens = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
with torch.no_grad():
    logprobs = torch.log_softmax(model(input_ids=tokens, attention_mask=mask).logits.float(), dim=-1)
diffs = []
for i, row in enumerate(rows):
    start = len(row.prompt_ids)
    positions = torch.arange(start - 1, start - 1 + len(row.response_ids))
    ref = logprobs[i, positions, torch.tensor(row.response_ids)]
    diffs.append(float((ref - torch.tensor(row.behavior_logprobs, dtype=torch.float32)).abs().max()) if row.response_ids else 0.0)
RESULT = {
    "rows": [
        {"prompt": r.prompt, "prompt_id": r.prompt_id, "prompt_ids": r.prompt_ids, "response": r.response,
         "response_ids": r.response_ids, "behavior_logprobs": r.behavior_logprobs, "reward": r.reward,
         "correct": r.correct, "decoded": tok.decode(r.response_ids, skip_special_tokens=True)}
        for r in rows
    ],
    "chat_ids": rendered, "template_head": template_head, "logprob_diffs": diffs,
}
"""


@pytest.fixture(scope="module")
def rollout(smollm2_dir: Path, tmp_path_factory) -> dict:
    """Run the command once, then read the buffer and recompute with `transformers` in one probe."""
    work = tmp_path_factory.mktemp("smollm2-rollout")
    records = addition_prompts(NUM_PROMPTS)
    prompts = write_jsonl(work / "adds.jsonl", records)
    out = work / "buf"
    result, seconds = rift(
        "rollout", "--model", str(smollm2_dir), "--prompts", str(prompts), "-k", str(K), "--chat-template",
        "--reward", "math", "--max-tokens", str(MAX_TOKENS), "--dtype", "float32", "--out", str(out),
    )
    assert result.returncode == 0, describe(result)
    probe = run_probe(CHECK_PROBE, {"model": str(smollm2_dir), "buffer": str(out)})
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"\nrift rollout on SmolLM2: {seconds:.1f} s, counts {manifest['counts']}, "
          f"{manifest['generation_tokens_per_s']:.1f} tok/s")
    return {"records": records, "manifest": manifest, **probe}


def test_buffer_shape_and_prompts(rollout: dict) -> None:
    """K rows per prompt, and prompt_ids are exactly the tokenizer's chat-template rendering."""
    rows, records = rollout["rows"], rollout["records"]
    assert len(rows) == NUM_PROMPTS * K
    by_prompt: dict[str, int] = {}
    for row in rows:
        by_prompt[row["prompt"]] = by_prompt.get(row["prompt"], 0) + 1
    assert by_prompt == {record["prompt"]: K for record in records}
    head = rollout["template_head"]
    assert head and head[0] == 1  # <|im_start|> is id 1 in SmolLM2's vocabulary
    for row in rows:
        assert row["prompt_ids"][: len(head)] == head, row["prompt_ids"][:8]
        assert row["prompt_ids"] == rollout["chat_ids"][row["prompt"]]
    manifest = rollout["manifest"]
    assert manifest["chat_template"] is True and manifest["engine_dtype"] == "float32"


def test_responses_and_log_probs(rollout: dict) -> None:
    """Responses decode from their ids; behaviour log-probs are finite, <= 0 and match `transformers`."""
    for row, diff in zip(rollout["rows"], rollout["logprob_diffs"]):
        ids, logprobs = row["response_ids"], row["behavior_logprobs"]
        assert 1 <= len(ids) <= MAX_TOKENS
        assert len(logprobs) == len(ids)
        assert all(math.isfinite(value) and value <= 0.0 for value in logprobs), logprobs
        assert row["decoded"] == row["response"], (row["decoded"], row["response"])
        # A response shorter than the limit stopped on EOS, which the buffer keeps as its last id.
        if len(ids) < MAX_TOKENS:
            assert ids[-1] == EOS_ID, ids[-3:]
        assert diff <= LOGPROB_ATOL, f"engine vs transformers log-prob diff {diff:.3g} on {row['response']!r}"
    print(f"\nmax |engine - transformers| log-prob: {max(rollout['logprob_diffs']):.3g}")


def test_rewards_agree_with_an_independent_reading(rollout: dict) -> None:
    """Rewards are r_pos / r_neg matching `correct`; on unambiguous samples the verdict is the arithmetic."""
    reward_spec = rollout["manifest"]["reward"]
    assert (reward_spec["r_pos"], reward_spec["r_neg"]) == (R_POS, R_NEG)
    answers = {record["prompt"]: float(record["answer"]) for record in rollout["records"]}
    clear, disagreements, unclear_credited = 0, [], []
    for row in rollout["rows"]:
        assert row["reward"] in (R_POS, R_NEG), row["reward"]
        assert (row["reward"] == R_POS) == row["correct"], row
        claim = clear_claim(row["response"])
        if claim is None:
            if row["correct"]:
                unclear_credited.append(row["response"])
            continue
        clear += 1
        if (claim == answers[row["prompt"]]) != row["correct"]:
            disagreements.append((row["response"], answers[row["prompt"]], row["correct"]))
    print(f"\n{clear} of {len(rollout['rows'])} samples have a clear answer; "
          f"credited without one: {unclear_credited}")
    assert clear >= MIN_CLEAR_SAMPLES, f"only {clear} samples with a clear answer: the check would be vacuous"
    assert disagreements == [], disagreements
