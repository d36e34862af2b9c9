"""Real Megatron-Core scenarios for `tests/unit/test_platform.py`, each run in a fresh process.

    python tests/unit/platform_scenarios.py SCENARIO [SCENARIO ...] [--skip PATCH]

Patching is process-global, so every run is its own process (one per rank for the two-rank
scenarios; the caller sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT).

* Without `--skip` the process sets itself up the way the package does: `init_distributed()`,
  i.e. `current_platform()`, which applies every CPU compatibility patch.
* With `--skip NAME` only `apply_cpu_compat(skip={NAME})` runs and the gloo group is created here
  directly: `current_platform()` (which would apply NAME after all) is never called.

Each scenario is a few independent cases; a failing case records the exception and the deepest
Megatron-Core frame it came from. The last stdout line is `SCENARIO_RESULT <json>`; the exit
status is 0 only if every case passed.

Keep the module top level free of side effects: `dist_checkpointing.save` starts a helper
process that re-imports this file (hence also the `__main__` guard).
"""

from __future__ import annotations

import argparse
import json
import linecache
import math
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULT_MARKER = "SCENARIO_RESULT "
PG_TIMEOUT = timedelta(seconds=60)

VOCAB, SEQ, MICRO_BATCH = 128, 8, 2

# Captured before any patch can be applied (observations for the scoping checks).
_ORIGINAL_ZEROS = torch.zeros
_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


class ScenarioCheckFailed(AssertionError):
    """A scenario ran without raising but its result is wrong."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioCheckFailed(message)


# --------------------------------------------------------------------------- model helpers


def model_parallel(tp: int = 1, pp: int = 1, seed: int | None = 1234) -> None:
    """Megatron's parallel state for this layout; seeds the RNG tracker unless seed is None."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def tiny_config(pp: int = 1):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=pp,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def tiny_gpt(pp: int = 1, tied: bool = False, seed: int = 0):
    """This rank's stage of a 2-layer GPTModel with Megatron-Core's local (non-TE) layers."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)  # use_cpu_initialization draws from the CPU generator
    return GPTModel(
        config=tiny_config(pp),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
    )


def micro_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
    return {
        "tokens": tokens,
        "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous(),
        "labels": torch.roll(tokens, -1, 1),
    }


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # attention_mask=None: the local attention falls back to Megatron's default causal mask.
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token.float().mean()


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def grad_norm_of(params, attr: str = "grad") -> float:
    total = 0.0
    for param in params:
        grad = getattr(param, attr, None)
        if grad is not None:
            total += float(grad.float().pow(2).sum())
    return math.sqrt(total)


# --------------------------------------------------------------------------- scenarios
# Each scenario maps case names to zero-argument callables returning a JSON-able value.


def scenario_ddp() -> dict[str, Callable]:
    """Megatron DDP: its param/grad buffers live on torch.cuda.current_device()."""

    def ddp_grad_sync():
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        model_parallel()
        model = tiny_gpt()
        ddp = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
            module=model,
        )
        devices = sorted({buffer.grad_data.device.type for buffer in ddp.buffers})
        expect(devices == ["cpu"], f"DDP grad buffers on {devices}")
        lm_loss(ddp, micro_batch()).backward()
        ddp.finish_grad_sync()
        norm = grad_norm_of(model.parameters(), "main_grad")
        expect(math.isfinite(norm) and norm > 0, f"main_grad norm after backward is {norm}")
        return {"grad_buffer_devices": devices, "main_grad_norm": norm}

    return {"ddp_grad_sync": ddp_grad_sync}


def scenario_rng_tracker() -> dict[str, Callable]:
    """Tensor-parallel RNG tracker: forked draws are governed by the seed, not the CPU generator."""

    def seeded_fork():
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

        model_parallel(seed=None)

        def forked_draw(seed: int, cpu_seed: int) -> torch.Tensor:
            model_parallel_cuda_manual_seed(seed)
            torch.manual_seed(cpu_seed)  # the default generator, which the fork must not use
            before = torch.get_rng_state()
            with get_cuda_rng_tracker().fork():  # as dropout in tensor-parallel regions does
                draw = torch.rand(16)
            expect(torch.equal(torch.get_rng_state(), before), "fork() did not restore the default RNG state")
            return draw

        first = forked_draw(seed=1, cpu_seed=100)
        again = forked_draw(seed=1, cpu_seed=200)
        other = forked_draw(seed=2, cpu_seed=100)
        expect(torch.equal(first, again), "same tracker seed, different forked draws")
        expect(not torch.equal(first, other), "different tracker seeds, identical forked draws")
        # Megatron seeds the tensor-model-parallel state with seed + 2718 + tp_rank.
        tp_seed = 1 + 2718 + ps.get_tensor_model_parallel_rank()
        expected = torch.rand(16, generator=torch.Generator().manual_seed(tp_seed))
        expect(torch.equal(first, expected), f"forked draw does not follow the tracker seed {tp_seed}")
        return {"first_values": first[:3].tolist()}

    return {"seeded_fork": seeded_fork}


def scenario_schedule() -> dict[str, Callable]:
    """One forward/backward through Megatron's schedule, and the default causal mask."""

    def forward_backward_no_pipelining():
        from megatron.core.pipeline_parallel import get_forward_backward_func

        model_parallel()
        model = tiny_gpt()
        schedule = get_forward_backward_func()
        expect(schedule.__name__ == "forward_backward_no_pipelining", f"got {schedule.__name__}")
        reports = schedule(
            forward_step_func=forward_step,
            data_iterator=iter([micro_batch(0), micro_batch(1)]),
            model=[model],
            num_microbatches=2,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        losses = [float(report["loss"]) for report in reports]
        norm = grad_norm_of(model.parameters())
        expect(len(losses) == 2 and all(math.isfinite(x) for x in losses), f"losses {losses}")
        expect(math.isfinite(norm) and norm > 0, f"grad norm {norm}")
        return {"losses": losses, "grad_norm": norm}

    def gpt_forward_default_causal_mask():
        model_parallel()
        model = tiny_gpt()
        batch = micro_batch()
        with torch.no_grad():
            logits = model(batch["tokens"], batch["position_ids"], None)
            # causality: changing the last token must not change earlier positions' logits
            changed = batch["tokens"].clone()
            changed[:, -1] = (changed[:, -1] + 1) % VOCAB
            logits_changed = model(changed, batch["position_ids"], None)
        expect(torch.allclose(logits[:, :-1], logits_changed[:, :-1]), "the attention is not causal")
        expect(not torch.allclose(logits[:, -1], logits_changed[:, -1]), "last token had no effect")
        return {"logits_shape": list(logits.shape)}

    return {
        "forward_backward_no_pipelining": forward_backward_no_pipelining,
        "gpt_forward_default_causal_mask": gpt_forward_default_causal_mask,
    }


def _optimizer_step(use_distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model_parallel()
    model = tiny_gpt()
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            clip_grad=1.0,
            use_distributed_optimizer=use_distributed_optimizer,
            bf16=False,
            fp16=False,
            params_dtype=torch.float32,
        ),
        [ddp],
    )
    before = [param.detach().clone() for param in model.parameters()]
    lm_loss(ddp, micro_batch()).backward()
    ddp.finish_grad_sync()
    update_successful, grad_norm, _ = optimizer.step()
    moved = sum(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
    expect(bool(update_successful), "optimizer step reported failure")
    expect(grad_norm is not None and math.isfinite(grad_norm) and grad_norm > 0, f"grad_norm {grad_norm}")
    expect(moved == len(before), f"only {moved} of {len(before)} parameters were updated")
    return {"optimizer": type(optimizer).__name__, "grad_norm": float(grad_norm)}


def scenario_optimizer() -> dict[str, Callable]:
    """get_megatron_optimizer + a clipped step, with and without the distributed optimizer."""
    return {
        "distributed_optimizer_step": lambda: _optimizer_step(use_distributed_optimizer=True),
        "clipped_fp32_optimizer_step": lambda: _optimizer_step(use_distributed_optimizer=False),
    }


def _shared_tmpdir() -> str:
    holder = [tempfile.mkdtemp(prefix="platform_ckpt_") if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _checkpoint_round_trip(load_strategy: Callable[[str], object] | None = None) -> dict:
    """Save one seeded GPTModel's sharded state dict, load it into another (with the load strategy
    `load_strategy(directory)` gives, or the default) and expect identical parameters."""
    from megatron.core import dist_checkpointing

    model_parallel()
    source = tiny_gpt(seed=1)
    target = tiny_gpt(seed=2)
    expect(
        any(not torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters())),
        "the two models start out identical",
    )
    directory = _shared_tmpdir()
    try:
        dist_checkpointing.save(source.sharded_state_dict(), directory)
        strategy = load_strategy(directory) if load_strategy is not None else None
        loaded = dist_checkpointing.load(target.sharded_state_dict(), directory, sharded_strategy=strategy)
        target.load_state_dict(loaded, strict=False)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)
    mismatched = [
        name
        for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters())
        if not torch.equal(a, b)
    ]
    expect(not mismatched, f"parameters differ after load: {mismatched}")
    return {"parameters": sum(1 for _ in source.parameters())}


def scenario_checkpoint() -> dict[str, Callable]:
    """dist_checkpointing save of a GPTModel's sharded state dict, loaded into another model."""
    return {"save_and_load": _checkpoint_round_trip}


def scenario_fully_parallel_load() -> dict[str, Callable]:
    """The same, loaded fully parallel: each of two data-parallel ranks reads half of the
    replicated tensors and they broadcast them to each other (checkpoint.fully_parallel_load)."""

    def fully_parallel_load():
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        return _checkpoint_round_trip(lambda directory: FullyParallelLoadStrategyWrapper(
            get_default_load_sharded_strategy(directory), ps.get_data_parallel_group()))

    return {"fully_parallel_load": fully_parallel_load}


def scenario_exchange_buffers() -> dict[str, Callable]:
    """The receive buffers of that exchange (one rank, no collective: in the exchange itself one
    rank fails at them while the other waits in its broadcast)."""

    def shard():
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        return ShardedTensor.from_rank_offsets("layer.weight", torch.zeros(4, 8))

    def unloaded_shard_buffer():
        from megatron.core.dist_checkpointing.exchange_utils import _get_empty_tensor_for_exchange

        needed = shard()
        needed.data = None  # not loaded by this rank: allocated as a receive buffer
        loaded: dict = {}
        tensor, _ = _get_empty_tensor_for_exchange("id", {"id": needed}, {}, loaded)
        expect(tensor.device.type == "cpu" and tuple(tensor.shape) == (4, 8), f"buffer {tensor.device} {tensor.shape}")
        return {"device": tensor.device.type}

    def loaded_shard_buffer():
        from megatron.core.dist_checkpointing.exchange_utils import _get_empty_tensor_for_exchange

        tensor, _ = _get_empty_tensor_for_exchange("id", {"id": shard()}, {}, {})
        expect(tensor.device.type == "cpu" and tuple(tensor.shape) == (4, 8), f"buffer {tensor.device} {tensor.shape}")
        return {"device": tensor.device.type}

    return {"unloaded_shard_buffer": unloaded_shard_buffer, "loaded_shard_buffer": loaded_shard_buffer}


def scenario_tied_embeddings() -> dict[str, Callable]:
    """PP=2 GPTModel with tied embeddings: the last stage's copy is synced from the first stage."""

    def tied_embedding_init():
        model_parallel(pp=2)
        model = tiny_gpt(pp=2, tied=True, seed=dist.get_rank())  # stages start from different draws
        weight = model.shared_embedding_or_output_weight().detach()
        gathered = [torch.empty_like(weight) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, weight)
        expect(all(torch.equal(gathered[0], w) for w in gathered), "tied embedding copies differ")
        expect(float(weight.abs().sum()) > 0, "tied embedding is all zeros")
        return {"weight_abs_sum": float(weight.abs().sum())}

    return {"tied_embedding_init": tied_embedding_init}


def scenario_pipeline_p2p() -> dict[str, Callable]:
    """PP=2 1F1B schedule step: activations/grads cross stages by batched p2p (batch_p2p_sync)."""

    def pipeline_step():
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        model_parallel(pp=2)
        model = tiny_gpt(pp=2)
        expect(model.config.batch_p2p_comm and model.config.batch_p2p_sync, "not the default p2p config")
        schedule = get_forward_backward_func()
        expect(
            schedule.__name__ == "forward_backward_pipelining_without_interleaving",
            f"got {schedule.__name__}",
        )
        reports = schedule(
            forward_step_func=forward_step,
            data_iterator=iter([micro_batch(i) for i in range(3)]),
            model=[model],
            num_microbatches=3,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        norm = grad_norm_of(model.parameters())
        stage = ps.get_pipeline_model_parallel_rank()
        expect(math.isfinite(norm) and norm > 0, f"stage {stage} grad norm {norm}")
        losses = [float(report["loss"]) for report in reports]
        if ps.is_pipeline_last_stage():
            expect(len(losses) == 3 and all(math.isfinite(x) for x in losses), f"losses {losses}")
        return {"losses": losses, "grad_norm": norm}

    return {"pipeline_step": pipeline_step}


def scenario_scoping() -> dict[str, Callable]:
    """Observations (asserted by the test) that the scoped patches stay inside Megatron-Core."""

    def observations():
        import importlib

        from rift_megatron.platform import cpu_compat

        try:
            torch.zeros(1, device="cuda")
            cuda_factory_error = None
        except Exception as exc:  # noqa: BLE001 - the exception is the observation
            cuda_factory_error = f"{type(exc).__name__}: {exc}"
        torch_seen_by = {
            name: ("real torch" if importlib.import_module(name).torch is torch else "view")
            for name in (
                *cpu_compat._DEVICE_LITERAL_MODULES,
                "megatron.core.tensor_parallel.random",
                "megatron.core.tensor_parallel.layers",
                "megatron.core.distributed.param_and_grad_buffer",
            )
        }
        from megatron.core.transformer.utils import get_default_causal_mask

        return {
            "type_from_test_code": torch.zeros(2).type(),
            "half_type_from_test_code": torch.zeros(2, dtype=torch.float16).type(),
            "type_conversion_dtype": str(torch.zeros(2).type(torch.float64).dtype),
            "type_conversion_name": torch.zeros(2).type("torch.DoubleTensor").type(),
            "tensor_type_is_original": torch.Tensor.type is _ORIGINAL_TENSOR_TYPE,
            "cuda_factory_from_test_code": cuda_factory_error,
            "global_torch_zeros_is_original": torch.zeros is _ORIGINAL_ZEROS,
            "megatron_default_causal_mask_device": get_default_causal_mask(3).device.type,
            "torch_seen_by": torch_seen_by,
        }

    return {"observations": observations}


SCENARIOS: dict[str, Callable[[], dict[str, Callable]]] = {
    "ddp": scenario_ddp,
    "rng_tracker": scenario_rng_tracker,
    "schedule": scenario_schedule,
    "optimizer": scenario_optimizer,
    "checkpoint": scenario_checkpoint,
    "fully_parallel_load": scenario_fully_parallel_load,
    "exchange_buffers": scenario_exchange_buffers,
    "tied_embeddings": scenario_tied_embeddings,
    "pipeline_p2p": scenario_pipeline_p2p,
    "scoping": scenario_scoping,
}
# World size each scenario needs (the caller launches one process per rank).
WORLD_SIZE = {name: 1 for name in SCENARIOS} | {"tied_embeddings": 2, "pipeline_p2p": 2, "fully_parallel_load": 2}


# --------------------------------------------------------------------------- runner


def _megatron_frame(tb) -> dict | None:
    """The deepest traceback frame inside megatron/core: where Megatron hit the CUDA assumption."""
    frame = None
    for summary in traceback.extract_tb(tb):
        marker = "/megatron/core/"
        if marker in summary.filename:
            code = summary.line or linecache.getline(summary.filename, summary.lineno).strip()
            frame = {
                "file": summary.filename.split(marker, 1)[1],
                "line": summary.lineno,
                "function": summary.name,
                "code": code,
            }
    return frame


def run_case(case: Callable) -> dict:
    try:
        return {"ok": True, "value": case()}
    except Exception as exc:  # noqa: BLE001 - every failure is reported, the test judges it
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "megatron_frame": _megatron_frame(exc.__traceback__),
            "traceback": traceback.format_exc()[-3000:],
        }


def _init_group() -> None:
    """The gloo group of this scenario run, on a file rendezvous (the parent's for several ranks,
    a private one for one): no port picked now and bound later, so no race for it."""
    from rift_megatron.parallel import private_rendezvous

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", init_method=os.environ["RIFT_TEST_RENDEZVOUS"], rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=PG_TIMEOUT)
    else:
        dist.init_process_group("gloo", init_method=private_rendezvous(), rank=0, world_size=1, timeout=PG_TIMEOUT)


def setup(skip: str | None) -> dict | None:
    """Apply the patches and create the gloo group; returns the platform (None in skip mode)."""
    from rift_megatron.platform import cpu_compat

    if skip is None:
        from rift_megatron.parallel import init_distributed
        from rift_megatron.platform import current_platform, resolve_layer_impl

        current_platform()  # all patches
        _init_group()
        platform = init_distributed(timeout=PG_TIMEOUT)  # the group exists: only returns the platform
        return {"kind": platform.kind, "backend": platform.backend, "layer_impl": resolve_layer_impl("auto", platform)}
    cpu_compat.apply_cpu_compat(skip={skip})
    _init_group()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    parser.add_argument("--skip", help="the one CPU compat patch to leave out")
    args = parser.parse_args(argv)

    from rift_megatron.platform import cpu_compat

    platform = setup(args.skip)
    results = {}
    for name in args.scenarios:
        results[name] = {case: run_case(fn) for case, fn in SCENARIOS[name]().items()}

    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    report = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "skip": args.skip,
        "platform": platform,
        "applied": list(cpu_compat.applied_patches()),
        "scenarios": results,
    }
    dist.destroy_process_group()
    print(RESULT_MARKER + json.dumps(report), flush=True)
    return 0 if all(c["ok"] for cases in results.values() for c in cases.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
