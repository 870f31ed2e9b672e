#!/usr/bin/env bash
# The test command: lint, then every test against the real engines.
# Test modules run on VENDETTA_TEST_WORKERS workers (2; 0 runs them in this
# process), each module on one worker: its module fixtures (nodes, coordinators)
# are its own. Every test names its own workspaces, nodes and folders, so
# modules may run side by side.
# pytest's exit 5 ("no tests ran") is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
make lint || exit 1
workers=${VENDETTA_TEST_WORKERS:-2}
parallel=()
if [[ $workers != 0 ]]; then
  # In the order of tests/conftest.py (the longest modules first), not xdist's
  # own (modules with the most tests first, which left the crash test for last).
  parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
.venv/bin/python -m pytest "${parallel[@]}" "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $rc
