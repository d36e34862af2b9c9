"""`torchrun ... -m rift_megatron.train --config FILE.yaml [key=value ...]` (and `rift train`).

The config file plus dotted overrides make one typed config (rift_megatron/config/); bad keys,
types or values are reported as one line each before any work starts.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (every key: rift_megatron/config/schema.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.steps=10")
    parser.add_argument(
        "--resume", metavar="auto|none|PATH",
        help="shorthand for checkpoint.resume=...: auto continues from checkpoint.dir's `latest` (at any "
             "data-parallel size), none starts fresh, PATH loads that checkpoint",
    )


def run(args: argparse.Namespace) -> int:
    from rift_megatron.config import load_config, validate_for_world

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    # Checked against torchrun's WORLD_SIZE before torch.distributed, Megatron or vLLM are imported,
    # so a bad config costs a second and prints only its own lines.
    validate_for_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    _set_launch_environment(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(_prediction(cfg), flush=True)

    from rift_megatron.parallel import is_main_rank
    from rift_megatron.training.loop import Trainer
    from rift_megatron.training.summary import report_run

    trainer = Trainer(cfg)
    try:
        trainer.run()
        if is_main_rank():
            report_run(cfg.logging.dir)
    finally:
        trainer.close()
    return 0


def _prediction(cfg) -> str:
    """The planner's figures for this config and world (rift_megatron/planner/predict.py)."""
    from rift_megatron.config.runtime import model_folder
    from rift_megatron.models.hf_config import load_hf_config
    from rift_megatron.planner.predict import startup_prediction
    from rift_megatron.platform.device import detect_platform

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return startup_prediction(cfg, load_hf_config(model_folder(cfg)), world, per_node,
                              on_gpu=detect_platform().kind == "cuda")


def _set_launch_environment(cfg) -> None:
    """What Megatron needs in the environment before CUDA initialises (CUDA_DEVICE_MAX_CONNECTIONS
    with tensor parallelism on a GPU): set here, before the trainer creates the CUDA context."""
    from rift_megatron.config import to_parallel_layout
    from rift_megatron.models.performance import apply_launch_environment
    from rift_megatron.platform.device import detect_platform

    apply_launch_environment(detect_platform(), to_parallel_layout(cfg), os.environ)


def main(argv: list[str] | None = None) -> int:
    from rift_megatron.exits import run_reporting

    parser = argparse.ArgumentParser(prog="rift_megatron.train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting("train", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
