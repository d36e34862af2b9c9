#!/usr/bin/env bash
# Re-check that the `gpu` extra of pyproject.toml resolves: pip's resolver, in dry-run mode, in a
# throwaway Python 3.11 venv, against PyPI, for Python 3.11 / Linux x86_64. Installs nothing into
# any existing venv and touches nothing in the work tree. NOT part of CI: it needs the network and
# pip downloads several GB of wheels into a temporary folder (deleted on exit), because the
# resolver needs every candidate's metadata (PEP 658 metadata files avoid that where the index
# serves them; this project's PyPI mirror did not on 2026-12-06). See docs/gpu_install.md.
#
#   bash scripts/check_gpu_pins.sh                    # exit 0: resolves, and every gpu pin is what pip picked
#   REPORT=/tmp/gpu-report.json bash scripts/check_gpu_pins.sh   # also keep pip's JSON report
#   PYTHON=/path/to/python3.11 bash scripts/check_gpu_pins.sh
#   RIFT_KEEP_PIP_CONFIG=1 bash scripts/check_gpu_pins.sh   # use the machine's pip config (indexes,
#                                                           # find-links, constraints) instead of plain PyPI
#
# Exit status: 0 resolved and checked; 1 pip could not resolve (its message is printed); 2 it
# resolved, but to something other than the pins; 3 no Python 3.11.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

python="${PYTHON:-python3.11}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "check_gpu_pins.sh: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  exit 3
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/rift-gpu-pins.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tmp" "$work/project"
# pip's downloads and build environments go to $work and are deleted with it; no pip cache.
export TMPDIR="$work/tmp" PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ -z "${RIFT_KEEP_PIP_CONFIG:-}" ]]; then
  # Plain PyPI, as on a GPU user's machine: no config files (this project's machines add a local
  # CPU torch wheel and cap torch at <=2.14.1 through them), no find-links, no constraints.
  export PIP_CONFIG_FILE=/dev/null
  unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT PIP_BUILD_CONSTRAINT PIP_ONLY_BINARY PIP_NO_BINARY
fi

# Resolve from a copy of the project's metadata, so that building it (setuptools) leaves no
# egg-info in the work tree.
cp "$root/pyproject.toml" "$root/README.md" "$work/project/"

"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet 'pip>=25.3'   # --build-constraint needs pip 25.3+
"$work/venv/bin/python" -m pip --version

# transformer_engine_torch is an sdist only: pip builds its metadata in an isolated build
# environment, and its setup.py derives its core dependency (transformer_engine_cu12 or _cu13)
# from the CUDA of the torch found there. Constrain that torch to the gpu extra's torch, so the
# metadata is the one a `--no-build-isolation` install against the pinned torch produces.
"$work/venv/bin/python" - "$work/project/pyproject.toml" > "$work/build-constraints.txt" <<'PY'
import sys, tomllib
gpu = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["gpu"]
torch = [r for r in gpu if r.replace(" ", "").lower().startswith("torch==")]
assert len(torch) == 1, f"gpu extra must name torch exactly once: {gpu}"
print(torch[0])
PY
echo "build constraint: $(cat "$work/build-constraints.txt")"

# --only-binary :all: : every package from a wheel, except transformer-engine-torch (no wheel on
# PyPI). The project itself is a local directory and is built (metadata only) regardless.
set +e
"$work/venv/bin/python" -m pip install --dry-run --ignore-installed \
  --only-binary ':all:' --no-binary transformer-engine-torch \
  --build-constraint "$work/build-constraints.txt" \
  --report "$work/report.json" \
  "$work/project[gpu]" > "$work/pip.log" 2>&1
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  tail -n 60 "$work/pip.log" >&2
  echo "check_gpu_pins.sh: the gpu extra does NOT resolve (pip exit $rc)" >&2
  exit 1
fi
grep -E '^Would install' "$work/pip.log" | fold -s -w 160
[[ -n "${REPORT:-}" ]] && cp "$work/report.json" "$REPORT" && echo "report: $REPORT"

# pip resolved: now check that it picked exactly the pinned versions (and no CPU torch).
"$work/venv/bin/python" - "$work/project/pyproject.toml" "$work/report.json" <<'PY'
import json, sys, tomllib
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
from pip._vendor.packaging.version import Version

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
picked = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
          for i in json.load(open(sys.argv[2]))["install"]}
bad = []
for line in project["optional-dependencies"]["gpu"] + project["dependencies"]:
    req = Requirement(line)
    got = picked.get(canonicalize_name(req.name))
    if got is None or not req.specifier.contains(Version(got), prereleases=True):
        bad.append(f"{line!r}: resolved to {got}")
if "+cpu" in picked.get("torch", ""):
    bad.append(f"torch resolved to a CPU build: {picked['torch']}")
for name in ("torch", "vllm", "transformer-engine", "transformer-engine-torch", "transformer-engine-cu13",
             "transformer-engine-cu12", "megatron-core", "transformers", "numpy", "nvidia-ml-py",
             "torchvision", "torchaudio", "triton", "flashinfer-python", "cuda-toolkit"):
    print(f"  {name:26s} {picked.get(name, '-')}")
print(f"  ({len(picked)} distributions in all)")
if "transformer-engine-cu12" in picked:
    bad.append("transformer_engine_cu12 was pulled in: TE's torch extension metadata saw a CUDA 12 torch")
if bad:
    print("check_gpu_pins.sh: resolved, but not to the pins:\n  " + "\n  ".join(bad), file=sys.stderr)
    sys.exit(2)
print("check_gpu_pins.sh: OK, the gpu extra resolves to its pins")
PY
