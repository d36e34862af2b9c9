"""The `rift` command."""

from __future__ import annotations

import argparse
import sys

from rift_megatron import __version__
from rift_megatron.convert import cli as convert_cli
from rift_megatron.demo import pipeline as demo_pipeline
from rift_megatron import train as train_entry
from rift_megatron.rollout import cli as rollout_cli
from rift_megatron.exits import run_reporting
from rift_megatron.planner import cli as plan_cli
from rift_megatron.rollout import eval_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rift",
        description="Reward-Informed Fine-Tuning (RIFT) on Megatron-Core.",
    )
    parser.add_argument("--version", action="version", version=f"rift-megatron {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_pipeline.register(commands)
    convert_cli.register(commands)
    rollout_cli.register(commands)
    eval_cli.register(commands)
    plan_cli.register(commands)
    train = commands.add_parser("train", help="train with a config file (one process; torchrun -m rift_megatron.train for more)")
    train_entry.add_arguments(train)
    train.set_defaults(handler=train_entry.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return run_reporting(args.command, lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
