"""The text of a plan: what `rift plan` prints and the prediction `rift train` prints at start."""

from __future__ import annotations

from rift_megatron.memory_model import GIB
from rift_megatron.planner.evaluate import LayoutPlan
from rift_megatron.planner.plan import Plan
from rift_megatron.planner.step_time import Hardware


def layout_summary(plan: LayoutPlan, hardware: Hardware, gpus: int) -> str:
    """Both phases' per-GPU memory, the push and the step time of one layout, a few lines."""
    m, s = plan.memory, plan.step
    return "\n".join([
        f"  memory per GPU (of {m.gpu / GIB:.1f} GiB; {m.reserve / GIB:g} GiB CUDA/NCCL reserve in each):",
        f"    training {m.training_total / GIB:.1f} GiB (trainer state {m.trainer_state / GIB:.1f}: weights "
        f"{m.trainer_weights / GIB:.1f} + grads {m.trainer_grads / GIB:.1f} + optimizer {m.trainer_optimizer / GIB:.1f}; "
        f"activations {m.activations / GIB:.1f}; log-prob buffers {m.logprob_buffers / GIB:.1f})",
        f"    weight push {m.push_total / GIB:.1f} GiB (trainer state + engine weights {m.engine_weights / GIB:.1f})",
        f"    rollout {m.rollout_total / GIB:.1f} GiB (trainer keeps {m.trainer_resident / GIB:.1f}; vLLM at "
        f"gpu_memory_utilization {plan.gpu_memory_utilization:g}: weights {m.engine_weights / GIB:.1f}, KV cache "
        f"{m.kv_cache / GIB:.1f} = {m.kv_tokens} tokens, {plan.waves} wave(s) per rollout)",
        f"  push: {plan.push_gib_per_gpu:.1f} GiB received per GPU per step",
        f"  step time on {gpus} GPUs: {s.total:.0f} s = train {s.train:.1f} + TP comm {s.tensor_comm:.1f} + DP comm "
        f"{s.data_comm:.1f} + prefill {s.prefill:.1f} + decode {s.decode:.1f} + push {s.push:.1f} + offload "
        f"{s.offload:.1f}",
        f"  assumptions: {hardware.assumptions()}",
    ])


def plan_report(plan: Plan, rows: int) -> str:
    """The recommended layout in full, then the `rows` best layouts one line each."""
    r = plan.request
    lines = [f"rift plan: {r.arch.architecture} ({r.arch.num_parameters() / 1e9:.1f}B parameters) on {r.nodes} x "
             f"{r.gpus_per_node} GPUs of {r.gpu_memory_gib:g} GiB; rollouts of {r.prompts_per_step} prompts x "
             f"{r.k} samples, samples up to {r.seq_len} tokens (mean prompt {r.prompt_len}, mean response "
             f"{r.response_len}); {len(plan.layouts)} layouts evaluated, {sum(p.feasible for p in plan.layouts)} fit"]
    if plan.recommended is None:
        lines.append(f"nothing fits: {plan.reason}")
    else:
        lines += [f"recommended: {plan.recommended.layout.name()}",
                  layout_summary(plan.recommended, r.hardware, r.world)]
    lines.append(f"{'layout':<68} {'util':>5} {'train':>7} {'rollout':>8} {'step s':>7}  fits")
    for candidate in plan.layouts[:rows]:
        lines.append(f"{candidate.layout.name():<68} {candidate.gpu_memory_utilization:>5g} "
                     f"{candidate.train_memory_gib:>6.1f}G {candidate.rollout_memory_gib:>7.1f}G "
                     f"{candidate.step.total:>7.0f}  {'yes' if candidate.feasible else 'no: ' + candidate.reason}")
    return "\n".join(lines)
