#!/usr/bin/env bash
# The demo: installs what is missing (scripts/setup.sh), then runs a Docker
# workspace on the local node through coordinator -> agent -> Docker, shows
# its status and logs, and tears it down. Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
CONFIG=examples/demo/.vendetta/config.yaml

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "Start the coordinator (state in ${VENDETTA_HOME:-~/.local/state/vendetta})"
show vendetta server start
for _ in $(seq 100); do vendetta node status local >/dev/null 2>&1 && break; sleep 0.2; done
show vendetta node status local

step "Create and start a Docker workspace with three services on the local node"
if vendetta workspace status demo >/dev/null 2>&1; then
  vendetta workspace destroy demo --force  # a previous run's
fi
show vendetta workspace create demo --config "$CONFIG"
show vendetta workspace up demo
show vendetta workspace list
show vendetta workspace exec demo -- sh -c 'echo "hello from $(hostname), inside the workspace"'

step "The project's code is at /workspace (in a git checkout: a worktree of its own, branch vendetta/demo)"
show vendetta workspace status demo
# examples/demo in a git checkout: the worktree holds the whole repository; else the folder itself.
show vendetta workspace exec demo -- sh -c \
  'cd /workspace && pwd && cat examples/demo/hello.txt 2>/dev/null || cat hello.txt'

step "Reach the web service on this machine: the coordinator forwards localhost:PORT"
show vendetta workspace ports demo
url=$(vendetta workspace ports demo --json | python3 -c 'import json,sys; print(next(r["url"] for r in json.load(sys.stdin) if r["service"]=="web"))')
show python3 -c "import urllib.request; print(urllib.request.urlopen('$url/').read().decode())"

step "Logs of one service, then all of them interleaved, following for 3 seconds"
show vendetta workspace logs demo --service web
show timeout --signal=INT 3 vendetta workspace logs demo --follow --tail 4 || true

step "Stop and remove it"
show vendetta workspace down demo
show vendetta workspace destroy demo
show vendetta server stop
step "Done. Next: vendetta node add NAME ADDRESS to run workspaces on another machine."
