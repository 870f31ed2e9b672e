"""`vendetta server start|stop|status`."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from cli import checks
from cli.output import ago, as_dict, out, print_json
from cli.runner import fail, run
from common.errors import FailedPreconditionError, VendettaError
from common.paths import coordinator_log, vendetta_home
from coordinator import daemon
from vendetta.v1 import coordinator_pb2 as pb

app = typer.Typer(help="Run the coordinator (the service the CLI talks to).", no_args_is_help=True)

DockerHost = Annotated[
    str | None, typer.Option(help="Docker engine URL for the local node.", envvar="DOCKER_HOST")
]


@app.command()
def start(
    foreground: Annotated[bool, typer.Option("--foreground", help="Run in this terminal.")] = False,
    docker_host: DockerHost = None,
    node_grace: Annotated[
        float | None,
        typer.Option(
            help="Seconds without an answer before a node is disconnected (default 15; "
            "`node add --grace` sets one node's).",
            envvar="VENDETTA_NODE_GRACE",
            callback=checks.node_grace,
        ),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            help="Also serve over TLS on HOST:PORT for other machines, with tokens "
            "(`vendetta token create`); 127.0.0.1:PORT for this machine only. Default: none.",
            show_default=False,
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="PEM certificate for --listen (default: a self-signed one, kept)."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="Its PEM key, mode 0600.", show_default=False)
    ] = None,
) -> None:
    """Start the coordinator (in the background unless --foreground)."""
    home = vendetta_home().absolute()
    args = ["--docker-host", docker_host] if docker_host else []
    try:
        config = daemon.listen_config(listen, tls_cert, tls_key)
    except VendettaError as exc:
        fail(exc)
    if foreground:
        out.print(f"coordinator: serving on {home / 'coordinator.sock'} (Ctrl-C stops)")
        if config is not None:
            out.print("  and over TLS: `vendetta server status` shows its address and fingerprint")
        from coordinator.server import serve  # the whole coordinator: only when serving

        asyncio.run(serve(home, args, node_grace, config))
        return
    if node_grace is not None:
        args += ["--node-grace", str(node_grace)]
    info, started = run(daemon.start(home, args + daemon.listen_args(config)))
    verb = "started" if started else "already running"
    out.print(f"coordinator {verb}: pid {info.pid}, socket {info.socket_path}")
    out.print(f"  state {info.state_path}, log {coordinator_log(home)}")
    if info.listen:
        _print_listener(info)
    wanted = daemon.listen_args(config)[1:2]
    if wanted and not started and not _same_address(info.listen, wanted[0]):
        now = f"with its listener on {info.listen}" if info.listen else "without --listen"
        fail(
            FailedPreconditionError(
                f"the coordinator already runs {now}: `vendetta server stop`, then start it "
                f"again with --listen {wanted[0]}"
            )
        )


def _same_address(running: str, wanted: str) -> bool:
    """Whether the running listener is the one asked for (port 0: any port)."""
    host, _, port = running.rpartition(":")
    want_host, _, want_port = wanted.rpartition(":")
    return bool(running) and host == want_host and want_port in ("0", port)


def _print_listener(info: pb.ServerInfo) -> None:
    host = info.listen.rpartition(":")[0].strip("[]")
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    reach = "this machine only" if local else "reachable from other machines: see the README"
    # emoji=False: rich would turn a fingerprint's ":CD:" into an emoji
    out.print(f"  TLS listener {info.listen}, {reach} (tokens: `vendetta token create`)")
    out.print(f"  certificate SHA-256 {info.tls_fingerprint}", emoji=False)
    out.print(
        f"  clients: VENDETTA_URL=vendetta://{info.listen} "
        f"VENDETTA_TLS_FINGERPRINT={info.tls_fingerprint.replace(':', '')} VENDETTA_TOKEN=...",
        emoji=False,
    )


@app.command()
def stop() -> None:
    """Stop the background coordinator (workspaces keep running on their nodes)."""
    stopped = run(daemon.stop(vendetta_home().absolute()))
    out.print("coordinator stopped" if stopped else "coordinator was not running")


@app.command()
def status(json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Whether the coordinator runs, and where."""
    home = vendetta_home().absolute()
    info = run(daemon.probe(home))
    if json_:
        print_json({"running": info is not None, **(as_dict(info) if info else {})})
    elif info is None:
        out.print(
            f"coordinator is not running (home {home}); start it with `vendetta server start`"
        )
    else:
        out.print(
            f"coordinator is running: pid {info.pid}, version {info.version}, "
            f"up since {ago(info.started_unix_nano)}\n  socket {info.socket_path}\n"
            f"  state {info.state_path}\n  log {coordinator_log(home)}"
        )
        if info.listen:
            _print_listener(info)
    if info is None:
        raise typer.Exit(3)
