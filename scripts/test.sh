#!/usr/bin/env bash
# Install (first time) with the test tools and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
# With arguments: one pytest run with them. Without (the whole suite, as CI runs it): two pytest
# runs side by side, so both cores stay busy: the torchrun worlds and the demo one at a time in
# one; the unit tests, the real model and the one-process fault runs in the other (split so both
# take about as long); the first's output follows the second's, and either failing fails the script.
if [[ $# -gt 0 ]]; then
  exec .venv/bin/python -m pytest -q --timeout=1200 "$@"
fi
log="$(mktemp)"
.venv/bin/python -m pytest -q --durations=25 --timeout=1200 tests/distributed tests/e2e \
  --ignore=tests/distributed/test_faults.py >"$log" 2>&1 &
multi=$!
status=0
.venv/bin/python -m pytest -q --durations=25 --timeout=1200 tests/unit tests/real_model tests/distributed/test_faults.py || status=$?
wait "$multi" || status=$?
echo "---- tests/distributed (but test_faults.py) tests/e2e ----"
cat "$log"
rm -f "$log"
exit "$status"
