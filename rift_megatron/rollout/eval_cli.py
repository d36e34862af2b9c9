"""`rift eval`: held-out accuracy of an HF model or a Megatron checkpoint with the math reward."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def register(commands) -> None:
    evaluate = commands.add_parser("eval", help="greedy pass@1, pass@k and majority@k on a prompt file")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="HF model folder")
    source.add_argument("--ckpt", help="Megatron checkpoint (exported to a temporary HF folder first)")
    evaluate.add_argument("--prompts", required=True, help="JSONL or Parquet file with prompt / answer fields")
    evaluate.add_argument("-k", type=int, default=1, help="samples per prompt for pass@k / majority@k (default: 1)")
    evaluate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for k > 1")
    evaluate.add_argument("--max-tokens", type=int, default=512)
    evaluate.add_argument("--reward", default="math", help="math | exact | pkg.module:function (default: math)")
    evaluate.add_argument("--reward-timeout", type=float, default=5.0)
    evaluate.add_argument("--prompt-field", default="prompt")
    evaluate.add_argument("--answer-field", default="answer")
    evaluate.add_argument("--chat-template", action="store_true")
    evaluate.add_argument("--dtype", default="auto", help="vLLM dtype (default: auto)")
    evaluate.add_argument("--out", default="eval.json", help="JSON result file (default: eval.json)")
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from rift_megatron.data.lengths import length_budget, render_within_budget
    from rift_megatron.data.prompts import load_prompts
    from rift_megatron.hf_folder import check_model_folder, load_tokenizer

    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    # Everything the prompts need is checked before a checkpoint is exported or an engine built.
    if args.ckpt:
        from rift_megatron.convert.checkpoint_files import checkpoint_hf_assets

        folder, name = checkpoint_hf_assets(args.ckpt), "--ckpt"
    else:
        folder, name = check_model_folder(args.model, "--model", weights=True), "--model"
    budget = length_budget(folder, args.max_tokens, "--max-tokens")
    records = load_prompts(args.prompts, prompt_field=args.prompt_field, answer_field=args.answer_field)
    prompt_ids = render_within_budget(load_tokenizer(folder, name), records, budget, chat_template=args.chat_template)
    if args.ckpt:
        from rift_megatron.convert.mcore_to_hf import convert_mcore_to_hf

        with tempfile.TemporaryDirectory(prefix="rift-eval-") as work:
            model = convert_mcore_to_hf(args.ckpt, Path(work) / "hf")
            return _evaluate_model(args, str(model), records, prompt_ids)
    return _evaluate_model(args, args.model, records, prompt_ids)


def _evaluate_model(args: argparse.Namespace, model: str, records: list, prompt_ids: list[list[int]]) -> int:
    from rift_megatron.rollout.cli import reward_spec_from_args
    from rift_megatron.rollout.engine import EngineConfig, RolloutEngine
    from rift_megatron.rollout.evaluate import evaluate
    from rift_megatron.rollout.verifier_pool import VerifierPool

    engine = RolloutEngine(EngineConfig(model=model, dtype=args.dtype,
                                        max_model_len=max(len(ids) for ids in prompt_ids) + args.max_tokens))
    args.r_pos, args.r_neg = 1.0, 0.0
    with VerifierPool(reward_spec_from_args(args)) as pool:
        result = evaluate(engine, records, prompt_ids, pool, max_tokens=args.max_tokens, k=args.k,
                          temperature=args.temperature)
    result = {"model": args.ckpt or model, "prompts_file": args.prompts, "k": args.k, **result}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    summary = ", ".join(f"{key} {value:.4f}" for key, value in result.items()
                        if key.startswith(("pass@", "majority@")))
    print(f"{len(records)} prompts: {summary} -> {args.out}")
    return 0
