"""`vendetta mcp`: the Model Context Protocol server for AI coding agents (mcp_server/).

Over stdio (the default) it is the local user's: it reaches the coordinator as the CLI
does, and --scope / --workspace narrow what the agent may do. With --http HOST:PORT it
serves streamable HTTP over TLS (the coordinator's certificate and key, or
--tls-cert/--tls-key) and every request needs a token of the coordinator's: each call
is made with that token, so the coordinator holds it to its scope.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.client import coordinator
from cli.runner import fail, run
from common.errors import InvalidArgumentError
from common.paths import vendetta_home
from vendetta.v1 import coordinator_pb2 as pb


def mcp(
    http: Annotated[
        str,
        typer.Option(
            "--http",
            help="Serve MCP over HTTPS at HOST:PORT (tokens of `vendetta token create`) "
            "instead of stdio.",
            show_default=False,
        ),
    ] = "",
    scope: Annotated[
        str,
        typer.Option(help="stdio: what the agent may do: read or operate."),
    ] = "operate",
    workspace: Annotated[
        list[str] | None,
        typer.Option("--workspace", help="stdio: only these workspaces (repeatable)."),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="--http: certificate (default: the coordinator's).", show_default=False),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(help="--http: its key (default: the coordinator's).", show_default=False),
    ] = None,
) -> None:
    """Run an MCP server for AI coding agents (stdio, or HTTPS with --http)."""
    if scope not in ("read", "operate"):
        fail(InvalidArgumentError(f"--scope {scope[:40]!r}: give read or operate"))
    if not http:
        from mcp_server.backend import LocalBackend
        from mcp_server.tools import build

        server = build(LocalBackend(scope, tuple(workspace or ())))
        run(server.run_stdio_async())
        return
    from mcp_server import http as mcp_http

    try:
        host, port = mcp_http.parse_address(http)
    except InvalidArgumentError as exc:
        fail(exc)
    folder = vendetta_home() / "tls"
    cert, key = tls_cert or folder / "cert.pem", tls_key or folder / "key.pem"
    for path in (cert, key):
        if not path.is_file():
            fail(
                InvalidArgumentError(
                    f"{path}: no such file; give --tls-cert and --tls-key, or start the "
                    "coordinator with `vendetta server start --listen HOST:PORT` first"
                )
            )

    async def serve() -> None:
        from mcp_server.backend import TokenBackend

        async with coordinator() as stub:
            info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        backend = TokenBackend(mcp_http.coordinator_target(info), info.tls_fingerprint)

        def ready(bound: int) -> None:
            shown = f"[{host}]" if ":" in host else host
            typer.echo(
                f"MCP over HTTPS at https://{shown}:{bound}/mcp (Authorization: Bearer TOKEN)",
                err=True,
            )

        try:
            await mcp_http.serve(host, port, cert, key, backend, ready)
        finally:
            await backend.close()

    run(serve())
