#!/usr/bin/env bash
# Install (first time) with the test tools and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
exec .venv/bin/python -m pytest -q --timeout=1200 "$@"
