"""Test-suite wide: which tests may run side by side under pytest-xdist (`scripts/test.sh -n 2`).

Tests that launch several processes (torchrun worlds, `rift demo`, the real 135M model) share one
xdist group, so they run one after another on one worker while the other worker runs the
single-process tests (unit tests, one-process CLI runs): the 2 cores of a CI machine stay busy, and
no two multi-process tests compete for them (their timeouts and rank-skew margins assume that).
"""

from __future__ import annotations

from pathlib import Path

import pytest

MULTI_PROCESS_GROUP = "multi_process"
_E2E = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        heavy = (item.get_closest_marker("distributed") or item.get_closest_marker("real_model")
                 or _E2E in Path(str(item.fspath)).parents)
        if heavy:
            item.add_marker(pytest.mark.xdist_group(MULTI_PROCESS_GROUP))
