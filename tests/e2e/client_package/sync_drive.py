"""Run by the fresh venv's interpreter (tests/e2e/test_client_package.py): the blocking
Client from VENDETTA_URL / VENDETTA_TOKEN / VENDETTA_TLS_FINGERPRINT drives a workspace
through create, up, logs -f, exec and down; prints what it saw as JSON."""

import json
import sys
from pathlib import Path

from vendetta_client import Client, errors, pb

name, config = sys.argv[1], Path(sys.argv[2]).read_text()
seen: dict[str, object] = {"module": Client.__module__}
with Client() as vd:
    seen["where"] = vd.settings.endpoint.address
    seen["created"] = pb.WorkspaceState.Name(vd.create_workspace(name, config_yaml=config).state)
    seen["up"] = pb.WorkspaceState.Name(vd.up(name).state)
    with vd.logs(name, follow=True) as lines:
        for line in lines:
            if line.text.startswith("tick"):
                seen["log"] = line.text
                break
    done = vd.run(name, ["sh", "-c", "echo out-$((6*7)); echo oops >&2; exit 3"])
    seen["run"] = [done.exit_code, done.stdout.decode(), done.stderr.decode()]
    seen["listed"] = [w.name for w in vd.list_workspaces()]
    try:
        vd.get_workspace(f"no-{name}")
    except errors.NotFoundError as exc:
        seen["not_found"] = str(exc)
    seen["down"] = pb.WorkspaceState.Name(vd.down(name).state)
print(json.dumps(seen))
