"""The `rift` command."""

from __future__ import annotations

import argparse
import sys
import warnings

from rift_megatron import __version__
from rift_megatron.convert import cli as convert_cli
from rift_megatron import train as train_entry
from rift_megatron.rollout import cli as rollout_cli
from rift_megatron.rollout import eval_cli
from rift_megatron.staging import OutputExistsError

# Bad input (files, fields, flag values) is reported as one line; ConversionError,
# ModelConfigError and PromptFileError are ValueError subclasses or listed here.
USER_ERRORS = (ValueError, FileNotFoundError, OutputExistsError)

_DEMO_COLUMNS = (
    ("step", "step", "{:.0f}"),
    ("loss", "loss", "{:.4f}"),
    ("+ part", "loss_pos", "{:.4f}"),
    ("- part", "loss_neg", "{:.4f}"),
    ("logp(+)", "logprob_mean_pos", "{:.3f}"),
    ("logp(-)", "logprob_mean_neg", "{:.3f}"),
    ("rho(-)", "ratio_mean_neg", "{:.3f}"),
    ("|grad|", "grad_norm", "{:.3f}"),
)


def _quiet_library_warnings() -> None:
    """Megatron-Core warns about missing apex / TE and deprecations on every start; on the CPU
    path those are expected, and they would bury the demo's own output."""
    for module in ("megatron", "torch.distributed", "transformers"):
        warnings.filterwarnings("ignore", module=module)


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rift_megatron.loss import LossSettings
    from rift_megatron.training.quickstart import run_synthetic_training

    _quiet_library_warnings()
    console = Console(highlight=False)
    console.print(
        f"[bold]rift demo[/]: {args.steps} {args.algorithm} steps of a tiny Llama (Megatron-Core, "
        "TP1, CPU) on a fixed batch of 8 samples with rewards +1, -0.2, 0, +1, -1, +0.5, -0.2, +1"
    )
    console.print("".join(f"{title:>10}" for title, _, _ in _DEMO_COLUMNS), style="bold")

    def show(metrics: dict[str, float]) -> None:
        console.print("".join(f"{fmt.format(metrics[key]):>10}" for _, key, fmt in _DEMO_COLUMNS))

    history = run_synthetic_training(
        steps=args.steps, settings=LossSettings(algorithm=args.algorithm), lr=args.lr, on_step=show
    )
    first, last = history[0], history[-1]
    console.print(
        f"loss {first['loss']:.4f} -> {last['loss']:.4f}; mean log-prob of positive responses "
        f"{first['logprob_mean_pos']:.3f} -> {last['logprob_mean_pos']:.3f}, of negative responses "
        f"{first['logprob_mean_neg']:.3f} -> {last['logprob_mean_neg']:.3f}"
    )
    return 0 if last["loss"] < first["loss"] or args.algorithm == "naive" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rift",
        description="Reward-Informed Fine-Tuning (RIFT) on Megatron-Core.",
    )
    parser.add_argument("--version", action="version", version=f"rift-megatron {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="tiny end-to-end RIFT training run on the CPU (the quick-start job)"
    )
    demo.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    demo.add_argument(
        "--algorithm", choices=("rift", "rft", "sft", "naive"), default="rift", help="loss (default: rift)"
    )
    demo.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    demo.set_defaults(handler=_demo)
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


if __name__ == "__main__":
    sys.exit(main())
