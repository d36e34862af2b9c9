"""Training throughput of one `rift` step against plain PyTorch + `transformers`, and its MFU.

Issue 17 asks for two rows, each against a baseline measured in the same run:

    train_throughput  tokens/s of one real `rift` training step (`training.step.train_step`:
                      Megatron-Core GPTModel under Megatron DDP, the Megatron schedule, the RIFT
                      loss in place on the logits, Megatron's Adam with clipping) / tokens/s of a
                      straightforward implementation of the same step with `transformers`: the
                      same weights (the HF folder the Megatron checkpoint was converted from), the
                      same batch, the same dtype, the same loss written out in plain PyTorch
                      (`hf_rift_loss`), `torch.nn.utils.clip_grad_norm_`, `torch.optim.Adam`.
                      Target >= 1.0.
    train_mfu         the rift step's model FLOP/s / this machine's matmul FLOP/s, measured in the
                      same run at the same dtype (`matmul_flops`: a square GEMM). Report only.

Model FLOPs of a step (`step_flops`): 6 x (parameters that take part in a matmul: every linear
weight and the output layer; the input embedding is a lookup) x tokens, plus the attention's own
matmuls, 12 x layers x hidden x sequence per token (the PaLM paper's appendix B count; causal
masking not subtracted). That is the work a step must do however it is implemented, so MFU
compares implementations and machines.

Why the same numbers are the same: both sides start from the same weights, and the first step's
loss of both is compared (`first_loss_rel_diff`, fp32 round-off only); every step is timed after a
warm-up, the two sides and the GEMM probe take turns (drift on this shared machine hits all alike),
and each side's fastest run is used, as `loss_bench.py` does (on a 2-core machine that others load,
a run's wall time is mostly theirs; the fastest run is the one they disturbed least): tokens/s of
the fastest step, and the fastest single product of the GEMM probes as the machine's matmul
FLOP/s (so under load the MFU is an underestimate: a 0.2 s product falls between bursts more often
than a 15 s step). Median wall-time and CPU-second ratios are recorded as cross-checks. The batch
has no padding (every sample the same length, prompts of different lengths): padding is the
`packing` row's subject. The dtype is fp32, the trainer's CPU default (`model.dtype`; bf16 matmuls are slow
on the CPU path). Torch threads: the process default (all cores), the same for all three.

Where `train_throughput` misses its target, the row's cause is a profile of one step of each side
(the operators with the most self CPU time).

    PYTHONPATH=. python bench/train_bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

from suite import describe_split, profile_split, row  # noqa: E402

# Llama-shaped, untied output layer. FULL: ~58M parameters, 8 x 512 tokens per step.
FULL = {"model": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "vocab_size": 32000},
        "samples": 8, "length": 512, "reps": 3}
QUICK = {"model": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 8000},
         "samples": 4, "length": 128, "reps": 2}
TARGET = 1.0
LR = 1e-5
GEMM_SIZE = 2048


def build_model(work: Path, shape: dict, seed: int) -> tuple[Path, Path]:
    """A random-init fp32 LlamaForCausalLM saved as an HF folder, and its Megatron conversion."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rift_megatron.convert.hf_to_mcore import convert_hf_to_mcore

    config = LlamaConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                         max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    hf_dir, ckpt_dir = work / "hf", work / "mcore"
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(hf_dir)
    convert_hf_to_mcore(hf_dir, ckpt_dir, dtype="fp32")
    return hf_dir, ckpt_dir


def make_batch(samples: int, length: int, vocab: int, seed: int) -> dict:
    """`samples` rollouts of `length` tokens (prompts 1/8..1/4 of it), rewards +1 / -0.5, behaviour
    log-probs near log(1/vocab): the trainer's own batch builder, no padding."""
    import math
    import random

    from rift_megatron.rollout.batching import Sample, build_train_batch

    rng = random.Random(seed)
    drawn = []
    for index in range(samples):
        prompt = rng.randint(length // 8, length // 4)
        drawn.append(Sample(prompt_ids=[rng.randrange(3, vocab) for _ in range(prompt)],
                            response_ids=[rng.randrange(3, vocab) for _ in range(length - prompt)],
                            behavior_logprobs=[-math.log(vocab) + rng.gauss(0, 0.3) for _ in range(length - prompt)],
                            reward=1.0 if index % 2 == 0 else -0.5))
    return build_train_batch(drawn, pad_id=0)


def hf_rift_loss(logprobs, behavior_logprobs, rewards, loss_mask):
    """The RIFT objective (docs/objective.md, defaults: token ratios, no cap, global
    normalisation) written out as a PyTorch user would: -r * l on positive samples' tokens,
    |r| * exp(l - b) on negative samples' tokens, summed and divided by their count."""
    import torch

    mask = loss_mask != 0
    r = rewards[:, None]
    pos, neg = mask & (r > 0), mask & (r < 0)
    terms = torch.where(pos, -r * logprobs, 0.0) + torch.where(neg, r.abs() * torch.exp(logprobs - behavior_logprobs), 0.0)
    return terms.sum() / (pos | neg).sum()


class HFTrainer:
    """The baseline: `transformers`' model, the loss above, autograd, clipping, torch's Adam."""

    def __init__(self, hf_dir: Path, clip_grad: float) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
        self.clip_grad = clip_grad
        self.optimizer_seconds: list[float] = []  # clipping + Adam, per step (Megatron's step clips too)

    def step(self, batch: dict) -> float:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch["targets"][..., None])[..., 0]
        loss = hf_rift_loss(logprobs, batch["behavior_logprobs"], batch["rewards"], batch["loss_mask"])
        loss.backward()
        started = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer_seconds.append(time.perf_counter() - started)
        return float(loss.detach())


def timed_optimizer(state) -> list[float]:
    """Time every `state.optimizer.step()` from now on (Megatron's: clipping, Adam, the copies
    between its main and model parameters); the list the seconds go to."""
    seconds: list[float] = []
    step = state.optimizer.step

    def timed_step(*args, **kwargs):
        started = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    state.optimizer.step = timed_step
    return seconds


def matmul_flops(size: int = GEMM_SIZE, dtype: str = "float32", products: int = 5) -> dict[str, float]:
    """FLOP/s of `a @ b` on square `size` matrices at `dtype` (2 size^3 per product), with the
    process's threads: each of `products` products timed alone, the fastest is the machine's
    figure (a single product, ~0.2 s at 2048 here, is short enough to fall between neighbours'
    bursts on a shared machine; a long average would measure them)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(getattr(torch, dtype))
    b = torch.randn(size, size, generator=g).to(getattr(torch, dtype))
    out = a @ b  # warm-up
    seconds = []
    for _ in range(products):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        seconds.append(time.perf_counter() - started)
    flops = 2 * size**3
    return {"flops_per_s": flops / min(seconds), "median_flops_per_s": flops / statistics.median(seconds)}


def step_flops(shape: dict, tokens: int, seq: int) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward) on `tokens` tokens in rows of `seq`."""
    hidden, layers, ffn, vocab = (shape[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * ffn  # q, o; k, v; gate, up, down
    matmul_params = layers * per_layer + vocab * hidden  # + the output layer
    dense = 6 * matmul_params * tokens
    attention = 12 * layers * hidden * seq * tokens
    return {"matmul_parameters": matmul_params, "dense": dense, "attention": attention, "total": dense + attention}


def copy_split(fn, sizes: dict[str, int]) -> dict[str, dict[str, float]]:
    """The `aten::copy_` calls of one call of `fn` whose tensors have one of `sizes` elements:
    count and self CPU seconds per label (e.g. logits-sized, parameter-sized), and all copies."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    split = {label: {"calls": 0, "self_s": 0.0} for label in [*sizes, "all"]}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key != "aten::copy_":
            continue
        numel = math.prod(event.input_shapes[0]) if event.input_shapes and event.input_shapes[0] else 0
        for label in [label for label, size in sizes.items() if size == numel] + ["all"]:
            split[label]["calls"] += event.count
            split[label]["self_s"] += event.self_cpu_time_total / 1e6
    return split


def _timed(fn) -> tuple[float, float, Any]:
    started, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - started, time.process_time() - cpu, result


def measure(model: dict, samples: int, length: int, reps: int, seed: int = 0, work: Path | None = None) -> dict:
    """Both steps and the GEMM probe, interleaved; see the module docstring."""
    import torch

    from rift_megatron.loss import LossSettings
    from rift_megatron.models import parse_hf_config
    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
    from rift_megatron.training.setup import OptimConfig, setup_training
    from rift_megatron.training.step import train_step

    with tempfile.TemporaryDirectory(prefix="rift-train-bench-") as scratch:
        work = Path(work or scratch)
        hf_dir, ckpt_dir = build_model(work, model, seed)
        arch = parse_hf_config(json.loads((hf_dir / "config.json").read_text()))
        batch = make_batch(samples, length, model["vocab_size"], seed)
        optim = OptimConfig(lr=LR)
        init_distributed()
        init_model_parallel(ParallelLayout(), seed=seed)
        try:
            state = setup_training(arch, ParallelLayout(), optim, initial_weights=str(ckpt_dir))
            hf = HFTrainer(hf_dir, optim.clip_grad)
            settings = LossSettings()
            sides = {"rift": lambda: train_step(state, batch, settings, micro_batch_size=samples)["loss"],
                     "transformers": lambda: hf.step(batch)}
            optimizer_s = {"rift": timed_optimizer(state), "transformers": hf.optimizer_seconds}
            first = {name: fn() for name, fn in sides.items()}  # warm-up, from the same weights
            wall: dict[str, list[float]] = {name: [] for name in sides}
            cpu: dict[str, list[float]] = {name: [] for name in sides}
            gemm = []
            for _ in range(reps):
                for name, fn in sides.items():
                    seconds, cpu_s, _ = _timed(fn)
                    wall[name].append(seconds)
                    cpu[name].append(cpu_s)
                gemm.append(matmul_flops())
            result: dict[str, Any] = {}
            # The fastest step of each side split into its optimizer step and the rest (forward,
            # loss, backward; Megatron's schedule and gradient finalisation on the rift side).
            fastest = {name: times.index(min(times)) for name, times in wall.items()}
            result["fastest_step_split_s"] = {
                name: {"optimizer": optimizer_s[name][1 + index], "forward_backward": wall[name][index]
                       - optimizer_s[name][1 + index]} for name, index in fastest.items()}
            tokens = int(batch["tokens"].numel())
            rate = {name: tokens / min(times) for name, times in wall.items()}
            median_rate = {name: tokens / statistics.median(times) for name, times in wall.items()}
            flops = step_flops(model, tokens, length)
            result.update(
                parameters=arch.num_parameters(), tokens_per_step=tokens, samples=samples, length=length, reps=reps,
                dtype="float32", torch_threads=torch.get_num_threads(), model=model,
                first_loss=first, first_loss_rel_diff=abs(first["rift"] - first["transformers"]) / abs(first["transformers"]),
                wall_s=wall, cpu_s=cpu, tokens_per_s=rate, median_tokens_per_s=median_rate,
                ratio=rate["rift"] / rate["transformers"],
                median_ratio=median_rate["rift"] / median_rate["transformers"],
                cpu_ratio=statistics.median(cpu["transformers"]) / statistics.median(cpu["rift"]),
                step_flops=flops, gemm_flops_per_s=[g["flops_per_s"] for g in gemm], gemm_size=GEMM_SIZE,
                achieved_flops_per_s=flops["total"] * rate["rift"] / tokens,
                transformers_flops_per_s=flops["total"] * rate["transformers"] / tokens,
            )
            peak = max(result["gemm_flops_per_s"])
            result["mfu"] = result["achieved_flops_per_s"] / peak
            result["transformers_mfu"] = result["transformers_flops_per_s"] / peak
            result["median_mfu"] = (flops["total"] * median_rate["rift"] / tokens
                                    / statistics.median(g["median_flops_per_s"] for g in gemm))
            if result["ratio"] < TARGET:
                result["profile"] = {name: profile_split(fn) for name, fn in sides.items()}
                logits = tokens * state.unwrapped_chunks()[0].output_layer.weight.shape[0]  # padded vocabulary
                params = sum(p.numel() for chunk in state.unwrapped_chunks() for p in chunk.parameters())
                result["rift_copies"] = copy_split(sides["rift"], {"logits": logits, "parameters": params})
        finally:
            destroy_model_parallel()
    return result


def suite_rows(quick: bool = False) -> dict[str, dict]:
    """The suite's `train_throughput` and `train_mfu` rows."""
    size = QUICK if quick else FULL
    m = measure(size["model"], size["samples"], size["length"], size["reps"])
    split = m["fastest_step_split_s"]
    cause = "fastest steps: " + "; ".join(
        f"{name} {parts['forward_backward']:.3f} s forward + loss + backward, {parts['optimizer']:.3f} s optimizer step"
        for name, parts in split.items())
    if "profile" in m:
        copies = m["rift_copies"]
        cause += (f"; {describe_split('profile of a rift step', m['profile']['rift'])}; "
                  f"{describe_split('of a transformers step', m['profile']['transformers'])}; the rift step's "
                  f"copy_ {copies['all']['self_s']:.2f} s: {copies['logits']['calls']} logits-sized "
                  f"{copies['logits']['self_s']:.2f} s (GPTModel's output layer computes [s, b, v] logits and returns "
                  f"them transposed and made contiguous: forward and backward), {copies['parameters']['calls']} "
                  f"parameter-sized {copies['parameters']['self_s']:.2f} s (the distributed optimizer's main and "
                  "model parameters)")
    note = "--quick: a 2-layer model, 512 tokens per step; the full run's model is the measurement" if quick else None
    return {
        "train_throughput": row(m["ratio"], m, cause, note),
        "train_mfu": row(m["mfu"], {k: m[k] for k in ("achieved_flops_per_s", "gemm_flops_per_s", "gemm_size", "step_flops",
                                                      "transformers_mfu", "median_mfu", "torch_threads", "dtype")},
                         f"rift step {m['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s (model FLOPs "
                         f"{m['step_flops']['total'] / 1e9:.0f} G per step), {GEMM_SIZE}^2 fp32 GEMM "
                         f"{max(m['gemm_flops_per_s']) / 1e9:.1f} GFLOP/s; transformers step "
                         f"{m['transformers_flops_per_s'] / 1e9:.1f} GFLOP/s (MFU {m['transformers_mfu']:.3f})", note),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, 4 x 128 tokens: a smoke run")
    parser.add_argument("--reps", type=int, help="timed steps per side (default 3, --quick 2)")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.reps:
        size["reps"] = args.reps
    m = measure(size["model"], size["samples"], size["length"], size["reps"])
    print(f"{m['parameters'] / 1e6:.1f}M parameters, {m['samples']} x {m['length']} tokens, fp32, "
          f"{m['torch_threads']} threads; first-step loss rift {m['first_loss']['rift']:.6f}, transformers "
          f"{m['first_loss']['transformers']:.6f} (relative difference {m['first_loss_rel_diff']:.1e})")
    for name in ("rift", "transformers"):
        print(f"  {name:13s} fastest {min(m['wall_s'][name]):7.3f} s  {m['tokens_per_s'][name]:8.1f} tokens/s  "
              f"(median {statistics.median(m['wall_s'][name]):7.3f} s)")
    print(f"train_throughput = {m['ratio']:.3f} (target >= {TARGET}; median-run ratio {m['median_ratio']:.3f}, "
          f"CPU-second ratio {m['cpu_ratio']:.3f})")
    print(f"train_mfu = {m['mfu']:.3f} ({m['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s of "
          f"{max(m['gemm_flops_per_s']) / 1e9:.1f} GFLOP/s {GEMM_SIZE}^2 fp32 GEMM; medians: {m['median_mfu']:.3f}); "
          f"transformers {m['transformers_mfu']:.3f}")
    for name, split in m.get("profile", {}).items():
        print("  " + describe_split(name, split, top=6))
    if args.json:
        args.json.write_text(json.dumps(m, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
