#!/usr/bin/env bash
# Install (first time) with the test tools and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
# With arguments: one pytest run with them. Without (the whole suite, as CI runs it): two pytest
# runs side by side, so both cores stay busy: the multi-process tests (torchrun worlds, the demo,
# the real model) one at a time in one, the single-process unit tests in the other; the second's
# output follows the first's, and either failing fails the script.
if [[ $# -gt 0 ]]; then
  exec .venv/bin/python -m pytest -q --timeout=1200 "$@"
fi
log="$(mktemp)"
.venv/bin/python -m pytest -q --timeout=1200 tests/distributed tests/e2e tests/real_model >"$log" 2>&1 &
multi=$!
status=0
.venv/bin/python -m pytest -q --timeout=1200 tests/unit || status=$?
wait "$multi" || status=$?
echo "---- tests/distributed tests/e2e tests/real_model ----"
cat "$log"
rm -f "$log"
exit "$status"
