#!/usr/bin/env bash
# Download, here (with network), the wheels bench/gpu_check.py needs on the GPU machine (Python
# 3.12, torch 2.11+cu130 preinstalled, no network) that its image does not already have.
#
#   bash bench/fetch_gpu_wheels.sh [DEST]      # default DEST: .whl/ in the repository root
#
# Exactly what `rift train` (offline) and `rift convert` import, minus the image's packages
# (its documented package list), found by recording every module those commands load on the
# CPU (a sitecustomize hook in all their processes) and mapping modules to distributions:
#   megatron-core  the trainer and conversion (cp312 wheel: it has a C++ extension)
#   datasets       rollout buffers are Parquet read/written through `datasets`
#   dill, multiprocess   imported by `datasets`
# Not needed on that path (imported only by online rewards / rollouts): math-verify,
# latex2sympy2-extended, antlr4-python3-runtime, vllm. datasets' other needs (pyarrow, pandas,
# fsspec, xxhash, huggingface-hub, ...) are in the image. Versions are the CPU venv's.
#
# Every wheel is --no-deps, for CPython 3.12 on manylinux x86_64, as the device README shows; one
# version of each. The device tool carries at most 64 MiB of working tree: the total is checked.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=${1:-.whl}
WHEELS=(
    megatron-core==0.16.1
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
)
LIMIT_MIB=48  # leaves >= 16 MiB of the 64 MiB carry limit for the repository itself

mkdir -p "$DEST"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

# The platform list of the device README; pip matches manylinux_2_N exactly, so name several.
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$tag")
done

# --isolated: this machine's pip config adds local CPU wheel folders and a torch constraint;
# neither may choose what goes to the GPU machine.
python3 -m pip --isolated --disable-pip-version-check download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

# One version of each (two stop the whole install there): anything else in DEST is an error.
names=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_' 'a-z-' | sort)
if [ "$(echo "$names" | uniq -d)" != "" ]; then
    echo "fetch_gpu_wheels: several versions of: $(echo "$names" | uniq -d | tr '\n' ' ')(empty $DEST first)" >&2
    exit 1
fi

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $NF}'
printf '  %8.2f MiB  total (limit %d MiB)\n' "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "fetch_gpu_wheels: $DEST is over $LIMIT_MIB MiB" >&2
    exit 1
fi
