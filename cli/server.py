"""`vendetta server start|stop|status`."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from cli import checks
from cli.output import ago, as_dict, out, print_json
from cli.runner import run
from common.paths import coordinator_log, vendetta_home
from coordinator import daemon

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
) -> None:
    """Start the coordinator (in the background unless --foreground)."""
    home = vendetta_home().absolute()
    args = ["--docker-host", docker_host] if docker_host else []
    if foreground:
        out.print(f"coordinator: serving on {home / 'coordinator.sock'} (Ctrl-C stops)")
        from coordinator.server import serve  # the whole coordinator: only when serving

        asyncio.run(serve(home, args, node_grace))
        return
    if node_grace is not None:
        args += ["--node-grace", str(node_grace)]
    info, started = run(daemon.start(home, args))
    verb = "started" if started else "already running"
    out.print(f"coordinator {verb}: pid {info.pid}, socket {info.socket_path}")
    out.print(f"  state {info.state_path}, log {coordinator_log(home)}")


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
    if info is None:
        raise typer.Exit(3)
