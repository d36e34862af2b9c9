"""GPU memory read from outside the processes that may use it: NVML (`nvidia-ml-py`), or
`nvidia-smi` without it, sampled while a process tree runs (GpuWatch), and the verdict on what
was seen (gpu_usage_problems: did a conversion touch the GPU at all). Reading from outside is the
point: a process cannot be trusted to report a CUDA context it should not have created."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

MIB = float(2**20)
GIB = float(2**30)
# A CUDA context alone costs hundreds of MiB of device memory; the device's used memory at rest
# moves by a few MiB at most. Anything above this over the baseline during a conversion is
# counted as the conversion using the GPU, even when NVML cannot name the process.
DEVICE_RISE_SLACK_MIB = 32.0
POLL_SECONDS = 0.1


class GpuReader(Protocol):
    def device_used_mib(self) -> float: ...
    def process_used_mib(self) -> dict[int, float | None]: ...


class NvmlReader:
    """Every GPU through nvidia-ml-py (`pynvml`): used memory summed over the devices, and each
    process's used memory. All devices, because NVML numbers GPUs physically and CUDA after
    CUDA_VISIBLE_DEVICES: reading "device 0" could watch the wrong one."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def device_used_mib(self) -> float:
        return sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles) / MIB

    def process_used_mib(self) -> dict[int, float | None]:
        found: dict[int, float | None] = {}
        for handle in self._handles:
            for query in (self._nvml.nvmlDeviceGetComputeRunningProcesses,
                          self._nvml.nvmlDeviceGetGraphicsRunningProcesses):
                for proc in query(handle):
                    mib = None if proc.usedGpuMemory is None else proc.usedGpuMemory / MIB
                    found[proc.pid] = mib if found.get(proc.pid) is None else found[proc.pid] + (mib or 0.0)
        return found


class SmiReader:
    """The same readings through `nvidia-smi` (slower: one process per reading)."""

    def _query(self, what: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]

    def device_used_mib(self) -> float:
        return sum(float(row[0]) for row in self._query("gpu=memory.used"))

    def process_used_mib(self) -> dict[int, float | None]:
        rows = self._query("compute-apps=pid,used_memory")
        return {int(pid): (float(mib) if mib.replace(".", "").isdigit() else None) for pid, mib in rows}


def open_gpu_reader() -> tuple[GpuReader | None, str]:
    """NVML if nvidia-ml-py imports, else nvidia-smi if on PATH, else none (and why)."""
    try:
        return NvmlReader(), "nvml"
    except Exception as error:  # ImportError, or NVML present but failing: fall back
        nvml_error = f"{type(error).__name__}: {error}"
    if shutil.which("nvidia-smi"):
        return SmiReader(), "nvidia-smi"
    return None, f"no GPU memory reader: nvidia-ml-py failed ({nvml_error}) and nvidia-smi is not on PATH"


def process_tree(root: int) -> set[int]:
    """`root` and its live descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


class GpuWatch:
    """Samples a GpuReader every POLL_SECONDS while a process tree runs: which of its processes
    NVML lists (and their memory), new processes on the GPU, device used memory over baseline."""

    def __init__(self, reader: GpuReader) -> None:
        self.reader = reader
        self.baseline_pids = set(reader.process_used_mib())
        self.baseline_used = reader.device_used_mib()
        self.max_used, self.samples, self.tree_peak_sum = self.baseline_used, 0, 0.0
        self.tree_pids_on_gpu: dict[int, float | None] = {}
        self.new_pids_on_gpu: dict[int, float | None] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tree: set[int] = set()

    def attach(self, pid: int) -> None:
        self._tree = {pid}
        self._thread = threading.Thread(target=self._loop, args=(pid,), daemon=True)
        self._thread.start()

    def _loop(self, root: int) -> None:
        while not self._stop.is_set():
            self._tree |= process_tree(root)
            try:
                procs = self.reader.process_used_mib()
                self.max_used = max(self.max_used, self.reader.device_used_mib())
            except Exception as error:  # an NVML hiccup must not end the sampling silently
                self.errors.append(f"{type(error).__name__}: {error}")
                self._stop.wait(POLL_SECONDS)
                continue
            tree_sum = 0.0
            for pid, mib in procs.items():
                target = self.tree_pids_on_gpu if pid in self._tree else (
                    self.new_pids_on_gpu if pid not in self.baseline_pids else None)
                if target is not None:
                    target[pid] = mib if target.get(pid) is None else max(target[pid], mib or 0.0)
                if pid in self._tree:
                    tree_sum += mib or 0.0
            self.tree_peak_sum = max(self.tree_peak_sum, tree_sum)
            self.samples += 1
            self._stop.wait(POLL_SECONDS)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return {"samples": self.samples, "device_used_baseline_mib": self.baseline_used,
                "device_used_max_mib": self.max_used, "device_used_rise_mib": self.max_used - self.baseline_used,
                "tree_pids_on_gpu": dict(self.tree_pids_on_gpu), "tree_peak_sum_mib": self.tree_peak_sum,
                "new_pids_on_gpu": dict(self.new_pids_on_gpu), "errors": self.errors[:5],
                "error_count": len(self.errors)}


def gpu_usage_problems(watch: Mapping[str, Any]) -> list[str]:
    """Why a GpuWatch summary shows a process tree that used the GPU: one of its processes was
    listed by NVML at all (even a context with no allocations lists it), a process that was not
    on the GPU before the command started appeared (the tree's pid may not be visible to NVML
    in another pid namespace), or the device's used memory rose above the slack."""
    problems = [f"pid {pid} held {'an unknown amount of' if mib is None else f'{mib:.0f} MiB of'} GPU memory"
                for pid, mib in watch["tree_pids_on_gpu"].items()]
    problems += [f"a new process (pid {pid}, {mib} MiB) appeared on the GPU while it ran"
                 for pid, mib in watch["new_pids_on_gpu"].items()]
    if watch["device_used_rise_mib"] > DEVICE_RISE_SLACK_MIB:
        problems.append(f"device used memory rose by {watch['device_used_rise_mib']:.0f} MiB "
                        f"(> {DEVICE_RISE_SLACK_MIB:.0f})")
    if watch["samples"] == 0:
        problems.append("no GPU memory sample was taken")
    if watch.get("error_count"):
        problems.append(f"{watch['error_count']} GPU memory readings failed (first: {watch['errors'][0]})")
    return problems
