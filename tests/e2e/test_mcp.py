"""`vendetta mcp` driven by the official MCP SDK's client, against a real coordinator and
a Docker workspace: over stdio (the local user; --scope and --workspace narrow it) and
over streamable HTTP behind TLS with the coordinator's tokens (each call made with the
caller's token, so the coordinator holds it to its scope). It lists its tools, runs a
command inside, writes and reads a file, reads logs and ports, is refused outside its
scope, and every call lands in the workspace's events with who made it.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import httpx
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from common.paths import coordinator_socket
from tests.conftest import TEST_IMAGE
from tests.support.cli import BIN, Env, cli_env
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import coordinator_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

MINE, OTHER = f"mcp-{os.getpid()}", f"mcp-other-{os.getpid()}"
TOOLS = {
    "list_workspaces",
    "create_workspace",
    "up_workspace",
    "down_workspace",
    "run_command",
    "read_logs",
    "list_ports",
    "read_file",
    "write_file",
}


@dataclass
class World:
    env: Env
    cert: Path
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with cli_env(prefix="vd-mcp-") as e:
        e.cli("server", "start", "--listen", "127.0.0.1:0")
        cfg = e.home / "proj" / ".vendetta" / "config.yaml"
        cfg.parent.mkdir(parents=True)
        cfg.write_text(
            f"name: mcp\nprovider: docker\ndocker:\n  image: {TEST_IMAGE}\n  command: "
            "[/bin/sh, -c, 'echo started-$((20+3)); while :; do sleep 1; done']\n"
            "agents: {rules: [.vendetta/AGENTS.md.tmpl]}\n"
        )
        (cfg.parent / "AGENTS.md.tmpl").write_text("You are in {{ workspace }}: {{ mcp }}\n")
        for name in (MINE, OTHER):
            e.cli("workspace", "create", name, "--config", str(cfg), "--no-source")
            e.cli("workspace", "up", name)

        def token(*args: str) -> str:
            return e.cli("token", "create", *args).stdout.strip()

        tokens = {
            "limited": token("--name", "agent", "--scope", "operate", "--workspace", MINE),
            "read": token("--name", "watcher"),
        }
        home = Path(e.env["VENDETTA_HOME"])
        yield World(e, home / "tls" / "cert.pem", tokens)


@asynccontextmanager
async def events(world: World, name: str) -> AsyncIterator[list[str]]:
    """The workspace's event messages while the block runs (over the local socket)."""
    seen: list[str] = []
    sock = coordinator_socket(Path(world.env.env["VENDETTA_HOME"]))
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        call = stub.WatchWorkspace(pb.WatchWorkspaceRequest(name=name))
        first = asyncio.Event()

        async def read() -> None:
            async for event in call:
                first.set()
                seen.append(event.message)

        task = asyncio.create_task(read())
        await asyncio.wait_for(first.wait(), 30)  # the snapshot: subscribed
        try:
            yield seen
        finally:
            await asyncio.sleep(0.5)  # what was published reaches us first
            call.cancel()
            task.cancel()


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def _call(session: ClientSession, tool: str, **args: Any) -> Any:
    result = await session.call_tool(tool, args)
    assert not result.isError, _text(result)
    return (
        json.loads(_text(result)) if result.structuredContent is None else result.structuredContent
    )


async def _refused(session: ClientSession, tool: str, **args: Any) -> str:
    result = await session.call_tool(tool, args)
    assert result.isError, _text(result)
    return _text(result)


async def _drive(session: ClientSession, who: str) -> None:
    """What both transports must do on MINE."""
    await session.initialize()
    assert {t.name for t in (await session.list_tools()).tools} >= TOOLS
    listed = await _call(session, "list_workspaces")
    rows = listed["result"] if isinstance(listed, dict) and "result" in listed else listed
    assert MINE in {w["name"] for w in rows}
    ran = await _call(session, "run_command", name=MINE, command=["sh", "-c", "echo in-$((6*7))"])
    assert ran["exit_code"] == 0 and ran["stdout"] == "in-42\n", ran
    capped = await _call(
        session,
        "run_command",
        name=MINE,
        command=["sh", "-c", "yes | head -c 5000"],
        max_output_bytes=100,
    )
    assert len(capped["stdout"]) == 100 and capped["truncated"], capped
    slow = await _call(
        session, "run_command", name=MINE, command=["sleep", "30"], timeout_seconds=1
    )
    assert slow["timed_out"], slow
    wrote = await _call(
        session, "write_file", name=MINE, path="notes/a.txt", content=f"hello from {who}\n"
    )
    assert wrote["path"].endswith("/notes/a.txt"), wrote
    read = await _call(session, "read_file", name=MINE, path="notes/a.txt")
    text = read["result"] if isinstance(read, dict) else read
    assert text == f"hello from {who}\n"
    assert "relative to the workspace folder" in await _refused(
        session, "read_file", name=MINE, path="../../etc/shadow"
    )
    up = await _call(session, "up_workspace", name=MINE)
    assert up["state"] == "running" and up["agent_rules"], up
    rules = await _call(session, "read_file", name=MINE, path="AGENTS.md")
    rendered = rules["result"] if isinstance(rules, dict) else rules
    assert (
        rendered == f"You are in {MINE}: `vendetta mcp --workspace {MINE}` (stdio), or "
        "`vendetta mcp --http HOST:PORT` with a token\n"
    )
    logs = await _call(session, "read_logs", name=MINE, tail=50)
    lines = logs["result"] if isinstance(logs, dict) else logs
    assert any("started-23" in line for line in lines), lines
    await _call(session, "list_ports", name=MINE)


async def test_over_stdio(world: World) -> None:
    params = StdioServerParameters(command=str(BIN / "vendetta"), args=["mcp"], env=world.env.env)
    async with (
        events(world, MINE) as seen,
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
    ):
        await _drive(session, "stdio")
    recorded = [m for m in seen if m.startswith("mcp: the local user: ")]
    assert any("run_command sh -c" in m for m in recorded), seen
    assert any("write_file notes/a.txt" in m for m in recorded), seen
    assert any("read_file notes/a.txt" in m for m in recorded), seen

    # Narrowed: --scope read may list and read logs, not run; --workspace keeps to MINE.
    narrow = StdioServerParameters(
        command=str(BIN / "vendetta"),
        args=["mcp", "--scope", "read", "--workspace", MINE],
        env=world.env.env,
    )
    async with stdio_client(narrow) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        await _call(session, "read_logs", name=MINE, tail=5)
        out = await _refused(session, "run_command", name=MINE, command=["true"])
        assert "--scope read" in out and "needs operate" in out, out
        out = await _refused(session, "read_logs", name=OTHER)
        assert f"only on workspace(s) {MINE}" in out, out


@asynccontextmanager
async def http_server(world: World) -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "vendetta"),
        "mcp",
        "--http",
        "127.0.0.1:0",
        env=world.env.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        while "MCP over HTTPS at " not in (
            line := (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        ):
            assert line, (await proc.stdout.read()).decode() if proc.stdout else ""
        yield line.split("MCP over HTTPS at ", 1)[1].split()[0]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


def _client(world: World, token: str | None) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=str(world.cert))
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.AsyncClient(headers=headers, verify=context, timeout=httpx.Timeout(120))


async def test_over_https_with_tokens(world: World) -> None:
    async with http_server(world) as url:
        assert url.startswith("https://127.0.0.1:")
        # No token, or a wrong one: 401 before MCP.
        hello = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        for token in (None, "vdt_" + "0" * 12 + "_" + "A" * 43):
            async with _client(world, token) as http:
                answer = await http.post(url, json=hello)
            assert answer.status_code == 401, answer.text
            assert "token" in answer.json()["error"]
        async with events(world, MINE) as seen:
            limited = _client(world, world.tokens["limited"])
            async with (
                limited,
                streamable_http_client(url, http_client=limited) as (r, w, _),
                ClientSession(r, w) as session,
            ):
                await _drive(session, "https")
                out = await _refused(session, "run_command", name=OTHER, command=["true"])
                assert f"only on workspace(s) {MINE}" in out, out
        recorded = [m for m in seen if m.startswith("mcp: token agent: ")]
        assert any("run_command sh -c" in m for m in recorded), seen
        assert any("read_file notes/a.txt" in m for m in recorded), seen
        reader = _client(world, world.tokens["read"])
        async with (
            reader,
            streamable_http_client(url, http_client=reader) as (r, w, _),
            ClientSession(r, w) as session,
        ):
            await session.initialize()
            await _call(session, "read_logs", name=OTHER, tail=5)
            out = await _refused(session, "run_command", name=MINE, command=["true"])
            assert "needs operate" in out, out
