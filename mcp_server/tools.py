"""The MCP tools: workspaces (list, create, up, down), a command inside (timeout and
output cap), logs, ports, and files under the workspace folder. Each call is checked
against the scope it needs and recorded in the workspace's events (RecordWorkspaceEvent:
who, what; the event carries when) before it acts."""

from __future__ import annotations

import asyncio
import base64
import posixpath
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcp.server.fastmcp import Context, FastMCP
from mcp.server.transport_security import TransportSecuritySettings

from common import agent_rules
from common.errors import InvalidArgumentError
from common.rpc_errors import mapped_rpc_errors
from mcp_server.backend import Backend
from vendetta.v1 import common_pb2 as cpb
from vendetta.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:
    from mcp_server.backend import Stub

DEFAULT_WORKDIR = "/workspace"  # common.config's default, when the workspace says none
MAX_OUTPUT = 1024 * 1024
MAX_WRITE = 64 * 1024  # a file goes inside in one command line (base64)

INSTRUCTIONS = (
    "vendetta workspaces: remote development environments (containers or VMs) with "
    "services. Use list_workspaces first; run_command runs a program inside one; "
    "read_file/write_file take paths relative to the workspace folder."
)


def _token(ctx: Context[Any, Any, Any]) -> str:
    """The caller's bearer token over HTTP; empty over stdio."""
    request = getattr(ctx.request_context, "request", None)
    header = request.headers.get("authorization", "") if request is not None else ""
    kind, _, token = str(header).strip().partition(" ")
    return token.strip() if kind.lower() == "bearer" else ""


def inside(path: str) -> str:
    """``path`` relative to the workspace folder, never leaving it."""
    norm = posixpath.normpath(path or ".")
    if "\0" in path or norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise InvalidArgumentError(
            f"{path[:200]!r}: give a path relative to the workspace folder, inside it"
        )
    return norm


def _services(ws: pb.Workspace) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "state": cpb.ServiceState.Name(s.state).removeprefix("SERVICE_STATE_").lower(),
            "port": s.port,
            "node_endpoint": s.node_endpoint,
            "local_address": s.local_address,
        }
        for s in ws.services
    ]


def _summary(ws: pb.Workspace) -> dict[str, Any]:
    return {
        "name": ws.name,
        "state": pb.WorkspaceState.Name(ws.state).removeprefix("WORKSPACE_STATE_").lower(),
        "node": ws.node,
        "provider": ws.provider,
        "image": ws.image,
        "detail": ws.detail,
        "workdir": ws.source.workdir or DEFAULT_WORKDIR,
        "services": _services(ws),
    }


def build(
    backend: Backend, transport_security: TransportSecuritySettings | None = None
) -> FastMCP[Any]:
    server: FastMCP[Any] = FastMCP(
        "vendetta", instructions=INSTRUCTIONS, transport_security=transport_security
    )

    async def begin(ctx: Context[Any, Any, Any], scope: str, workspace: str, what: str) -> Stub:
        """The scope check, then the record of the call, then the stub to act with."""
        backend.check(scope, workspace)
        stub = await backend.stub(_token(ctx))
        if workspace:
            with mapped_rpc_errors():
                await stub.RecordWorkspaceEvent(
                    pb.RecordWorkspaceEventRequest(name=workspace, source="mcp", message=what),
                    timeout=30,
                )
        return stub

    @server.tool()
    async def list_workspaces(ctx: Context[Any, Any, Any]) -> list[dict[str, Any]]:
        """The workspaces: name, state, node, image, workdir and services."""
        stub = await begin(ctx, "read", "", "list_workspaces")
        with mapped_rpc_errors():
            got = await stub.ListWorkspaces(pb.ListWorkspacesRequest(), timeout=30)
        return [_summary(ws) for ws in got.workspaces]

    @server.tool()
    async def create_workspace(
        ctx: Context[Any, Any, Any], name: str, config_yaml: str
    ) -> dict[str, Any]:
        """Create a workspace from a project config (.vendetta/config.yaml text), with no
        source (clone code inside with run_command)."""
        stub = await begin(ctx, "operate", "", "create_workspace")
        request = pb.CreateWorkspaceRequest(name=name, config_yaml=config_yaml)
        with mapped_rpc_errors():
            ws = await stub.CreateWorkspace(request, timeout=900)
        await begin(ctx, "operate", name, "create_workspace: created")
        return _summary(ws)

    @server.tool()
    async def up_workspace(ctx: Context[Any, Any, Any], name: str) -> dict[str, Any]:
        """Start a workspace and its services; waits until they are up. The project's
        agent rule files (config agents.rules) are written into its workdir."""
        stub = await begin(ctx, "operate", name, "up_workspace")
        with mapped_rpc_errors():
            got = await stub.GetWorkspace(pb.GetWorkspaceRequest(name=name), timeout=30)
        # As `workspace up`: read where this server runs, checked before anything starts.
        rules = agent_rules.read_rules(Path(got.config_path)) if got.config_path else []
        with mapped_rpc_errors():
            ws = await stub.UpWorkspace(pb.WorkspaceRequest(name=name), timeout=900)
        return {**_summary(ws), "agent_rules": await agent_rules.install(stub, ws, rules)}

    @server.tool()
    async def down_workspace(ctx: Context[Any, Any, Any], name: str) -> dict[str, Any]:
        """Stop a workspace (its files stay)."""
        stub = await begin(ctx, "operate", name, "down_workspace")
        with mapped_rpc_errors():
            ws = await stub.DownWorkspace(pb.WorkspaceRequest(name=name), timeout=900)
        return _summary(ws)

    @server.tool()
    async def run_command(
        ctx: Context[Any, Any, Any],
        name: str,
        command: list[str],
        timeout_seconds: float = 120,
        max_output_bytes: int = 65536,
    ) -> dict[str, Any]:
        """Run a program inside the workspace (argv: e.g. ["sh", "-c", "make test"]), in
        its workdir. Output beyond max_output_bytes (each of stdout, stderr) is cut;
        after timeout_seconds the call ends with timed_out true."""
        if not command:
            raise InvalidArgumentError("command: give the program and its arguments")
        stub = await begin(ctx, "operate", name, f"run_command {shlex.join(command)[:300]}")
        return await _run(stub, name, command, "", timeout_seconds, max_output_bytes)

    @server.tool()
    async def read_logs(
        ctx: Context[Any, Any, Any], name: str, service: str = "", tail: int = 100
    ) -> list[str]:
        """The last lines of the workspace's logs (one service's, or all)."""
        stub = await begin(ctx, "read", name, f"read_logs {service}".strip())
        request = pb.StreamLogsRequest(name=name, tail=max(1, min(tail, 5000)), service=service)
        lines: list[str] = []
        with mapped_rpc_errors():
            async for batch in stub.StreamLogs(request, timeout=60):
                lines += [f"{ln.service or '-'} | {ln.text}" for ln in batch.lines]
        return lines

    @server.tool()
    async def list_ports(ctx: Context[Any, Any, Any], name: str) -> list[dict[str, Any]]:
        """The workspace's services with their ports: inside, on the node, and where the
        coordinator's machine forwards them."""
        stub = await begin(ctx, "read", name, "list_ports")
        with mapped_rpc_errors():
            ws = await stub.GetWorkspace(pb.GetWorkspaceRequest(name=name), timeout=30)
        return [s for s in _services(ws) if s["port"]]

    @server.tool()
    async def read_file(
        ctx: Context[Any, Any, Any], name: str, path: str, max_bytes: int = 262144
    ) -> str:
        """A text file under the workspace folder (path relative to it)."""
        rel = inside(path)
        stub = await begin(ctx, "operate", name, f"read_file {rel}")
        workdir = await _workdir(stub, name)
        script = 'cd -- "$1" && exec cat -- "$2"'
        done = await _run(stub, name, ["sh", "-c", script, "sh", workdir, rel], "", 60, max_bytes)
        if done["exit_code"] != 0:
            raise InvalidArgumentError(f"cannot read {rel}: {done['stderr'].strip()}")
        return str(done["stdout"])

    @server.tool()
    async def write_file(
        ctx: Context[Any, Any, Any], name: str, path: str, content: str
    ) -> dict[str, Any]:
        """Write a text file under the workspace folder (path relative to it; folders
        are made), replacing what was there."""
        rel = inside(path)
        data = content.encode()
        if len(data) > MAX_WRITE:
            raise InvalidArgumentError(f"content is {len(data)} bytes; at most {MAX_WRITE}")
        stub = await begin(ctx, "operate", name, f"write_file {rel} ({len(data)} bytes)")
        workdir = await _workdir(stub, name)
        script = (
            'mkdir -p -- "$1" && cd -- "$1" && mkdir -p -- "$(dirname -- "$2")" && '
            'printf %s "$3" | base64 -d > "$2"'
        )
        argv = ["sh", "-c", script, "sh", workdir, rel, base64.b64encode(data).decode()]
        done = await _run(stub, name, argv, "", 60, 4096)
        if done["exit_code"] != 0:
            raise InvalidArgumentError(f"cannot write {rel}: {done['stderr'].strip()}")
        return {"path": posixpath.join(workdir, rel), "bytes": len(data)}

    return server


async def _workdir(stub: Stub, name: str) -> str:
    with mapped_rpc_errors():
        ws = await stub.GetWorkspace(pb.GetWorkspaceRequest(name=name), timeout=30)
    return ws.source.workdir or DEFAULT_WORKDIR


async def _run(
    stub: Stub, name: str, argv: list[str], workdir: str, timeout: float, cap: int
) -> dict[str, Any]:
    cap = max(0, min(cap, MAX_OUTPUT))
    out, err = bytearray(), bytearray()
    code, cut, timed_out = -1, False, False
    call = stub.ExecWorkspace(pb.ExecWorkspaceRequest(name=name, argv=argv, workdir=workdir))
    try:
        with mapped_rpc_errors():
            async with asyncio.timeout(max(1.0, min(timeout, 3600.0))):
                async for msg in call:
                    kind = msg.WhichOneof("output")
                    if kind == "exit_code":
                        code = msg.exit_code
                        continue
                    buf, data = (out, msg.stdout) if kind == "stdout" else (err, msg.stderr)
                    room = cap - len(buf)
                    cut = cut or len(data) > room
                    buf += data[: max(0, room)]
    except TimeoutError:
        timed_out = True
        call.cancel()
    return {
        "exit_code": code,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
        "truncated": cut,
        "timed_out": timed_out,
    }
