"""Coordinator gRPC servicer: thin; converts at the edge and calls the services."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc.aio
from google.protobuf.message import Message

from common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from common.names import validate_name
from common.version import build_id
from coordinator import auth, dial, images, rebuild
from coordinator.convert import (
    node_to_pb,
    service_status_to_pb,
    transfer_to_pb,
    workspace_to_pb,
)
from coordinator.list_cache import WorkspaceListCache
from coordinator.nodes import NodeRegistry
from coordinator.orphans import OrphanRpcs
from coordinator.service_nodes import NodeService
from coordinator.store import Store
from coordinator.workspaces import WorkspaceService
from vendetta.v1 import common_pb2, coordinator_pb2_grpc
from vendetta.v1 import coordinator_pb2 as pb

Ctx = grpc.aio.ServicerContext[Any, Any]
M = TypeVar("M", bound=Message)


def _check_address(address: str, port: int) -> None:
    """A node's address and SSH port, before anything tries them: the resolver and the
    socket raise ValueError (not OSError) for a NUL, a label over 63 characters or a
    port beyond 65535 (found by tests/unit/test_fuzz_rpc.py)."""
    if not 0 <= port <= 65535:
        raise InvalidArgumentError(f"invalid SSH port {port}: use 1-65535 (0: 22)")
    if not address:
        return  # the service says what to give
    try:
        valid = address.isprintable() and " " not in address and bool(address.encode("idna"))
    except UnicodeError:
        valid = False
    if not valid or address.startswith("-") or len(address) > 253:
        raise InvalidArgumentError(
            f"invalid node address {address[:60]!r}: give a host name or an IP address"
        )


class CoordinatorServicer(OrphanRpcs, coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        store: Store,
        nodes: NodeRegistry,
        node_service: NodeService,
        workspaces: WorkspaceService,
        socket_path: str,
        state_path: str,
    ) -> None:
        self.store = store
        self.nodes = nodes
        self.node_service = node_service
        self.workspaces = workspaces
        self.socket_path = socket_path
        self.state_path = state_path
        self.started = time.time_ns()
        self.list_cache = WorkspaceListCache(store, nodes)

    async def _once(
        self, request_id: str, method: str, factory: type[M], run: Callable[[], Awaitable[M]]
    ) -> M:
        """Retries carrying the same request id get the first answer, not a second effect."""
        if request_id:
            seen = await self.store.get_request(request_id)
            if seen is not None:
                if seen[0] != method:
                    raise InvalidArgumentError(
                        f"request id {request_id[:60]!r} was used for {seen[0]}"
                    )
                return factory.FromString(seen[1])
        response = await run()
        if request_id:
            await self.store.put_request(request_id, method, response.SerializeToString())
        return response

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Ctx) -> pb.ServerInfo:
        return pb.ServerInfo(
            version=build_id(),
            socket_path=self.socket_path,
            state_path=self.state_path,
            pid=os.getpid(),
            started_unix_nano=self.started,
        )

    # nodes
    async def ScanHostKey(
        self, request: pb.ScanHostKeyRequest, context: Ctx
    ) -> pb.ScanHostKeyResponse:
        _check_address(request.address, request.port)
        line, fp, kind = await self.node_service.scan(request.address, request.port or 22)
        return pb.ScanHostKeyResponse(host_key=line, fingerprint=fp, key_type=kind)

    async def AddNode(self, request: pb.AddNodeRequest, context: Ctx) -> pb.Node:
        _check_address(request.address, request.port)

        async def run() -> pb.Node:
            conn = await self.node_service.add(
                name=request.name,
                address=request.address,
                user=request.user,
                port=request.port or 22,
                identity_file=request.identity_file,
                host_key=request.host_key,
                agent_command=list(request.agent_command),
                password=request.password,
                grace_seconds=request.grace_seconds,
            )
            return node_to_pb(conn)

        return await self._once(request.request_id, "AddNode", pb.Node, run)

    async def _node_pb(self, name: str) -> pb.Node:
        conn = self.nodes.get(name)
        return node_to_pb(conn, len(await self.store.list_workspaces(name)))

    async def ListNodes(self, request: pb.ListNodesRequest, context: Ctx) -> pb.ListNodesResponse:
        counts = await self.list_cache.counts()
        return pb.ListNodesResponse(
            nodes=[node_to_pb(c, counts.get(c.name, 0)) for c in self.nodes.all()]
        )

    async def GetNode(self, request: pb.GetNodeRequest, context: Ctx) -> pb.Node:
        return await self._node_pb(request.name)

    async def TestNode(self, request: pb.GetNodeRequest, context: Ctx) -> pb.TestNodeResponse:
        r = await self.node_service.test(request.name)
        return pb.TestNodeResponse(
            node=await self._node_pb(request.name),
            ssh_seconds=r.ssh_seconds,
            agent_rtt_seconds=r.rtt_p50,
            checks=[
                pb.NodeCheck(
                    name=c.name,
                    provider=c.provider,
                    ok=c.ok,
                    value=c.value,
                    fix=c.fix,
                    skipped=c.skipped,
                )
                for c in r.checks
            ],
            ok=r.ok,
            rtt_p50_seconds=r.rtt_p50,
            rtt_p99_seconds=r.rtt_p99,
            heartbeats=r.heartbeats,
            throughput_bytes_per_second=r.throughput,
        )

    async def RemoveNode(
        self, request: pb.RemoveNodeRequest, context: Ctx
    ) -> pb.RemoveNodeResponse:
        async def run() -> pb.RemoveNodeResponse:
            await self.node_service.remove(request.name, request.force, request.purge)
            return pb.RemoveNodeResponse()

        return await self._once(request.request_id, "RemoveNode", pb.RemoveNodeResponse, run)

    async def UpgradeNodes(
        self, request: pb.UpgradeNodesRequest, context: Ctx
    ) -> pb.UpgradeNodesResponse:
        done = await self.node_service.upgrade(list(request.names))
        return pb.UpgradeNodesResponse(
            nodes=[
                pb.NodeUpgrade(
                    name=u.name, old_version=u.old_version, new_version=u.new_version, error=u.error
                )
                for u in done
            ]
        )

    async def TrustNode(self, request: pb.TrustNodeRequest, context: Ctx) -> pb.Node:
        await self.node_service.trust(request.name, request.host_key)
        return await self._node_pb(request.name)

    async def WatchNodes(
        self, request: pb.WatchNodesRequest, context: Ctx
    ) -> AsyncIterator[pb.NodeEvent]:
        with self.nodes.events.subscribe() as events:
            counts = await self.store.count_workspaces()
            for conn in self.nodes.all():  # the current picture first, then changes
                yield pb.NodeEvent(
                    node=node_to_pb(conn, counts.get(conn.name, 0)), time_unix_nano=time.time_ns()
                )
            async for ev in events:
                yield pb.NodeEvent(
                    node=node_to_pb(ev.node), message=ev.message, time_unix_nano=ev.time_unix_nano
                )

    # workspaces
    async def CreateWorkspace(
        self, request: pb.CreateWorkspaceRequest, context: Ctx
    ) -> pb.Workspace:
        async def run() -> pb.Workspace:
            ws = await self.workspaces.create(
                request.name,
                request.provider,
                request.node,
                request.config_yaml,
                request.config_path,
                source=request.source,
                branch=request.branch,
                with_changes=request.with_changes,
            )
            return workspace_to_pb(ws)

        return await self._once(request.request_id, "CreateWorkspace", pb.Workspace, run)

    async def UpWorkspace(self, request: pb.WorkspaceRequest, context: Ctx) -> pb.Workspace:
        async def run() -> pb.Workspace:
            ws = await self.workspaces.up(request.name)
            return workspace_to_pb(ws, self.workspaces.service_statuses(ws.name))

        return await self._once(request.request_id, "UpWorkspace", pb.Workspace, run)

    async def RebuildWorkspace(self, request: pb.WorkspaceRequest, context: Ctx) -> pb.Workspace:
        async def run() -> pb.Workspace:
            ws = await rebuild.rebuild(self.workspaces, request.name, request.force)
            return workspace_to_pb(ws, self.workspaces.service_statuses(ws.name))

        return await self._once(request.request_id, "RebuildWorkspace", pb.Workspace, run)

    async def DownWorkspace(self, request: pb.WorkspaceRequest, context: Ctx) -> pb.Workspace:
        async def run() -> pb.Workspace:
            return workspace_to_pb(await self.workspaces.down(request.name))

        return await self._once(request.request_id, "DownWorkspace", pb.Workspace, run)

    async def DestroyWorkspace(
        self, request: pb.WorkspaceRequest, context: Ctx
    ) -> pb.DestroyWorkspaceResponse:
        async def run() -> pb.DestroyWorkspaceResponse:
            kept = await self.workspaces.destroy(request.name, request.force)
            return pb.DestroyWorkspaceResponse(kept=kept)

        return await self._once(
            request.request_id, "DestroyWorkspace", pb.DestroyWorkspaceResponse, run
        )

    async def GetWorkspace(self, request: pb.GetWorkspaceRequest, context: Ctx) -> pb.Workspace:
        ws = await self.workspaces.get(request.name)
        return workspace_to_pb(self.workspaces.view(ws), self.workspaces.service_statuses(ws.name))

    async def ListWorkspaces(
        self, request: pb.ListWorkspacesRequest, context: Ctx
    ) -> pb.ListWorkspacesResponse:
        if request.node:
            self.nodes.get(request.node)

        async def build() -> pb.ListWorkspacesResponse:
            items = await self.workspaces.list_all(request.node)
            return pb.ListWorkspacesResponse(
                workspaces=[workspace_to_pb(self.workspaces.view(ws)) for ws in items]
            )

        return await self.list_cache.get(request.node, build)

    async def WatchWorkspace(
        self, request: pb.WatchWorkspaceRequest, context: Ctx
    ) -> AsyncIterator[pb.WorkspaceEvent]:
        if request.name:
            validate_name("workspace", request.name)
        with self.workspaces.events.subscribe() as events:
            if request.name:
                try:
                    current = [await self.workspaces.get(request.name)]
                except NotFoundError:
                    current = []
            else:
                current = await self.workspaces.list_all()
            for ws in current:
                yield pb.WorkspaceEvent(
                    workspace=workspace_to_pb(
                        self.workspaces.view(ws), self.workspaces.service_statuses(ws.name)
                    ),
                    time_unix_nano=time.time_ns(),
                )
            async for ev in events:
                if not request.name or ev.workspace.name == request.name:
                    yield pb.WorkspaceEvent(
                        workspace=workspace_to_pb(
                            ev.workspace, self.workspaces.service_statuses(ev.workspace.name)
                        ),
                        message=ev.message,
                        time_unix_nano=ev.time_unix_nano,
                        service=service_status_to_pb(ev.service) if ev.service else None,
                        transfer=transfer_to_pb(ev.transfer) if ev.transfer else None,
                    )

    async def StreamLogs(
        self, request: pb.StreamLogsRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.LogBatch]:
        if request.tail < 0:
            raise InvalidArgumentError("--tail must be 0 (all) or a positive number of lines")
        async for batch in self.workspaces.logs(
            request.name,
            follow=request.follow,
            tail=request.tail,
            since_unix_nano=request.since_unix_nano,
            service=request.service,
            compact=request.compact,
        ):
            yield batch

    async def ExecWorkspace(
        self, request: pb.ExecWorkspaceRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        if not request.argv:
            raise InvalidArgumentError(
                "no command given: `vendetta workspace exec NAME -- CMD ...`"
            )
        async for out in self.workspaces.exec(
            request.name, list(request.argv), dict(request.env), request.workdir
        ):
            yield out

    async def Connect(
        self, request_iterator: AsyncIterator[common_pb2.AttachInput], context: Ctx
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        async for out in self.workspaces.connect(request_iterator):
            yield out

    async def Dial(
        self, request_iterator: AsyncIterator[common_pb2.DialInput], context: Ctx
    ) -> AsyncIterator[common_pb2.DialOutput]:
        async for out in dial.relay(self.workspaces, self.nodes, request_iterator):
            yield out

    async def DialRoute(self, request: common_pb2.DialStart, context: Ctx) -> pb.DialRouteReply:
        peer = context.peer() or ""
        if auth.caller.get() is not None or not peer.startswith("unix:"):
            raise FailedPreconditionError(
                "a dial route is a socket on the coordinator's machine, for clients on its "
                "unix socket: use Dial"
            )
        return await dial.route(self.workspaces, self.nodes, request)

    async def Listen(
        self, request_iterator: AsyncIterator[common_pb2.ListenInput], context: Ctx
    ) -> AsyncIterator[common_pb2.ListenOutput]:
        async for out in dial.relay_listen(self.workspaces, self.nodes, request_iterator):
            yield out

    async def GetConnectionInfo(
        self, request: pb.GetWorkspaceRequest, context: Ctx
    ) -> pb.ConnectionInfo:
        ws = await self.workspaces.get(request.name)
        return pb.ConnectionInfo(
            workspace=ws.name,
            node=ws.node,
            provider=ws.provider,
            environment_id=ws.environment_id,
            exec_hint=["vendetta", "workspace", "connect", ws.name],
        )

    # source
    async def PushWorkspace(
        self, request: pb.SourceTransferRequest, context: Ctx
    ) -> AsyncIterator[pb.SourceTransfer]:
        async for t in self.workspaces.transfer(request.name, "push", request.force):
            yield transfer_to_pb(t)

    async def PullWorkspace(
        self, request: pb.SourceTransferRequest, context: Ctx
    ) -> AsyncIterator[pb.SourceTransfer]:
        async for t in self.workspaces.transfer(request.name, "pull", request.force):
            yield transfer_to_pb(t)

    # images
    async def ListImages(
        self, request: pb.ListImagesRequest, context: Ctx
    ) -> common_pb2.ListImagesResponse:
        found = await images.list_images(self.nodes, request.node, request.provider)
        return common_pb2.ListImagesResponse(images=found)

    async def ImportImage(
        self, request_iterator: AsyncIterator[common_pb2.ImageUpload], context: Ctx
    ) -> common_pb2.ImportImageResponse:
        imported = await images.import_image(self.nodes, request_iterator)
        return common_pb2.ImportImageResponse(images=imported)
