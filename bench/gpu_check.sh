#!/usr/bin/env bash
# Run bench/gpu_check.py on the GPU machine, from the repository root:
#
#   bash bench/gpu_check.sh WHEELS_DIR [extra gpu_check.py arguments]
#
# WHEELS_DIR holds what bench/fetch_gpu_wheels.sh downloaded (megatron-core and the few packages
# the image lacks). They are installed --no-deps into /tmp/site (nothing can be fetched there, and
# the image's torch, transformers, ... must stay as they are). The project itself is not
# installed: pyproject.toml asks for Python <3.12 and `pip install -e` wants build isolation
# (network), so it is imported from the checkout through PYTHONPATH. The report goes to
# $OUT/gpu_check_report.json ($OUT: the device tool's output folder; `.` when unset).
set -euo pipefail

WHEELS=${1:?usage: bash bench/gpu_check.sh WHEELS_DIR [gpu_check.py arguments]}
shift
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
SITE=${GPU_CHECK_SITE:-/tmp/site}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# What the run depends on, before it starts: a missing or too-old package shows here first.
python3 - <<'EOF' || true
import importlib, importlib.metadata as md
for dist, module in (("torch", "torch"), ("megatron-core", "megatron.core"), ("transformers", "transformers"),
                     ("datasets", "datasets"), ("pyarrow", "pyarrow"), ("safetensors", "safetensors"),
                     ("sentencepiece", "sentencepiece"), ("nvidia-ml-py", "pynvml")):
    try:
        importlib.import_module(module)
        print(f"preflight: {dist} {md.version(dist)} imports")
    except Exception as error:  # report and go on: gpu_check.py records the failure per check
        print(f"preflight: {dist} does NOT import: {type(error).__name__}: {error}")
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader || true

exec python3 bench/gpu_check.py --out "$OUT/gpu_check_report.json" "$@"
