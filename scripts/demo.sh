#!/usr/bin/env bash
# Install (first time) and run the main job on its built-in default: `rift demo` on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/rift demo "$@"
