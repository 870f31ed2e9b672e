#!/usr/bin/env bash
# The test command: lint, then every test against the real engines.
# pytest's exit 5 ("no tests ran") is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
make lint || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $rc
