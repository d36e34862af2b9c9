"""`rift plan`: which layout fits a co-located RIFT run on a cluster, and how long a step takes.

Prints the recommended layout with both phases' per-GPU memory, the weight-push volume and the step
time with the assumptions behind it, then the next-best layouts; with --json one object
({"feasible", "reason", "recommended", "layouts", "assumptions"}). Exits 0 whether or not a layout
fits (the answer is the plan); 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import math

from rift_megatron.memory_model import H100_80GB_GIB

TABLE_ROWS = 10


def register(commands) -> None:
    plan = commands.add_parser("plan", help="choose a parallel layout that fits (memory per GPU, step time)",
                               description=__doc__.split("\n\n")[0])
    plan.add_argument("--model", required=True, help="HF model folder or its config.json")
    plan.add_argument("--nodes", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, required=True)
    plan.add_argument("--gpu-memory", type=float, default=H100_80GB_GIB,
                      help=f"GiB per GPU as the framework sees it (default: H100 80 GB = {H100_80GB_GIB})")
    plan.add_argument("--seq-len", type=int, required=True,
                      help="longest sample, prompt + response, in tokens (memory is planned for it)")
    plan.add_argument("--rollout-k", type=int, required=True, help="samples per prompt")
    plan.add_argument("--prompts-per-step", type=int,
                      help="prompts per rollout (default: the smallest multiple of the GPU count >= 64)")
    plan.add_argument("--prompt-len", type=int, help="mean prompt tokens, for the step time (default: seq-len / 8)")
    plan.add_argument("--response-len", type=int,
                      help="mean response tokens, for the step time (default: half of seq-len minus the prompt)")
    plan.add_argument("--offload", choices=("auto", "on", "off"), default="auto",
                      help="trainer offload during rollouts: auto considers both (default)")
    plan.add_argument("--headroom", type=float, default=4.0, help="GiB each GPU keeps free in every phase (default 4)")
    pins = plan.add_argument_group("fix a layout dimension (default: enumerate it)")
    for flag, kind in (("--tp", int), ("--pp", int), ("--vpp", int), ("--cp", int), ("--engine-tp", int),
                       ("--gpu-memory-utilization", float), ("--micro-batch-size", int)):
        pins.add_argument(flag, type=kind)
    pins.add_argument("--recompute", choices=("none", "full"),
                      help="selective is planned as none: with flash attention it stores nothing less")
    rates = plan.add_argument_group("step-time assumptions")
    rates.add_argument("--gpu-tflops", type=float, help="dense bf16 TFLOP/s per GPU (default: H100 SXM, 989)")
    rates.add_argument("--train-mfu", type=float, help="training / prefill model FLOP utilisation (default 0.32)")
    rates.add_argument("--decode-mfu", type=float, help="decode model FLOP utilisation (default 0.03)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    plan.set_defaults(handler=run_plan)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def request_from_args(args: argparse.Namespace):
    """The PlanRequest of `rift plan`'s flags (ValueError naming the flag for a bad one)."""
    import dataclasses

    from rift_megatron.models.hf_config import ModelConfigError, load_hf_config
    from rift_megatron.planner.space import PlanRequest
    from rift_megatron.planner.step_time import Hardware

    _positive(args, "nodes", "gpus_per_node", "gpu_memory", "seq_len", "rollout_k", "prompts_per_step",
              "prompt_len", "response_len", "tp", "pp", "cp", "engine_tp", "micro_batch_size", "gpu_tflops",
              "train_mfu", "decode_mfu")
    if args.headroom < 0 or args.headroom >= args.gpu_memory:
        raise ValueError(f"--headroom must be >= 0 and below --gpu-memory ({args.gpu_memory:g}), got {args.headroom:g}")
    if args.vpp is not None and args.vpp < 2:
        raise ValueError(f"--vpp must be >= 2 (virtual pipeline chunks per stage), got {args.vpp}")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization:g}")
    prompt_len = args.prompt_len or max(1, args.seq_len // 8)
    if prompt_len >= args.seq_len:
        raise ValueError(f"--prompt-len ({prompt_len}) must be shorter than --seq-len ({args.seq_len})")
    response_len = args.response_len or max(1, (args.seq_len - prompt_len) // 2)
    if prompt_len + response_len > args.seq_len:
        raise ValueError(f"--prompt-len ({prompt_len}) + --response-len ({response_len}) exceed --seq-len "
                         f"({args.seq_len}): both are means of samples no longer than seq-len")
    world = args.nodes * args.gpus_per_node
    try:
        arch = load_hf_config(args.model)
    except ModelConfigError as error:
        raise ModelConfigError(f"--model: {error}") from None
    hardware = dataclasses.replace(Hardware(), **{name: value for name, value in (
        ("tflops", args.gpu_tflops), ("train_mfu", args.train_mfu), ("decode_mfu", args.decode_mfu))
        if value is not None})
    return PlanRequest(
        arch=arch, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory, seq_len=args.seq_len, k=args.rollout_k,
        prompts_per_step=args.prompts_per_step or world * -(-64 // world), prompt_len=prompt_len,
        response_len=response_len, offload=args.offload, headroom_gib=args.headroom, hardware=hardware,
        tensor=args.tp, pipeline=args.pp, virtual_pipeline=args.vpp, context=args.cp, engine_tensor=args.engine_tp,
        gpu_memory_utilization=args.gpu_memory_utilization, micro_batch_size=args.micro_batch_size,
        recompute=args.recompute,
    )


def run_plan(args: argparse.Namespace) -> int:
    from rift_megatron.planner.plan import make_plan
    from rift_megatron.planner.report import plan_report

    plan = make_plan(request_from_args(args))
    print(json.dumps(plan.as_dict(), indent=1) if args.json else plan_report(plan, TABLE_ROWS))
    return 0
