"""`rift convert verify`: prove a Megatron checkpoint holds the HF model, tensor by tensor and
in what it computes.

1. Every HF tensor reconstructed from the checkpoint equals the source tensor exactly (after a
   cast to the stored dtype when the checkpoint was converted to another dtype). Always all
   tensors of all layers: both sides are streamed, about one stored chunk in memory.
2. Megatron's forward pass at the requested TP/PP (real processes under torchrun) gives the same
   logits as `transformers` on a fixed batch of token ids; both run in fp32.

At 70B, check 2 on the whole model needs the model twice in fp32 (~290 GB for transformers alone).
`layers=N` (`--layers N`) runs it on the model truncated to its first N transformer layers plus
the final norm and the LM head, on both sides: transformers is built with num_hidden_layers=N and
loads (and allocates) only those tensors; Megatron builds an N-layer model at TP/PP and loads it
from the full checkpoint through its own `dist_checkpointing.load` (see `verify_worker`), which
reads only the first N layers. Memory is then embedding + LM head + N layers in fp32 per side
(Qwen2.5-72B: ~10 GB + ~3.5 GB a layer, split over the TP x PP ranks on the Megatron side),
instead of the whole model. What this still proves: every tensor is bit-exact (check 1), and the
mapping of every kind of parameter (embedding, fused QKV incl. biases, gate/up, norms, rotary
settings, tied or separate head) is semantically right (check 2), because all layers are
converted by the same per-layer table rows. What it does not: layers N.. are not run through
the forward pass, so anything that differs from layer to layer (nothing in the supported
families) would be covered only by the bit-exact comparison.

Default tolerances, for fp32 compute: max |logit diff| <= 1e-3 and top-1 agreement >= 0.99.
Megatron and transformers run the same math in different kernel orders (fused QKV vs separate
projections, TP all-reduces), so differences are fp32 round-off growing with depth: ~5e-7 on a
4-layer test model; 1e-3 leaves room for deep models while any mapping error (a swapped head,
a shifted row, a wrong rope base) moves logits by O(1). A truncated model is shallower, so the
same tolerance holds with more room. The reference stays fp32 at any size: with --layers it
fits, and a bf16 reference would differ from fp32 by ~1e-2 (PLATFORM.md), which would force a
tolerance loose enough to hide small mapping errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rift_megatron.convert.checkpoint_files import find_hf_assets, load_architecture, resolve_checkpoint
from rift_megatron.convert.errors import ConversionError
from rift_megatron.convert.hf_to_mcore import inspect_source
from rift_megatron.convert.mcore_to_hf import iter_hf_blocks
from rift_megatron.convert.megatron_world import tp1_megatron_world
from rift_megatron.models.hf_config import ModelArchitecture, ModelConfigError
from rift_megatron.models.provider import validate_layout
from rift_megatron.parallel import ParallelLayout
from rift_megatron.trust.admission import admit_checkpoint

DEFAULT_ATOL = 1e-3
DEFAULT_MIN_TOP1 = 0.99


@dataclass
class VerifyReport:
    """What `verify` found. `layers_compared`: transformer layers in the logits check (None:
    all `num_layers`); `checked`: in words, what each check covered."""

    tensors_checked: int = 0
    tensors_exact: int = 0
    mismatched: list[dict] = field(default_factory=list)
    logits: dict | None = None
    num_layers: int = 0
    layers_compared: int | None = None
    checked: list[str] = field(default_factory=list)
    passed: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def compare_tensors(hf_dir: Path, checkpoint: Path, arch: ModelArchitecture, report: VerifyReport) -> None:
    """Stream both sides one tensor at a time and record every difference. The checkpoint is
    read as its own hf_assets/config.json (`arch`) describes it, as the logits check's Megatron
    workers will load it: a config that contradicts the stored tensors is refused here, naming
    the tensor, before any worker starts."""
    source = inspect_source(hf_dir)
    seen: set[str] = set()
    mismatch: dict[str, float] = {}
    with tp1_megatron_world():
        for name, first_row, restored in iter_hf_blocks(checkpoint, arch):
            rows = (first_row, first_row + restored.shape[0]) if restored.dim() else None
            original = source.reader.read(name, rows).to(restored.dtype)
            seen.add(name)
            if not _bit_equal(original, restored):
                diff = float((original.double() - restored.double()).abs().max())
                mismatch[name] = max(mismatch.get(name, 0.0), diff)
    report.tensors_checked = len(seen)
    report.tensors_exact = len(seen) - len(mismatch)
    report.mismatched = [
        {"name": name, "max_abs_diff": diff, "shape": list(source.reader.info(name).shape)}
        for name, diff in mismatch.items()
    ]


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (NaN payloads and -0.0 included, unlike torch.equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _fixed_tokens(vocab_size: int, batch: int, seq: int, seed: int = 1234) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def megatron_logits_subprocess(
    checkpoint: Path, tokens: torch.Tensor, tp: int, pp: int, layers: int | None = None
) -> torch.Tensor:
    """Run `verify_worker` on tp x pp local processes (torchrun) and return its logits."""
    with tempfile.TemporaryDirectory(prefix="rift-verify-") as work:
        tokens_path, out_path = Path(work) / "tokens.pt", Path(work) / "logits.pt"
        torch.save(tokens, tokens_path)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * pp}",
            "-m", "rift_megatron.convert.verify_worker", "--ckpt", str(checkpoint), "--tokens", str(tokens_path),
            "--out", str(out_path), "--tp", str(tp), "--pp", str(pp),
            *(["--layers", str(layers)] if layers is not None else []),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0 or not out_path.exists():
            raise ConversionError(f"Megatron forward at TP{tp} PP{pp} failed: {_worker_error(result.stderr)}")
        return torch.load(out_path, weights_only=True)


_RANK_ERROR = re.compile(r"^\[rank(\d+)\]:\s*([\w.]*(?:Error|Exception|Interrupt)(?::.*)?)$")


def _worker_error(stderr: str) -> str:
    """The workers' exception in one line (`rank N: Type: message`, from torchrun's `[rankN]:`
    traceback lines), else the last line they wrote: the CLI's error stays one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if match := _RANK_ERROR.match(line):
            return f"rank {match.group(1)}: {match.group(2)}"
    return lines[-1] if lines else "no output"


def load_reference_model(hf_dir: Path, layers: int | None = None) -> torch.nn.Module:
    """`transformers`' fp32 model of `hf_dir`, truncated to its first `layers` layers if given.

    With num_hidden_layers=N transformers builds N layers and loads only their tensors: the
    others are "unexpected keys" it skips without materialising them (measured in
    tests/unit/test_convert_scale.py: peak memory follows N). Its report of those skipped keys is
    silenced; any other unexpected or missing tensor is an error, since a reference with a
    tensor left at its random initialisation would make the comparison meaningless.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(hf_dir)
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):  # per-layer attention kinds (transformers 5)
            config.layer_types = list(config.layer_types[:layers])
    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr would be the only line there
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            hf_dir, config=config, dtype=torch.float32, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()
    skipped = re.compile(r"model\.layers\.(\d+)\.")
    unexpected = [key for key in info["unexpected_keys"]
                  if layers is None or not (m := skipped.match(key)) or int(m.group(1)) < layers]
    if info["missing_keys"] or unexpected:
        problem = (f"has no tensor {sorted(info['missing_keys'])[0]!r}" if info["missing_keys"]
                   else f"has a tensor transformers does not expect: {sorted(unexpected)[0]!r}")
        raise ConversionError(f"{hf_dir}: the reference model {problem}")
    return model.eval()


def transformers_logits(hf_dir: Path, tokens: torch.Tensor, layers: int | None = None) -> torch.Tensor:
    """fp32 logits of `transformers` on `tokens` (the first `layers` layers only, if given)."""
    model = load_reference_model(hf_dir, layers)
    with torch.no_grad():
        return model(tokens).logits.float()


def compare_logits(
    hf_dir: Path, checkpoint: Path, tp: int, pp: int, batch: int, seq: int, layers: int | None = None
) -> dict:
    config = json.loads((find_hf_assets(checkpoint) / "config.json").read_text())
    tokens = _fixed_tokens(config["vocab_size"], batch, min(seq, config["max_position_embeddings"]))
    ours = megatron_logits_subprocess(checkpoint, tokens, tp, pp, layers)
    reference = transformers_logits(hf_dir, tokens, layers)
    diff = (ours - reference).abs()
    return {
        "tp": tp,
        "pp": pp,
        "batch": batch,
        "seq": seq,
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((ours.argmax(-1) == reference.argmax(-1)).float().mean()),
        "reference_max_abs_logit": float(reference.abs().max()),
    }


def check_layers(layers: int | None, arch: ModelArchitecture, tp: int, pp: int) -> int | None:
    """Validate `--layers` (and the layout for the model the logits check builds) before any
    work; returns the layer count to truncate to, None for the whole model."""
    total = arch.num_layers
    if layers is not None:
        if not 1 <= layers <= total:
            raise ConversionError(f"--layers must be between 1 and {total} (num_hidden_layers in the checkpoint's "
                                  f"hf_assets/config.json), got {layers}")
        if layers % pp:
            raise ConversionError(f"--layers {layers} is not divisible by --pp {pp}: each pipeline stage must "
                                  "build the same number of the compared layers")
        if layers == total:
            layers = None
    try:
        validate_layout(dataclasses.replace(arch, num_layers=layers or total), ParallelLayout(tensor=tp, pipeline=pp))
    except ModelConfigError as error:
        raise ConversionError(f"--tp {tp} --pp {pp} cannot split this model: {error}") from None
    return layers


def describe_checks(report: VerifyReport, tp: int, pp: int) -> list[str]:
    """What each check covered, in words (printed by the CLI and stored in the JSON report)."""
    total, layers = report.num_layers, report.layers_compared
    lines = [
        f"tensors: all {report.tensors_checked} HF tensors (embedding, all {total} layers, final norm, LM head) "
        "rebuilt from the checkpoint and compared bit for bit with the source"
    ]
    if layers is None:
        lines.append(f"logits: the whole model ({total} layers), Megatron at TP{tp} PP{pp} vs transformers, both fp32")
    else:
        skipped = f"layer {layers}" if layers == total - 1 else f"layers {layers}-{total - 1}"
        lines.append(
            f"logits: the first {layers} of {total} layers + final norm + LM head (both sides truncated), "
            f"Megatron at TP{tp} PP{pp} vs transformers, both fp32"
        )
        lines.append(f"not run through the logits check: {skipped} (covered by the bit-exact tensor check only)")
    return lines


def verify(
    hf_dir: str | Path,
    ckpt_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    batch: int = 2,
    seq: int = 64,
    atol: float = DEFAULT_ATOL,
    min_top1: float = DEFAULT_MIN_TOP1,
    layers: int | None = None,
) -> VerifyReport:
    """Run both checks; `report.passed` says whether everything is within tolerance.

    `layers=N` compares logits of the first N layers only (see the module docstring: what that
    proves and what it costs); the tensor check always covers every tensor.
    """
    hf_dir, checkpoint = Path(hf_dir), resolve_checkpoint(ckpt_dir)
    admit_checkpoint(checkpoint)
    arch = load_architecture(find_hf_assets(checkpoint))
    layers = check_layers(layers, arch, tp, pp)
    report = VerifyReport(num_layers=arch.num_layers, layers_compared=layers)
    compare_tensors(hf_dir, checkpoint, arch, report)
    report.logits = compare_logits(hf_dir, checkpoint, tp, pp, batch, seq, layers)
    report.logits.update(atol=atol, min_top1=min_top1)
    report.checked = describe_checks(report, tp, pp)
    report.passed = (
        not report.mismatched
        and report.logits["max_abs_diff"] <= atol
        and report.logits["top1_agreement"] >= min_top1
    )
    return report
