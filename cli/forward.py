"""`vendetta workspace forward NAME [PORT|LOCAL:PORT|SERVICE ...]`: ports inside a
workspace on this machine, for as long as the command runs.

The coordinator forwards service ports to its own machine (coordinator/ports.py);
a CLI on another machine (VENDETTA_URL) gets them here instead: each connection
to a local port becomes one Dial stream through the coordinator to the
workspace's agent, which connects from inside (as `ssh -L` through NAME.vendetta
does). Works the same against the local socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

import grpc
import grpc.aio
import typer

from cli.client import coordinator
from cli.output import err, out
from cli.runner import fail, run
from common.errors import InvalidArgumentError
from common.rpc_errors import from_rpc_error
from vendetta.v1 import common_pb2, coordinator_pb2_grpc
from vendetta.v1 import coordinator_pb2 as pb

CHUNK = 256 * 1024
BACKLOG = 8


def _pairs(specs: list[str], ws: pb.Workspace) -> list[tuple[int, int, str]]:
    """(local port, port inside, label) for each spec; none given: every service's."""
    services = {s.name: s.port for s in ws.services if s.port}
    if not specs:
        if not services:
            fail(InvalidArgumentError(f"workspace {ws.name} has no service ports: give PORT"))
        specs = sorted(services)
    pairs: list[tuple[int, int, str]] = []
    for spec in specs:
        local, _, inside = spec.rpartition(":")
        if inside in services:
            port = services[inside]
        elif inside.isdigit() and 0 < int(inside) < 65536:
            port = int(inside)
        else:
            fail(InvalidArgumentError(f"{spec[:40]!r}: give PORT, LOCAL:PORT or a service name"))
        if local and not (local.isdigit() and 0 < int(local) < 65536):
            fail(InvalidArgumentError(f"{spec[:40]!r}: the local port must be 1-65535"))
        pairs.append((int(local) if local else port, port, inside))
    return pairs


async def _relay(
    stub: coordinator_pb2_grpc.CoordinatorAsyncStub,
    workspace: str,
    port: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    inputs: asyncio.Queue[common_pb2.DialInput | None] = asyncio.Queue(maxsize=BACKLOG)
    start = common_pb2.DialStart(workspace=workspace, host="127.0.0.1", port=port)

    async def requests() -> AsyncIterator[common_pb2.DialInput]:
        yield common_pb2.DialInput(start=start)
        while (msg := await inputs.get()) is not None:
            yield msg

    async def upstream() -> None:
        while data := await reader.read(CHUNK):
            await inputs.put(common_pb2.DialInput(data=data))
        await inputs.put(common_pb2.DialInput(eof=True))

    call = stub.Dial(requests())
    up: asyncio.Task[None] | None = None
    try:
        async for o in call:
            kind = o.WhichOneof("output")
            if kind == "connected":
                up = asyncio.create_task(upstream())
            elif kind == "data":
                writer.write(o.data)
                await writer.drain()
            elif kind == "eof" and writer.can_write_eof():
                writer.write_eof()
    except grpc.aio.AioRpcError as exc:
        err.print(f"[yellow]warning:[/yellow] {from_rpc_error(exc)}", markup=True)
    except OSError:
        pass  # the local client went
    finally:
        if up is not None:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
        call.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(name: str, specs: list[str], bind: str) -> None:
    async with coordinator() as c:
        ws = await c.GetWorkspace(pb.GetWorkspaceRequest(name=name))
        servers = []
        for local, inside, label in _pairs(specs, ws):

            async def accept(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = inside
            ) -> None:
                await _relay(c, name, port, r, w)

            try:
                servers.append(await asyncio.start_server(accept, bind, local))
            except OSError as exc:
                fail(
                    InvalidArgumentError(
                        f"cannot listen on {bind}:{local} ({exc.strerror}): give another "
                        f"local port, LOCAL:{inside}"
                    )
                )
            where = f"{bind}:{local}"
            out.print(f"{label}: {where} -> port {inside} inside {name}")
        out.print("forwarding; Ctrl-C stops")
        try:
            await asyncio.gather(*(s.serve_forever() for s in servers))
        finally:
            for s in servers:
                s.close()


def forward(
    name: Annotated[str, typer.Argument(help="Workspace name.")],
    ports: Annotated[
        list[str] | None,
        typer.Argument(help="PORT, LOCAL:PORT or a service name (default: every service's)."),
    ] = None,
    bind: Annotated[str, typer.Option(help="Local address to listen on.")] = "127.0.0.1",
) -> None:
    """Forward ports inside a workspace to this machine while this runs (also against a
    coordinator elsewhere, VENDETTA_URL); Ctrl-C stops."""
    run(_serve(name, list(ports or []), bind))
