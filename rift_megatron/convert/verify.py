"""`rift convert verify`: prove a Megatron checkpoint holds the HF model, tensor by tensor and
in what it computes.

1. Every HF tensor reconstructed from the checkpoint equals the source tensor exactly (after a
   cast to the stored dtype when the checkpoint was converted to another dtype).
2. Megatron's forward pass at the requested TP/PP (real processes under torchrun) gives the same
   logits as `transformers` on a fixed batch of token ids; both run in fp32.

Default tolerances, for fp32 compute: max |logit diff| <= 1e-3 and top-1 agreement >= 0.99.
Megatron and transformers run the same math in different kernel orders (fused QKV vs separate
projections, TP all-reduces), so differences are fp32 round-off growing with depth: ~5e-7 on a
4-layer test model; 1e-3 leaves room for deep models while any mapping error (a swapped head,
a shifted row, a wrong rope base) moves logits by O(1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rift_megatron.convert.checkpoint_files import find_hf_assets, resolve_checkpoint
from rift_megatron.convert.errors import ConversionError
from rift_megatron.convert.hf_to_mcore import inspect_source
from rift_megatron.convert.mcore_to_hf import iter_hf_blocks
from rift_megatron.convert.megatron_world import tp1_megatron_world

DEFAULT_ATOL = 1e-3
DEFAULT_MIN_TOP1 = 0.99


@dataclass
class VerifyReport:
    tensors_checked: int = 0
    tensors_exact: int = 0
    mismatched: list[dict] = field(default_factory=list)
    logits: dict | None = None
    passed: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def compare_tensors(hf_dir: Path, checkpoint: Path, report: VerifyReport) -> None:
    """Stream both sides one tensor at a time and record every difference."""
    source = inspect_source(hf_dir)
    seen: set[str] = set()
    mismatch: dict[str, float] = {}
    with tp1_megatron_world():
        for name, first_row, restored in iter_hf_blocks(checkpoint, source.arch):
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


def megatron_logits_subprocess(checkpoint: Path, tokens: torch.Tensor, tp: int, pp: int) -> torch.Tensor:
    """Run `verify_worker` on tp x pp local processes (torchrun) and return its logits."""
    with tempfile.TemporaryDirectory(prefix="rift-verify-") as work:
        tokens_path, out_path = Path(work) / "tokens.pt", Path(work) / "logits.pt"
        torch.save(tokens, tokens_path)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * pp}",
            "-m", "rift_megatron.convert.verify_worker", "--ckpt", str(checkpoint), "--tokens", str(tokens_path),
            "--out", str(out_path), "--tp", str(tp), "--pp", str(pp),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0 or not out_path.exists():
            raise ConversionError(f"Megatron forward at TP{tp} PP{pp} failed:\n{result.stderr[-4000:]}")
        return torch.load(out_path)


def transformers_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def compare_logits(hf_dir: Path, checkpoint: Path, tp: int, pp: int, batch: int, seq: int) -> dict:
    config = json.loads((find_hf_assets(checkpoint) / "config.json").read_text())
    tokens = _fixed_tokens(config["vocab_size"], batch, min(seq, config["max_position_embeddings"]))
    ours = megatron_logits_subprocess(checkpoint, tokens, tp, pp)
    reference = transformers_logits(hf_dir, tokens)
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
) -> VerifyReport:
    """Run both checks; `report.passed` says whether everything is within tolerance."""
    hf_dir, checkpoint = Path(hf_dir), resolve_checkpoint(ckpt_dir)
    report = VerifyReport()
    compare_tensors(hf_dir, checkpoint, report)
    report.logits = compare_logits(hf_dir, checkpoint, tp, pp, batch, seq)
    report.logits.update(atol=atol, min_top1=min_top1)
    report.passed = (
        not report.mismatched
        and report.logits["max_abs_diff"] <= atol
        and report.logits["top1_agreement"] >= min_top1
    )
    return report
