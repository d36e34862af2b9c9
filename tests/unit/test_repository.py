"""The repository is self-contained: the specification travels with the code, and no file points
at one machine's paths (a user's clone has neither the author's folders nor its neighbours)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".json"}
# Written split so this file does not match itself.
FORBIDDEN = ("/wo" + "rk/", "../sha" + "red/", "RI" + "FT.md", "/tmp/probe" + "-venv")


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return [REPO_ROOT / name for name in listed.splitlines() if Path(name).suffix in TEXT_SUFFIXES]


def test_no_file_points_outside_the_repository():
    hits = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            hits += [f"{path.relative_to(REPO_ROOT)}:{number}: {word}" for word in FORBIDDEN if word in line]
    assert not hits, "\n".join(hits)


def test_the_objective_specification_is_in_the_repository():
    spec = (REPO_ROOT / "docs" / "objective.md").read_text()
    for term in ("min(rho_{i,t}, C)", "per_sign", "granularity: sequence", "Bounded", "Invariance"):
        assert term in spec, term
    for user in ("rift_megatron/loss/objective.py", "rift_megatron/loss/__init__.py", "tests/unit/loss_reference.py",
                 "README.md"):
        assert "docs/objective.md" in (REPO_ROOT / user).read_text(), user
