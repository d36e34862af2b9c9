"""`rift rollout`: sample K responses per prompt with vLLM, score them, write an offline buffer."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from rift_megatron import __version__


def register(commands) -> None:
    rollout = commands.add_parser("rollout", help="sample, score and save an offline RIFT buffer (Parquet)")
    rollout.add_argument("--model", required=True, help="HF model folder (config, weights, tokenizer)")
    rollout.add_argument("--prompts", required=True, help="JSONL or Parquet file with prompt / answer fields")
    rollout.add_argument("-k", type=int, default=8, help="samples per prompt (default: 8)")
    rollout.add_argument("--out", required=True, help="output directory (rollout.parquet + manifest.json)")
    rollout.add_argument("--max-tokens", type=int, default=512, help="max response tokens (default: 512)")
    rollout.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    rollout.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    rollout.add_argument("--reward", default="math",
                         help="math | exact | a dotted path 'pkg.module:function' (default: math)")
    rollout.add_argument("--r-pos", type=float, default=1.0, help="reward of a correct sample (default: 1.0)")
    rollout.add_argument("--r-neg", type=float, default=-0.2, help="reward of an incorrect sample (default: -0.2)")
    rollout.add_argument("--reward-timeout", type=float, default=5.0, help="seconds per verification (default: 5)")
    rollout.add_argument("--prompt-field", default="prompt")
    rollout.add_argument("--answer-field", default="answer")
    rollout.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    rollout.add_argument("--dtype", default="auto", help="vLLM dtype (default: auto)")
    rollout.add_argument("--max-model-len", type=int, default=None, help="engine context length (default: prompt + max tokens)")
    rollout.add_argument("--batch-prompts", type=int, default=64, help="prompts per generate call (default: 64)")
    rollout.add_argument("--seed", type=int, default=0)
    rollout.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    rollout.set_defaults(handler=run_rollout)


def reward_spec_from_args(args: argparse.Namespace):
    from rift_megatron.rollout.rewards import RewardSpec

    kind, function = (args.reward, None) if args.reward in ("math", "exact") else ("function", args.reward)
    return RewardSpec(kind=kind, function=function, r_pos=args.r_pos, r_neg=args.r_neg, timeout_s=args.reward_timeout)


def run_rollout(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rift_megatron.data.lengths import length_budget, render_within_budget
    from rift_megatron.data.prompts import load_prompts
    from rift_megatron.hf_folder import check_model_folder, load_tokenizer
    from rift_megatron.staging import check_writable, staged_directory

    out = Path(args.out)
    check_writable(out, args.overwrite)
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    check_model_folder(args.model, "--model", weights=True)
    budget = length_budget(args.model, args.max_tokens, "--max-tokens", max_model_len=args.max_model_len)
    records = load_prompts(args.prompts, prompt_field=args.prompt_field, answer_field=args.answer_field)
    tokenizer = load_tokenizer(args.model, "--model")
    prompt_ids = render_within_budget(tokenizer, records, budget, chat_template=args.chat_template)

    from rich.console import Console
    from rich.progress import Progress

    from rift_megatron.rollout.buffer import BufferRow, accuracy_summary, write_buffer
    from rift_megatron.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
    from rift_megatron.rollout.verifier_pool import VerifierPool

    console = Console(highlight=False)
    spec = reward_spec_from_args(args)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    max_len = args.max_model_len or max(len(ids) for ids in prompt_ids) + args.max_tokens
    engine = RolloutEngine(EngineConfig(model=args.model, dtype=args.dtype, max_model_len=max_len, seed=args.seed))
    rows: list[BufferRow] = []
    generate_seconds, generated, truncated = 0.0, 0, 0
    with VerifierPool(spec) as pool, Progress(console=console) as progress:
        task = progress.add_task("rollout", total=len(records))
        for first in range(0, len(records), args.batch_prompts):
            batch = range(first, min(first + args.batch_prompts, len(records)))
            generate_started = time.perf_counter()
            generations = engine.generate(
                [prompt_ids[i] for i in batch], args.k, sampling, prompt_indices=list(batch)
            )
            generate_seconds += time.perf_counter() - generate_started
            scores = pool.score_all([
                (records[g.prompt_index].prompt, g.response_text, records[g.prompt_index].answer) for g in generations
            ])
            for g, score in zip(generations, scores):
                record = records[g.prompt_index]
                rows.append(BufferRow(
                    prompt_id=record.prompt_id, prompt=record.prompt, response=g.response_text,
                    prompt_ids=g.prompt_ids, response_ids=g.response_ids, behavior_logprobs=g.behavior_logprobs,
                    reward=score.reward, correct=score.correct,
                ))
                generated += len(g.response_ids)
                truncated += g.truncated
            progress.advance(task, len(batch))
        timeouts = pool.timeouts
    summary = accuracy_summary(rows, args.k)
    manifest = {
        "created_by": f"rift rollout (rift-megatron {__version__})",
        "model": str(Path(args.model).resolve()),
        "prompts_file": str(Path(args.prompts).resolve()),
        "k": args.k,
        "sampling": asdict(sampling),
        "seed": args.seed,
        "chat_template": args.chat_template,
        "reward": asdict(spec),
        "counts": {**summary, "truncated": truncated, "verifier_timeouts": timeouts},
        "engine_dtype": args.dtype,
        "generation_tokens_per_s": generated / generate_seconds if generate_seconds > 0 else 0.0,
    }
    with staged_directory(out, args.overwrite) as staging:
        write_buffer(staging, rows, manifest)
    console.print(
        f"wrote {len(rows)} samples ({summary['prompts']} prompts x {args.k}) to {out}: "
        f"accuracy {summary['accuracy']:.3f}, pass@1 {summary['pass@1']:.3f}, "
        f"pass@{args.k} {summary[f'pass@{args.k}']:.3f}"
    )
    return 0
