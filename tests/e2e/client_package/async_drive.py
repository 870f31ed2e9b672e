"""Run by the fresh venv's interpreter: the AsyncClient, given the target, token and pin
as arguments (the environment is empty), ups the workspace again, follows its logs and
events, runs a command, downs and destroys it; and the refusals as the error tree."""

import asyncio
import json
import sys

from vendetta_client import AsyncClient, errors, pb


async def main(url: str, token: str, read_token: str, pin: str, name: str) -> None:
    seen: dict[str, object] = {}
    async with await AsyncClient.connect(url, token=token, fingerprint=pin) as vd:
        events: list[str] = []

        async def watch() -> None:
            async with vd.watch(name) as stream:
                async for event in stream:
                    events.append(pb.WorkspaceState.Name(event.workspace.state))

        watcher = asyncio.create_task(watch())
        seen["up"] = pb.WorkspaceState.Name((await vd.up(name)).state)
        async with vd.logs(name, follow=True, tail=1) as lines:
            async for line in lines:
                if line.text.startswith("tick"):
                    seen["log"] = line.text
                    break
        done = await vd.run(name, ["sh", "-c", "cat /etc/hostname >/dev/null; echo async-ok"])
        seen["run"] = [done.exit_code, done.stdout.decode()]
        seen["down"] = pb.WorkspaceState.Name((await vd.down(name)).state)
        await asyncio.sleep(0)  # the events already sent reach the watcher first
        for _ in range(100):
            if "WORKSPACE_STATE_STOPPED" in events:
                break
            await asyncio.sleep(0.1)
        watcher.cancel()
        seen["events"] = events
    async with await AsyncClient.connect(url, token=read_token, fingerprint=pin) as reader:
        seen["read_sees"] = [w.name for w in await reader.list_workspaces()]
        try:
            await reader.destroy(name)
        except errors.PermissionDeniedError as exc:
            seen["read_refused"] = [type(exc).__name__, str(exc)]
    async with await AsyncClient.connect(url, token="", fingerprint=pin) as anonymous:
        try:
            await anonymous.list_workspaces()
        except errors.UnauthenticatedError as exc:
            seen["no_token"] = str(exc)
    try:
        await AsyncClient.connect(url, token=token, fingerprint="AB" * 32)
    except errors.FailedPreconditionError as exc:
        seen["wrong_pin"] = str(exc)
    async with await AsyncClient.connect(url, token=token, fingerprint=pin) as vd:
        await vd.destroy(name)
        seen["after_destroy"] = [w.name for w in await vd.list_workspaces()]
    print(json.dumps(seen))


asyncio.run(main(*sys.argv[1:6]))
