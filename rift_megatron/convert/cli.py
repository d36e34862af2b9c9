"""`rift convert ...`: the conversion commands (also reachable as tools/convert.py)."""

from __future__ import annotations

import argparse
import sys

from rift_megatron.convert.verify import DEFAULT_ATOL, DEFAULT_MIN_TOP1

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def register(commands) -> None:
    """Add `convert` and its three subcommands to the `rift` parser."""
    convert = commands.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron-Core")
    steps = convert.add_subparsers(dest="convert_command", metavar="STEP", required=True)

    to_mcore = steps.add_parser("hf-to-mcore", help="HF safetensors folder -> Megatron dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, help="output checkpoint directory")
    to_mcore.add_argument("--dtype", choices=DTYPE_CHOICES, help="stored dtype (default: the source's)")
    to_mcore.add_argument("--nproc", type=int, default=1, help="processes to split the work over (default: 1)")
    to_mcore.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    to_mcore.set_defaults(handler=_hf_to_mcore)

    to_hf = steps.add_parser("mcore-to-hf", help="Megatron checkpoint (converted or training) -> HF folder")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint directory (or a training run with a 'latest' file)")
    to_hf.add_argument("--out", required=True, help="output HF folder")
    to_hf.add_argument("--dtype", choices=DTYPE_CHOICES, help="exported dtype (default: the stored one)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    to_hf.add_argument("--nproc", type=int, default=1,
                       help="processes to write the shard files in, whole files each, split by bytes (default: 1)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    to_hf.set_defaults(handler=_mcore_to_hf)

    check = steps.add_parser(
        "verify", help="exact tensors after a round trip + Megatron vs transformers logits",
        description="Checks (1) every HF tensor rebuilt from the checkpoint is bit-identical to the source, "
                    "always all tensors of all layers, streamed (~one stored chunk in memory), and (2) Megatron's "
                    "logits at --tp/--pp equal transformers' (both fp32). With --layers N, (2) runs on the model "
                    "truncated to its first N layers + final norm + LM head on both sides, so a 70B model fits "
                    "one node: each side then holds embedding + head + N layers in fp32 (Qwen2.5-72B: ~10 GB + "
                    "~3.5 GB a layer) instead of ~290 GB; layers N.. are then covered by (1) only.",
    )
    check.add_argument("--hf", required=True, help="the HF model folder the checkpoint came from")
    check.add_argument("--ckpt", required=True, help="Megatron checkpoint directory")
    check.add_argument("--tp", type=int, default=1, help="tensor-parallel size for the logits check")
    check.add_argument("--pp", type=int, default=1, help="pipeline-parallel size for the logits check")
    check.add_argument("--seq-len", type=int, default=64, help="tokens per sequence in the logits batch")
    check.add_argument("--batch", type=int, default=2, help="sequences in the logits batch")
    check.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"max |logit diff| (default {DEFAULT_ATOL})")
    check.add_argument("--min-top1", type=float, default=DEFAULT_MIN_TOP1,
                       help=f"min top-1 agreement (default {DEFAULT_MIN_TOP1})")
    check.add_argument("--layers", type=int, metavar="N",
                       help="compare logits of the first N transformer layers (+ final norm + LM head) only, on "
                            "both sides; the bit-exact tensor check still covers all layers. N must be divisible "
                            "by --pp (default: the whole model)")
    check.add_argument("--json", help="also write the report here")
    check.set_defaults(handler=_verify)


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from rift_megatron.convert.hf_to_mcore import convert_hf_to_mcore

    out = convert_hf_to_mcore(args.hf, args.out, dtype=args.dtype, nproc=args.nproc, overwrite=args.overwrite)
    print(f"wrote Megatron checkpoint {out}")
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from rift_megatron.convert.mcore_to_hf import convert_mcore_to_hf

    out = convert_mcore_to_hf(
        args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, nproc=args.nproc,
        overwrite=args.overwrite,
    )
    print(f"wrote Hugging Face model {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from rift_megatron.convert.verify import verify

    report = verify(args.hf, args.ckpt, tp=args.tp, pp=args.pp, batch=args.batch, seq=args.seq_len,
                    atol=args.atol, min_top1=args.min_top1, layers=args.layers)
    logits = report.logits
    print("checked:")
    for line in report.checked:
        print(f"  {line}")
    print(f"tensors: {report.tensors_exact}/{report.tensors_checked} bit-identical after the round trip")
    for item in report.mismatched[:20]:
        print(f"  MISMATCH {item['name']}: max |diff| {item['max_abs_diff']:.3g}")
    scope = "all" if report.layers_compared is None else f"first {report.layers_compared}"
    print(
        f"logits ({scope} of {report.num_layers} layers) at TP{logits['tp']} PP{logits['pp']} vs transformers: "
        f"max |diff| {logits['max_abs_diff']:.3g} (<= {args.atol:g}), mean |diff| {logits['mean_abs_diff']:.3g}, "
        f"top-1 agreement {logits['top1_agreement']:.4f} (>= {args.min_top1:g})"
    )
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(report.to_json())
    print("PASS" if report.passed else "FAIL")
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point for tools/convert.py (same commands as `rift convert`)."""
    from rift_megatron.cli import main as rift_main

    return rift_main(["convert", *(sys.argv[1:] if argv is None else argv)])
