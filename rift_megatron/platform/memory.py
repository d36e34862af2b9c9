"""Memory readings for the per-step metrics, one function per platform behind one interface.

GPU: NVML (`nvidia-ml-py`, the `gpu` extra) gives the device's used memory as `nvidia-smi` shows
it, i.e. trainer *and* the co-located vLLM engine; torch's peak allocation since the last reading
gives the trainer's own share. CPU: the process's resident set (psutil), which holds both as well.
"""

from __future__ import annotations

import functools

import torch

from rift_megatron.platform.device import current_platform

_GIB = float(2**30)


@functools.cache
def _nvml_handle(index: int):
    """NVML handle of this process's GPU, or None without nvidia-ml-py (then only torch's numbers).

    Looked up by UUID: NVML numbers GPUs physically, torch after CUDA_VISIBLE_DEVICES, so the same
    index names different GPUs whenever the visible set is restricted (Slurm, containers).
    """
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")


def memory_metrics() -> dict[str, float]:
    """This process's memory, in GiB, for the metrics line (keys differ per platform)."""
    if current_platform().is_cuda:
        index = torch.cuda.current_device()
        metrics = {"gpu_peak_allocated_gib": torch.cuda.max_memory_allocated(index) / _GIB}
        torch.cuda.reset_peak_memory_stats(index)
        handle = _nvml_handle(index)
        if handle is not None:
            import pynvml

            metrics["gpu_used_gib"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used / _GIB
        return metrics
    import psutil

    return {"cpu_rss_gib": psutil.Process().memory_info().rss / _GIB}
