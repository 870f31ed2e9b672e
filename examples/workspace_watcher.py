"""A small service on vendetta's API: it watches every workspace and reacts.

- A workspace that comes up (RUNNING) gets a command run inside (default: uname -a),
  whose output is printed: e.g. warm a cache, seed a database, tell a chat channel.
- A service that fails or turns unhealthy gets the end of its log printed.

It needs only the client package (pip install vendetta-client, or the wheel built from
this repository: docs/api.md). Against the demo, on the coordinator's machine (its
local socket, no token):

    python examples/workspace_watcher.py &
    make demo

From another machine, over the TLS listener with a token of scope operate (read is
enough with --run ''):

    VENDETTA_URL=vendetta://build1:7443 VENDETTA_TOKEN=vdt_... \
    VENDETTA_TLS_FINGERPRINT=AB:CD:... python examples/workspace_watcher.py

--once exits after the first reaction (tests use it).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys

from vendetta_client import AsyncClient, pb, pb_common
from vendetta_client.errors import VendettaError

TROUBLE = {"SERVICE_STATE_FAILED", "SERVICE_STATE_UNHEALTHY"}


async def on_running(vd: AsyncClient, name: str, argv: list[str]) -> None:
    result = await vd.run(name, argv, timeout=60)
    text = result.stdout.decode(errors="replace").strip()
    print(f"{name}: up; `{shlex.join(argv)}` exited {result.exit_code}: {text}", flush=True)


async def on_trouble(vd: AsyncClient, name: str, service: pb_common.ServiceStatus) -> None:
    print(f"{name}: service {service.name} is in trouble: {service.detail}", flush=True)
    async with vd.logs(name, service=service.name, tail=10) as lines:
        async for line in lines:
            print(f"  {service.name} | {line.text}", flush=True)


async def watch(argv: list[str], once: bool) -> None:
    async with await AsyncClient.connect() as vd:
        print(f"watching the workspaces of {vd.settings.endpoint.address}", flush=True)
        # The stream opens with every workspace as it is (no reaction to those), then
        # sends each change.
        states: dict[str, int] = {}
        troubled: set[tuple[str, str]] = set()
        async with vd.watch() as events:
            async for event in events:
                ws = event.workspace
                was, states[ws.name] = states.get(ws.name), ws.state
                if was != ws.state:
                    print(f"{ws.name}: {pb.WorkspaceState.Name(ws.state)}", flush=True)
                reacted = False
                came_up = ws.state == pb.WORKSPACE_STATE_RUNNING and was not in (None, ws.state)
                if came_up and argv:
                    await on_running(vd, ws.name, argv)
                    reacted = True
                for service in ws.services:
                    key = (ws.name, service.name)
                    if pb_common.ServiceState.Name(service.state) not in TROUBLE:
                        troubled.discard(key)
                    elif key not in troubled:
                        troubled.add(key)
                        await on_trouble(vd, ws.name, service)
                        reacted = True
                if reacted and once:
                    return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="uname -a", help="command run in a workspace that is up")
    parser.add_argument("--once", action="store_true", help="exit after the first reaction")
    args = parser.parse_args()
    try:
        asyncio.run(watch(shlex.split(args.run), args.once))
    except VendettaError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
