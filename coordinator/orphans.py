"""Orphans: environments on a node that no workspace of this coordinator owns.

They are left by `workspace destroy --force` or `node remove --force` while the node
was away (the record went, the environment stayed), or made by another coordinator
that shares the node's user (one agent, so one set of environments). Each
environment carries the id of the coordinator that made it (LABEL_OWNER), so one
coordinator tells its own leftovers from another's: `node clean` removes its own
(and unlabelled ones, from before the label) unless others are named; `workspace
adopt` takes any one over as a workspace of this coordinator.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc.aio

from common.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError, VendettaError
from common.names import validate_name
from common.paths import write_private
from coordinator.convert import workspace_to_pb
from coordinator.models import Desired, Environment, EnvironmentState, WorkspaceRecord
from vendetta.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:
    from coordinator.nodes import NodeRegistry
    from coordinator.workspaces import WorkspaceService

Ctx = grpc.aio.ServicerContext[Any, Any]


def coordinator_id(home: Path) -> str:
    """A stable id per coordinator home; environments it makes are labelled with it."""
    path = home / "coordinator-id"
    if path.exists():
        found = path.read_text().strip()
        if found:
            return found
    new = uuid.uuid4().hex
    write_private(path, new + "\n")
    return new


def taken_advice(name: str, node: str) -> str:
    """What a create says when the node has an environment for ``name`` that no
    workspace here owns: only commands this coordinator can follow."""
    return (
        f"workspace {name!r} already has an environment on node {node!r} that no workspace "
        f"of this coordinator owns (another coordinator's on the same node user, or left by "
        f"`destroy --force`/`node remove --force`): take it over with `vendetta workspace "
        f"adopt {name} --node {node}`, remove it with `vendetta node clean {node} {name}`, "
        f"or pick another name (`vendetta node status {node}` lists such environments)"
    )


def _orphan_pb(node: str, env: Environment, me: str) -> pb.Orphan:
    return pb.Orphan(
        node=node,
        workspace=env.workspace,
        provider=env.provider,
        state=env.state.value,
        id=env.id,
        image=env.image,
        owner=env.owner,
        mine=env.owner == me,
    )


class OrphanRpcs:
    """ListOrphans, AdoptWorkspace and CleanNode, mixed into the Coordinator servicer."""

    workspaces: WorkspaceService
    nodes: NodeRegistry

    async def _orphans(self, node: str) -> list[Environment]:
        validate_name("node", node)
        client = await self.nodes.get(node).client()
        envs = await client.list_environments()
        # A workspace of this name elsewhere (another node) does not own this one.
        here = {(w.name, w.provider) for w in await self.workspaces.list_all(node)}
        return [e for e in envs if (e.workspace, e.provider) not in here]

    async def ListOrphans(self, request: pb.GetNodeRequest, context: Ctx) -> pb.ListOrphansResponse:
        me = self.workspaces.owner
        envs = await self._orphans(request.name)
        return pb.ListOrphansResponse(orphans=[_orphan_pb(request.name, e, me) for e in envs])

    async def AdoptWorkspace(self, request: pb.AdoptWorkspaceRequest, context: Ctx) -> pb.Workspace:
        name, node = request.name, request.node
        validate_name("workspace", name)
        if not node:
            raise InvalidArgumentError(
                f"say which node has it: `vendetta workspace adopt {name} --node NODE`"
            )
        async with self.workspaces.lock(name):
            existing = await self.workspaces.store.get_workspace(name)
            if existing is not None:
                raise AlreadyExistsError(
                    f"workspace {name!r} already exists here (on node {existing.node!r}): only "
                    f"an environment no workspace owns can be adopted"
                )
            found = [
                e
                for e in await self._orphans(node)
                if e.workspace == name and request.provider in ("", e.provider)
            ]
            if not found:
                raise NotFoundError(
                    f"node {node!r} has no environment of workspace {name!r} without a "
                    f"workspace: `vendetta node status {node}` lists those it has"
                )
            if len(found) > 1:
                kinds = ", ".join(e.provider for e in found)
                raise InvalidArgumentError(
                    f"node {node!r} has environments of {name!r} on several providers "
                    f"({kinds}): say which with --provider"
                )
            env = found[0]
            running = env.state == EnvironmentState.RUNNING
            ws = WorkspaceRecord(
                name=name,
                node=node,
                provider=env.provider,
                image=env.image,
                desired=Desired.RUNNING if running else Desired.STOPPED,
            )
            from coordinator.workspaces import observe  # a cycle at import time otherwise

            observe(ws, env)
            ws.setup_done = True  # it ran before; adopting must not run hooks again
            ws.source.workdir = env.workdir
            ws.source.mode = env.source_mode
            await self.workspaces.store.add_workspace(ws)
            await self.workspaces.save(ws, f"adopted from node {node}")
            return workspace_to_pb(self.workspaces.view(ws))

    async def CleanNode(self, request: pb.CleanNodeRequest, context: Ctx) -> pb.CleanNodeResponse:
        me = self.workspaces.owner
        named = list(dict.fromkeys(request.workspaces))
        for name in named:
            validate_name("workspace", name)
        envs = await self._orphans(request.node)
        if named and (missing := sorted(set(named) - {e.workspace for e in envs})):
            raise NotFoundError(
                f"node {request.node!r} has no environment without a workspace for "
                f"{', '.join(missing)}: `vendetta node status {request.node}` lists them"
            )
        resp = pb.CleanNodeResponse()
        client = await self.nodes.get(request.node).client()
        for env in envs:
            wanted = env.workspace in named if named else env.owner in (me, "")
            orphan = _orphan_pb(request.node, env, me)
            if not wanted:
                resp.kept.append(orphan)
                continue
            if not request.dry_run:
                # Under the workspace's lock: a create of that name meanwhile keeps its own.
                async with self.workspaces.lock(env.workspace):
                    now = await self.workspaces.store.get_workspace(env.workspace)
                    if now is not None and now.node == request.node:
                        resp.kept.append(orphan)
                        continue
                    await client.destroy(env.workspace, env.provider)
                    if now is None:  # its source folder on the node, if it had one
                        with contextlib.suppress(VendettaError):
                            await client.delete_source(env.workspace)
            resp.removed.append(orphan)
        return resp
