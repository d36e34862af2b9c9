"""A plan: every layout evaluated, the fastest one that fits recommended, or why none does."""

from __future__ import annotations

from dataclasses import dataclass

from rift_megatron.memory_model import GIB
from rift_megatron.planner.evaluate import LayoutPlan, evaluate
from rift_megatron.planner.space import PlanRequest, layouts


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    layouts: list[LayoutPlan]  # every layout whose batch sizes split over the world, best first
    recommended: LayoutPlan | None
    reason: str

    @property
    def feasible(self) -> bool:
        return self.recommended is not None

    def as_dict(self) -> dict:
        """`rift plan --json`'s object."""
        hw = self.request.hardware
        return {
            "feasible": self.feasible, "reason": self.reason,
            "recommended": self.recommended.as_dict() if self.recommended else None,
            "layouts": [plan.as_dict() for plan in self.layouts],
            "assumptions": {"gpu_tflops": hw.tflops, "train_mfu": hw.train_mfu, "decode_mfu": hw.decode_mfu,
                            "hbm_gbps": hw.hbm_gbps, "push_gbps": hw.push_gbps, "host_link_gbps": hw.host_link_gbps,
                            "headroom_gib": self.request.headroom_gib},
        }


# Step times closer than this are within the FLOP model's resolution: among them the layout with the
# least model parallelism wins (its communication, which the model sees only in part, is the least),
# then the one leaving the most memory free (e.g. offloading for 1% more time and 18 GiB more room).
RESOLUTION = 0.03


def _rank(plan: LayoutPlan) -> tuple:
    """Fitting layouts first, fastest first (among equals the least model parallelism, then the
    least memory); then the others, the least memory first (the nearest to fitting)."""
    if not plan.feasible:
        return (1, plan.per_gpu_memory_gib)
    return (0, plan.step.total, plan.layout.model_parallel, plan.per_gpu_memory_gib)


def _recommend(fitting: list[LayoutPlan]) -> LayoutPlan:
    """The fastest predicted, or one within RESOLUTION of it with less model parallelism or more free memory."""
    fastest = fitting[0].step.total
    close = [p for p in fitting if p.step.total <= fastest * (1 + RESOLUTION)]
    return min(close, key=lambda p: (p.layout.model_parallel, p.layout.virtual_pipeline or 1,
                                     round(p.per_gpu_memory_gib), p.step.total))


def make_plan(request: PlanRequest) -> Plan:
    """Evaluate every layout of `request`; recommend the fastest predicted one that fits."""
    evaluated = sorted((p for p in (evaluate(request, lay) for lay in layouts(request)) if p is not None), key=_rank)
    if not evaluated:
        return Plan(request, [], None, f"no layout splits the model, the world of {request.world} GPUs and a rollout "
                                       f"of {request.prompts_per_step} prompts x {request.k} samples: check the "
                                       "pinned sizes and --prompts-per-step")
    best = evaluated[0]
    if best.feasible:
        best = _recommend([p for p in evaluated if p.feasible])
        evaluated.remove(best)
        evaluated.insert(0, best)
        return Plan(request, evaluated, best, f"{best.layout.name()} fits with at least {request.headroom_gib:g} GiB "
                                              f"headroom and is the fastest predicted (within 3%: the least model parallelism, then the most free memory) of "
                                              f"{sum(p.feasible for p in evaluated)} layouts that fit")
    closest = best  # the least memory of all: nothing fits
    state = closest.memory.trainer_state / GIB
    return Plan(request, evaluated, None, (
        f"no layout fits on {request.nodes} x {request.gpus_per_node} GPUs of {request.gpu_memory_gib:g} GiB: the "
        f"one needing the least memory, {closest.layout.name()}, fails: {closest.reason} (its trainer state alone: "
        f"{state:.1f} GiB per GPU of bf16 weights, fp32 gradients and Adam state)"))
