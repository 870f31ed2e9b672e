"""Orphans on a node (environments no workspace here owns): listed by `node status`,
removed by `node clean`, taken over by `workspace adopt` (coordinator/orphans.py)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cli import checks
from cli.client import coordinator
from cli.output import as_dict, err, out, plain, print_json, styled
from cli.runner import run
from common.errors import InvalidArgumentError
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import coordinator_pb2_grpc

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def owner_text(o: pb.Orphan) -> str:
    if o.mine:
        return "made here"
    return f"another coordinator's ({o.owner[:12]})" if o.owner else "maker unknown"


def orphan_lines(orphans: list[pb.Orphan], node: str) -> list[str]:
    """What `node status` prints of them (rich markup, names escaped)."""
    if not orphans:
        return []
    lines = [f"  orphans    {len(orphans)} environment(s) no workspace here owns:"]
    for o in orphans:
        lines.append(
            f"    {plain(o.workspace)} ({o.provider}, {styled(o.state)}, {plain(o.image)}; "
            f"{owner_text(o)})"
        )
    lines.append(
        f"    take one over: `vendetta workspace adopt NAME --node {node}`; remove them: "
        f"`vendetta node clean {node}` (another coordinator's only when named)"
    )
    return lines


async def list_orphans(c: coordinator_pb2_grpc.CoordinatorAsyncStub, node: str) -> list[pb.Orphan]:
    resp = await c.ListOrphans(pb.GetNodeRequest(name=node))
    return list(resp.orphans)


def register_node(app: typer.Typer) -> None:
    @app.command()
    def clean(
        name: Annotated[str, typer.Argument(help="The node.", callback=checks.node_name)],
        workspaces: Annotated[
            list[str] | None,
            typer.Argument(
                help="Only these orphans (another coordinator's too); none: every orphan "
                "this coordinator made or that carries no maker.",
                show_default=False,
            ),
        ] = None,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
        json_: Json = False,
    ) -> None:
        """Remove environments on the node that no workspace here owns (orphans left by
        `destroy --force` or `node remove --force`), after listing them."""
        named = [checks.workspace_name(w) for w in workspaces or []]

        async def go() -> pb.CleanNodeResponse:
            async with coordinator() as c:
                req = pb.CleanNodeRequest(node=name, workspaces=named, dry_run=True)
                plan = await c.CleanNode(req)
                if not plan.removed:
                    return plan
                if not yes:
                    if json_ or not sys.stdin.isatty():
                        raise InvalidArgumentError(
                            f"{len(plan.removed)} orphan(s) would be removed from node "
                            f"{name!r} ({', '.join(o.workspace for o in plan.removed)}); "
                            f"there is no terminal to ask: pass --yes"
                        )
                    err.print(f"To remove from node {name}:")
                    for o in plan.removed:
                        err.print(f"  {plain(o.workspace)} ({o.provider}, {o.state}, {o.id[:12]})")
                    if not typer.confirm("Remove these environments and their data?"):
                        raise typer.Exit(1)
                req.dry_run = False
                return await c.CleanNode(req)

        resp = run(go())
        if json_:
            print_json(as_dict(resp))
            return
        if not resp.removed:
            out.print(f"node {name}: no orphans to remove")
        for o in resp.removed:
            out.print(f"removed {plain(o.workspace)} ({o.provider}) from node {name}")
        for o in resp.kept:
            out.print(
                f"kept {plain(o.workspace)} ({o.provider}; {owner_text(o)}): name it to remove it"
            )


def register_workspace(app: typer.Typer) -> None:
    @app.command()
    def adopt(
        name: Annotated[
            str, typer.Argument(help="The orphan's workspace name.", callback=checks.workspace_name)
        ],
        node: Annotated[
            str, typer.Option("--node", help="The node it is on.", callback=checks.node_name)
        ],
        provider: Annotated[
            str, typer.Option(help="Its provider, when several have one of that name.")
        ] = "",
        json_: Json = False,
    ) -> None:
        """Take over an environment on a node that no workspace here owns (see `vendetta
        node status NODE`): it becomes a workspace of this coordinator, as it is (no
        config: no services or hooks are run for it; no source is linked)."""

        async def go() -> pb.Workspace:
            async with coordinator() as c:
                req = pb.AdoptWorkspaceRequest(name=name, node=node, provider=provider)
                return await c.AdoptWorkspace(req)

        ws = run(go())
        if json_:
            print_json(as_dict(ws))
            return
        out.print(f"workspace {plain(ws.name)} adopted from node {plain(ws.node)}")
