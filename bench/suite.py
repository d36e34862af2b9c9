"""What the benchmark scripts share as parts of the one suite (`bench/run.py`).

Each script exposes `suite_rows(quick) -> {row name: row}`; a row is a dict built by `row()`:
the measured ratio, every number behind it (`details`) and, where the script measured why a target
is missed, a `cause` (a profile split, not a guess). The targets themselves live in `run.py`'s
table (the issue's contract), so a script never decides PASS / FAIL for the suite; it may say a
row is not meaningful at the size it ran (`note`).

`profile_split` is the profile behind a `cause` for rows whose work is torch operators (the loss,
the training step): the operators that took the most self CPU time in one call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")


def row(ratio: float, details: dict[str, Any], cause: str | None = None, note: str | None = None) -> dict[str, Any]:
    """One suite row as a script returns it (run.py adds name, baseline, target and pass)."""
    return {"ratio": float(ratio), "details": details, "cause": cause, "note": note}


def profile_split(fn: Callable[[], Any], top: int = 6) -> list[dict[str, Any]]:
    """The `top` torch operators by self CPU time in one call of `fn` (seconds, calls).

    Self time (not inclusive) so the entries add up: what the call spends in each operator
    itself. Used only where a target is missed, to say where the time went."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def describe_split(label: str, split: list[dict[str, Any]], top: int = 4) -> str:
    """`label`: op 1.23 s (45%), ... for a row's cause line."""
    return f"{label}: " + ", ".join(f"{e['op']} {e['self_s']:.2f} s ({e['share']:.0%})" for e in split[:top])


def busy_seconds() -> float:
    """CPU seconds all processes on the machine have been busy (from /proc/stat): read before and
    after a measurement, minus the measurement's own CPU time, it says how much others used."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICKS
