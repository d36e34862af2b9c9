#!/usr/bin/env bash
# Install (first time) with the test tools and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
# Two workers (RIFT_TEST_WORKERS; 0 = serial): multi-process tests stay on one of them, one at a
# time (tests/conftest.py), single-process tests run on the other.
exec .venv/bin/python -m pytest -q --timeout=1200 -n "${RIFT_TEST_WORKERS:-2}" --dist loadgroup "$@"
