"""The `rift` command."""

from __future__ import annotations

import argparse
import sys

from rift_megatron import __version__
from rift_megatron.convert import cli as convert_cli
from rift_megatron.demo import pipeline as demo_pipeline
from rift_megatron import train as train_entry
from rift_megatron.rollout import cli as rollout_cli
from rift_megatron.rollout import eval_cli
from rift_megatron.rollout.errors import WeightSyncError
from rift_megatron.staging import OutputExistsError
from rift_megatron.training.errors import INTERRUPTED_WITHOUT_SAVING, TrainingStopped

# Bad input (files, fields, flag values) is reported as one line; ConversionError,
# ModelConfigError and PromptFileError are ValueError subclasses or listed here.
USER_ERRORS = (ValueError, FileNotFoundError, OutputExistsError)


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
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        # Bad input is reported as one clear line naming the file / field, not a traceback.
        print(f"rift {args.command}: error: {error}", file=sys.stderr)
        return 2
    except WeightSyncError as error:  # a failed sync check: the run stopped before the weights moved
        print(f"rift {args.command}: error: {error}", file=sys.stderr)
        return 1
    except TrainingStopped as error:  # rift train: a signal or non-finite steps, stopped at a safe point
        print(f"rift {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        # Outputs are staged and renamed into place only when complete, so nothing half-written is
        # left; a training run keeps its last checkpoint (the first Ctrl-C of `rift train` saves one).
        what = INTERRUPTED_WITHOUT_SAVING if args.command == "train" else "interrupted: stopped without writing partial output"
        print(f"rift {args.command}: {what}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
