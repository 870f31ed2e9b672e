"""`vendetta node add|list|status|test|remove|upgrade`."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import grpc
import grpc.aio
import typer
from rich.table import Table

from cli import checks, node_test, orphans
from cli.client import coordinator, request_id
from cli.output import ago, as_dict, enum_name, err, out, plain, print_json, styled
from cli.runner import run
from common.errors import InvalidArgumentError
from vendetta.v1 import coordinator_pb2 as pb

app = typer.Typer(help="Manage the nodes that run workspaces.", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
NodeName = Annotated[str, typer.Argument(help="The node.", callback=checks.node_name)]


def _state(node: pb.Node) -> str:
    return enum_name(pb.NodeState.Name(node.state), "NODE_STATE_")


def _providers(node: pb.Node) -> str:
    return (
        ", ".join(f"{p.name} ({'ready' if p.ready else 'not ready'})" for p in node.providers)
        or "-"
    )


@app.command()
def add(
    name: Annotated[
        str, typer.Argument(help="Name for the node (a-z, 0-9, -).", callback=checks.node_name)
    ],
    address: Annotated[str, typer.Argument(help="Host name or IP address of the node.")],
    user: Annotated[str, typer.Option(help="SSH user.")] = "",
    port: Annotated[int, typer.Option(help="SSH port.", callback=checks.port)] = 22,
    identity: Annotated[
        Path | None, typer.Option(help="SSH private key (default: ssh-agent and ~/.ssh/id_*).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Trust the host key shown.")] = False,
    password: Annotated[
        bool,
        typer.Option(
            "--password",
            help="If the node refuses your key, ask for the user's password (from the "
            "terminal, else one line of stdin) and install the key with it, once.",
        ),
    ] = False,
    agent_command: Annotated[
        str,
        typer.Option(
            help="How to run the agent on the node, when vendetta is installed there by hand "
            "(default: the coordinator installs its own agent over SSH).",
            envvar="VENDETTA_AGENT_COMMAND",
            callback=checks.command_line,
        ),
    ] = "",
    grace: Annotated[
        float,
        typer.Option(
            help="Seconds without an answer before the node is disconnected "
            "(0: the coordinator's default, 15 unless `server start --node-grace`).",
            callback=checks.grace,
        ),
    ] = 0.0,
    json_: Json = False,
) -> None:
    """Connect to a node over SSH, pin its host key, start its agent, record it."""

    async def go() -> pb.Node:
        async with coordinator() as c:
            scan = await c.ScanHostKey(pb.ScanHostKeyRequest(address=address, port=port))
            err.print(f"Host key of {address}:{port}: {scan.key_type} {scan.fingerprint}")
            if not yes:
                if not sys.stdin.isatty():
                    raise InvalidArgumentError(
                        "cannot ask whether to trust the host key (no terminal): check the "
                        "fingerprint above and pass --yes"
                    )
                if not typer.confirm("Trust this host key and add the node?"):
                    raise typer.Exit(1)
            req = pb.AddNodeRequest(
                name=name,
                address=address,
                user=user,
                port=port,
                identity_file=str(identity.expanduser().absolute()) if identity else "",
                host_key=scan.host_key,
                agent_command=shlex.split(agent_command),
                request_id=request_id(),
                grace_seconds=grace,
            )
            try:
                with err.status(f"Connecting to {name} and starting its agent..."):
                    return await c.AddNode(req)
            except grpc.aio.AioRpcError as exc:
                if not password or exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                    raise
            who = f"{user or getpass.getuser()}@{address}"
            err.print(f"{who} does not accept your key yet: installing it with the password.")
            req.password = _read_password(f"Password for {who}: ")
            req.request_id = request_id()
            with err.status(f"Installing the key on {name} and starting its agent..."):
                node = await c.AddNode(req)
            err.print("Key installed: from now on the node is reached with the key only.")
            return node

    node = run(go())
    if json_:
        print_json(as_dict(node))
        return
    out.print(
        f"node [bold]{node.name}[/bold] added: {styled(_state(node))}, host key "
        f"{node.host_key_fingerprint} pinned, agent {node.agent_version}, "
        f"providers: {_providers(node)}"
    )


def _read_password(prompt: str) -> str:
    # Never from argv (it shows in `ps` and shell history): the terminal, or a pipe.
    tty = sys.stdin.isatty()
    secret = getpass.getpass(prompt) if tty else sys.stdin.readline().rstrip("\r\n")
    if not secret:
        raise InvalidArgumentError("no password given (type it, or pipe it on stdin)")
    return secret


@app.command()
def trust(
    name: NodeName,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Trust the key shown.")] = False,
    json_: Json = False,
) -> None:
    """Pin the host key a node presents now, after you checked it (e.g. a reinstall)."""

    async def go() -> pb.Node:
        async with coordinator() as c:
            node = await c.GetNode(pb.GetNodeRequest(name=name))
            if node.transport != "ssh":
                raise InvalidArgumentError(f"node {name!r} is not reached over SSH: no host key")
            scan = await c.ScanHostKey(pb.ScanHostKeyRequest(address=node.address, port=node.port))
            if scan.fingerprint == node.host_key_fingerprint:
                err.print(
                    f"The host key of {name} is unchanged ({scan.fingerprint}): nothing to do."
                )
                return node
            err.print(f"Pinned host key of {name}:   {node.host_key_fingerprint}")
            err.print(
                f"{node.address}:{node.port} now presents: {scan.key_type} {scan.fingerprint}"
            )
            if not yes:
                if not sys.stdin.isatty():
                    raise InvalidArgumentError(
                        "cannot ask whether to trust the new host key (no terminal): check the "
                        "fingerprint above and pass --yes"
                    )
                if not typer.confirm("Trust the new host key?"):
                    raise typer.Exit(1)
            return await c.TrustNode(pb.TrustNodeRequest(name=name, host_key=scan.host_key))

    node = run(go())
    if json_:
        print_json(as_dict(node))
        return
    out.print(f"node [bold]{name}[/bold]: host key {node.host_key_fingerprint} pinned.")


def latency(node: pb.Node) -> str:
    return f"{node.latency_seconds * 1000:.1f} ms" if node.latency_seconds else "-"


def _watch(json_: bool) -> None:
    """Each node's state now, then every change as it happens, one line each."""

    async def go() -> None:
        async with coordinator() as c:
            async for ev in c.WatchNodes(pb.WatchNodesRequest()):
                if json_:
                    sys.stdout.write(json.dumps(as_dict(ev), sort_keys=True) + "\n")
                else:
                    when = dt.datetime.fromtimestamp(ev.time_unix_nano / 1e9).strftime("%H:%M:%S")
                    note = f"  {plain(ev.message)}" if ev.message else ""
                    out.print(f"{when}  {ev.node.name}  {styled(_state(ev.node))}{note}")
                sys.stdout.flush()

    run(go())


@app.command("list")
def list_(
    json_: Json = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="Print each node's state, then every change as it happens (Ctrl-C stops); "
            "with --json, one JSON object a line.",
        ),
    ] = False,
) -> None:
    """All nodes with their state."""
    if watch:
        _watch(json_)
        return

    async def go() -> pb.ListNodesResponse:
        async with coordinator() as c:
            return await c.ListNodes(pb.ListNodesRequest())

    resp = run(go())
    if json_:
        print_json([as_dict(n) for n in resp.nodes])
        return
    table = Table(
        "NAME", "ADDRESS", "STATE", "AGENT", "PROVIDERS", "WORKSPACES", "LATENCY", "LAST SEEN"
    )
    for n in resp.nodes:
        where = (
            n.address
            if n.transport == "local"
            else f"{n.user + '@' if n.user else ''}{n.address}:{n.port}"
        )
        table.add_row(
            n.name,
            where,
            styled(_state(n)),
            n.agent_version or "-",
            _providers(n),
            str(n.workspaces),
            latency(n),
            ago(n.last_seen_unix_nano),
        )
    out.print(table)


@app.command()
def status(name: NodeName, json_: Json = False) -> None:
    """One node: state, agent, providers and their readiness."""

    async def go() -> tuple[pb.Node, list[pb.Orphan]]:
        async with coordinator() as c:
            node = await c.GetNode(pb.GetNodeRequest(name=name))
            ready = node.state == pb.NODE_STATE_READY
            return node, (await orphans.list_orphans(c, name) if ready else [])

    n, found = run(go())
    if json_:
        print_json(as_dict(n) | {"orphans": [as_dict(o) for o in found]})
        if n.state != pb.NODE_STATE_READY:
            raise typer.Exit(1)
        return
    out.print(f"[bold]{n.name}[/bold]: {styled(_state(n))}")
    out.print(
        f"  address    {n.address}:{n.port} ({n.transport})" + (f" as {n.user}" if n.user else "")
    )
    if n.host_key_fingerprint:
        out.print(f"  host key   {n.host_key_fingerprint} (pinned)")
    out.print(
        f"  agent      {n.agent_version or '-'}, last seen {ago(n.last_seen_unix_nano)}, "
        f"latency {latency(n)}, disconnected after {n.grace_seconds:g} s without an answer"
    )
    out.print(f"  workspaces {n.workspaces}")
    for p in n.providers:
        mark = "[green]ready[/green]" if p.ready else "[red]not ready[/red]"
        version = f" {p.version}" if p.version else ""
        can = f"; capabilities: {', '.join(p.capabilities)}" if p.capabilities else ""
        out.print(
            f"  provider   {p.name}{version}: {mark}"
            + (f" - {plain(p.detail)}" if p.detail else "")
            + can
        )
    if n.last_error:
        out.print(f"  last error {plain(n.last_error)}")
    for line in orphans.orphan_lines(found, name):
        out.print(line)
    if n.state != pb.NODE_STATE_READY:
        raise typer.Exit(1)


@app.command()
def test(name: NodeName, json_: Json = False) -> None:
    """Measure the node (SSH connect, host key, agent version, round trip, tunnel
    throughput) and check each provider; a failing row says what to do (exit 1)."""

    async def go() -> pb.TestNodeResponse:
        async with coordinator() as c:
            return await c.TestNode(pb.GetNodeRequest(name=name), timeout=300)

    node_test.show(run(go()), json_)


@app.command()
def remove(
    name: NodeName,
    force: Annotated[
        bool,
        typer.Option(
            help="Also forget the node's workspaces (their environments stay: add the node "
            "again and `vendetta node clean` removes them)."
        ),
    ] = False,
    purge: Annotated[
        bool,
        typer.Option(
            help="Also remove the agent installed on the node and its state "
            "(~/.local/share/vendetta/agent, ~/.local/state/vendetta-agent); the node is "
            "kept if it cannot be reached."
        ),
    ] = False,
) -> None:
    """Stop a node's agent and forget the node; refused while it has workspaces
    (they are named) unless --force. Environments are left as they are."""

    async def go() -> None:
        async with coordinator() as c:
            await c.RemoveNode(
                pb.RemoveNodeRequest(name=name, force=force, purge=purge, request_id=request_id())
            )

    run(go())
    out.print(f"node {name} removed" + (", its agent and its state deleted" if purge else ""))


@app.command()
def upgrade(
    name: Annotated[str, typer.Argument(help="The node (or --all).")] = "",
    all_: Annotated[bool, typer.Option("--all", help="Every node.")] = False,
    json_: Json = False,
) -> None:
    """Install and start the coordinator's build of the agent on a node now, as a
    reconnect does; its workspaces and their services keep running."""
    if bool(name) == all_:
        raise typer.BadParameter("name one node, or --all")

    async def go() -> pb.UpgradeNodesResponse:
        async with coordinator() as c:
            with err.status("Upgrading the agent..."):
                return await c.UpgradeNodes(pb.UpgradeNodesRequest(names=[name] if name else []))

    resp = run(go())
    for u in [] if json_ else resp.nodes:
        if u.error:
            err.print(f"node {u.name}: {u.old_version or '-'}: not upgraded: {plain(u.error)}")
        elif u.old_version == u.new_version:
            out.print(f"node {u.name}: agent {u.new_version} (already the coordinator's build)")
        else:
            out.print(f"node {u.name}: agent {u.old_version or '-'} -> {u.new_version}")
    if json_:
        print_json([as_dict(u) for u in resp.nodes])
    if any(u.error for u in resp.nodes):
        raise typer.Exit(1)


orphans.register_node(app)  # clean
