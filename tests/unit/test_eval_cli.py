"""`rift eval` scores a set of answers whose verdicts are known in advance.

A random-init model writes byte-fallback gibberish that two detokenizers render differently, so
the model here is built to answer by construction: the shared tiny Llama (tests/rollout_fixtures.py)
with its weights edited so that hidden dimension 0 of the residual stream is a constant 50 (the
embeddings' column 0 set to 50, every layer's o_proj / down_proj row 0 set to 0, so no layer
writes to it), the final norm keeping only that dimension and `lm_head` reading only it, with a
positive weight for the token "7" alone. Every next-token logit is then 0 except that of "7",
which is ~11 (50 / rms(h) > 0): greedy decoding writes "777" for any prompt, and sampling at
temperature 1 does so with probability > 0.99 per token.

The gold answer of every other prompt is "777" (greedy pass@1 must score it correct) and of the
others "778" (incorrect). `rift eval --reward exact -k 4` must return exactly that verdict per
prompt, pass@1 = pass@4 = majority@4 = 0.5, both from the HF folder (`--model`) and from a
Megatron checkpoint of the same weights (`--ckpt`, exported on the fly).
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.rollout_fixtures import arithmetic_prompts, shared_tiny_model, write_jsonl
from tests.unit.test_rollout_cli import rift

MAX_TOKENS, K, NUM_PROMPTS = 3, 4, 8
ANSWER = "777"


def _build_constant_answer_model(source, target) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(source, target)
    seven = AutoTokenizer.from_pretrained(target).convert_tokens_to_ids("7")
    weights = load_file(target / "model.safetensors")
    weights["model.embed_tokens.weight"][:, 0] = 50.0
    for name, tensor in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            tensor[0, :] = 0.0
    weights["model.norm.weight"].zero_()[0] = 1.0
    weights["lm_head.weight"].zero_()[seven, 0] = 1.0
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval-cli")
    hf = work / "hf"
    _build_constant_answer_model(shared_tiny_model(tmp_path_factory)["hf"], hf)
    result = rift("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(work / "mcore"))
    assert result.returncode == 0, result.stderr[-4000:]
    expected = [i % 2 == 0 for i in range(NUM_PROMPTS)]
    gold = [dict(r, answer=ANSWER if right else "778") for r, right in zip(arithmetic_prompts(NUM_PROMPTS), expected)]
    return {"hf": hf, "mcore": work / "mcore", "work": work, "prompts": write_jsonl(work / "known.jsonl", gold),
            "expected": expected}


def test_the_constructed_model_answers_777_under_transformers(known):
    """The construction, checked independently of vLLM and of our scoring."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(known["hf"])
    model = AutoModelForCausalLM.from_pretrained(known["hf"], dtype=torch.float32).eval()
    ids = tokenizer("Question: What is 12 + 30? Answer:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == ANSWER


@pytest.mark.parametrize("source", ["hf", "mcore"])
def test_rift_eval_returns_the_known_verdicts(known, source):
    out = known["work"] / f"{source}.json"
    flag = "--model" if source == "hf" else "--ckpt"
    result = rift("eval", flag, str(known[source]), "--prompts", str(known["prompts"]), "--reward", "exact",
                  "-k", str(K), "--max-tokens", str(MAX_TOKENS), "--dtype", "float32", "--out", str(out))
    assert result.returncode == 0, result.stderr[-6000:]
    scores = json.loads(out.read_text())
    assert scores["per_prompt_greedy_correct"] == known["expected"]
    assert scores["prompts"] == NUM_PROMPTS and scores["k"] == K
    assert scores["pass@1_greedy"] == 0.5
    assert scores[f"pass@{K}"] == 0.5 and scores[f"majority@{K}"] == 0.5
    assert 0.45 <= scores["sample_accuracy"] <= 0.5  # "777" sampled with p > 0.97 per sample
