"""`vendetta cluster status`: the coordinator, every node and the workspaces, on one screen."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.client import coordinator
from cli.node import latency
from cli.output import as_dict, enum_name, out, print_json, styled
from cli.runner import run
from vendetta.v1 import coordinator_pb2 as pb

app = typer.Typer(help="The whole cluster at a glance.", no_args_is_help=True)


def _ws_state(ws: pb.Workspace) -> str:
    return enum_name(pb.WorkspaceState.Name(ws.state), "WORKSPACE_STATE_")


def _node_state(node: pb.Node) -> str:
    return enum_name(pb.NodeState.Name(node.state), "NODE_STATE_")


def summary(
    info: pb.ServerInfo, nodes: list[pb.Node], workspaces: list[pb.Workspace]
) -> dict[str, Any]:
    """What `cluster status --json` prints: plain data, counts per state."""
    per_node: dict[str, Counter[str]] = {n.name: Counter() for n in nodes}
    for ws in workspaces:
        per_node.setdefault(ws.node, Counter())[_ws_state(ws)] += 1
    return {
        "coordinator": as_dict(info),
        "nodes": [
            {
                "name": n.name,
                "state": _node_state(n),
                "latency_seconds": n.latency_seconds,
                "agent_version": n.agent_version,
                "providers": {p.name: p.ready for p in n.providers},
                "last_error": n.last_error,
                "workspaces": dict(sorted(per_node[n.name].items())),
            }
            for n in nodes
        ],
        "workspaces": dict(sorted(Counter(_ws_state(w) for w in workspaces).items())),
    }


@app.command()
def status(json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The coordinator, each node (state, latency, agent, providers) and workspace counts."""

    async def go() -> tuple[pb.ServerInfo, pb.ListNodesResponse, pb.ListWorkspacesResponse]:
        async with coordinator() as c:
            info = await c.GetServerInfo(pb.GetServerInfoRequest())
            nodes = await c.ListNodes(pb.ListNodesRequest())
            workspaces = await c.ListWorkspaces(pb.ListWorkspacesRequest())
            return info, nodes, workspaces

    info, nodes, workspaces = run(go())
    data = summary(info, list(nodes.nodes), list(workspaces.workspaces))
    if json_:
        print_json(data)
        return
    out.print(f"[bold]coordinator[/bold] {info.version}, pid {info.pid}, socket {info.socket_path}")
    table = Table("NODE", "STATE", "LATENCY", "AGENT", "PROVIDERS", "WORKSPACES")
    for n, row in zip(nodes.nodes, data["nodes"], strict=True):
        providers = ", ".join(
            f"{name}" if ready else f"{name} (not ready)"
            for name, ready in row["providers"].items()
        )
        counts = ", ".join(f"{k} {v}" for k, v in row["workspaces"].items())
        table.add_row(
            n.name,
            styled(row["state"]),
            latency(n),
            n.agent_version or "-",
            providers or "-",
            counts or "-",
        )
    out.print(table)
    total = data["workspaces"]
    out.print(
        f"workspaces: {sum(total.values())}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in total.items()) + ")" if total else "")
    )
