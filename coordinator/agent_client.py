"""A typed client for one node's agent: stubs, error mapping, and conversion to domain types.

What the agent reports of environments and services comes back as
``coordinator.models`` types; log, exec and attach streams are relayed as
they are (the coordinator only passes them on).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import grpc
import grpc.aio

from common.errors import NodeUnreachableError, VendettaError
from common.rpc_errors import mapped_rpc_errors
from coordinator.convert import environment_from_pb, service_event_from_pb, service_status_from_pb
from coordinator.models import Environment, ServiceEvent, ServiceStatus
from vendetta.v1 import common_pb2, nodeagent_pb2, nodeagent_pb2_grpc

DEFAULT_TIMEOUT = 120.0


class NodeLostError(NodeUnreachableError):
    """A call ended because its node stopped answering or its connection went: what
    the call did on the node is unknown. ``why`` says what happened to the node."""

    def __init__(self, node: str, why: str) -> None:
        super().__init__(
            f"node {node!r} stopped answering: {why}. Check it with `vendetta node status "
            f"{node}` and retry once it is ready"
        )
        self.node = node
        self.why = why


class AgentClient:
    """``node`` names the node in errors; ``lost`` says why its connection was closed
    (closing the channel is how in-flight calls end when the node goes away)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        node: str = "",
        lost: Callable[[], str] | None = None,
    ) -> None:
        self._stub = nodeagent_pb2_grpc.NodeAgentStub(channel)
        self.node = node
        self._lost = lost

    def _transport(self, code: grpc.StatusCode, details: str) -> VendettaError:
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return NodeLostError(self.node, "it did not answer in time")
        return NodeLostError(self.node, f"the connection to its agent broke: {details}")

    @contextmanager
    def _mapped(self, named: bool = True) -> Iterator[None]:
        """The error tree; a call ended by gRPC itself (connection gone, deadline, or the
        channel closed under it) is a NodeLostError naming the node. Not ``named``
        (supervision's own calls, whose errors go into the node's status), gRPC's
        failures keep its words, but a closed channel is still an error, never a
        cancellation that would end supervision."""
        try:
            with mapped_rpc_errors(self._transport if named else None):
                yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller was cancelled, not the call
            # The channel was closed under the call: the node was declared lost.
            why = (self._lost() if self._lost else "") or "its connection was closed"
            raise NodeLostError(self.node, why) from None

    async def info(self, timeout: float = 15.0) -> nodeagent_pb2.InfoResponse:
        with self._mapped(named=False):
            return await self._stub.Info(nodeagent_pb2.InfoRequest(), timeout=timeout)

    async def heartbeat(self, timeout: float = 5.0) -> nodeagent_pb2.HeartbeatResponse:
        with self._mapped(named=False):
            return await self._stub.Heartbeat(nodeagent_pb2.HeartbeatRequest(), timeout=timeout)

    async def sink(self, total: int, chunk: int = 256 * 1024, timeout: float = 60.0) -> int:
        """Send ``total`` bytes to the agent, which drops them; the bytes it received."""

        async def chunks() -> AsyncIterator[nodeagent_pb2.SinkChunk]:
            block = bytes(chunk)
            left = total
            while left > 0:
                yield nodeagent_pb2.SinkChunk(data=block[: min(left, chunk)])
                left -= chunk

        with self._mapped(named=False):
            resp = await self._stub.Sink(chunks(), timeout=timeout)
        return resp.bytes

    async def create(self, spec: nodeagent_pb2.EnvironmentSpec) -> Environment:
        with self._mapped():
            env = await self._stub.CreateEnvironment(
                nodeagent_pb2.CreateEnvironmentRequest(spec=spec), timeout=DEFAULT_TIMEOUT
            )
        return environment_from_pb(env)

    async def start(self, workspace: str, provider: str) -> Environment:
        with self._mapped():
            env = await self._stub.StartEnvironment(
                nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider=provider),
                timeout=DEFAULT_TIMEOUT,
            )
        return environment_from_pb(env)

    async def stop(
        self, workspace: str, provider: str, timeout_seconds: float = 10.0
    ) -> Environment:
        with self._mapped():
            env = await self._stub.StopEnvironment(
                nodeagent_pb2.StopEnvironmentRequest(
                    workspace=workspace, provider=provider, timeout_seconds=timeout_seconds
                ),
                timeout=DEFAULT_TIMEOUT,
            )
        return environment_from_pb(env)

    async def destroy(self, workspace: str, provider: str) -> None:
        with self._mapped():
            await self._stub.DestroyEnvironment(
                nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider=provider),
                timeout=DEFAULT_TIMEOUT,
            )

    async def inspect(self, workspace: str, provider: str) -> Environment:
        with self._mapped():
            env = await self._stub.InspectEnvironment(
                nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider=provider),
                timeout=30.0,
            )
        return environment_from_pb(env)

    async def list_environments(self) -> list[Environment]:
        """Every environment the agent has, on every ready provider."""
        with self._mapped():
            resp = await self._stub.ListEnvironments(
                nodeagent_pb2.ListEnvironmentsRequest(), timeout=30.0
            )
        return [environment_from_pb(env) for env in resp.environments]

    async def exec(
        self, workspace: str, provider: str, argv: list[str], env: dict[str, str], workdir: str
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        request = nodeagent_pb2.ExecRequest(
            workspace=workspace, provider=provider, argv=argv, env=env, workdir=workdir
        )
        with self._mapped():
            async for out in self._stub.Exec(request):
                yield out

    async def logs(
        self,
        workspace: str,
        provider: str,
        *,
        follow: bool,
        tail: int,
        since_unix_nano: int,
        service: str,
        compact: bool = False,
    ) -> AsyncIterator[common_pb2.LogBatch]:
        request = nodeagent_pb2.AgentLogsRequest(
            workspace=workspace,
            provider=provider,
            follow=follow,
            tail=tail,
            since_unix_nano=since_unix_nano,
            service=service,
            compact=compact,
        )
        with self._mapped():
            async for batch in self._stub.StreamLogs(request):
                yield batch

    async def start_services(
        self, workspace: str, provider: str, services: list[common_pb2.ServiceSpec]
    ) -> AsyncIterator[ServiceEvent]:
        request = nodeagent_pb2.StartServicesRequest(
            workspace=workspace, provider=provider, services=services
        )
        with self._mapped():
            async for ev in self._stub.StartServices(request):
                yield service_event_from_pb(ev)

    async def get_services(self, workspace: str, provider: str) -> list[ServiceStatus]:
        with self._mapped():
            resp = await self._stub.GetServices(
                nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider=provider),
                timeout=30.0,
            )
        return [service_status_from_pb(s) for s in resp.services]

    async def watch_services(self, workspace: str, provider: str) -> AsyncIterator[ServiceEvent]:
        request = nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider=provider)
        with self._mapped():
            async for ev in self._stub.WatchServices(request):
                yield service_event_from_pb(ev)

    async def run_hook(self, workspace: str, provider: str, name: str, command: str) -> int:
        """Run a config hook to its end; its exit code (-1 when the agent reported none)."""
        request = nodeagent_pb2.RunHookRequest(
            workspace=workspace, provider=provider, name=name, command=command
        )
        code = -1
        with self._mapped():
            async for out in self._stub.RunHook(request):
                if out.WhichOneof("output") == "exit_code":
                    code = out.exit_code
        return code

    async def attach(
        self, requests: AsyncIterator[common_pb2.AttachInput]
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        with self._mapped():
            async for out in self._stub.Attach(requests):
                yield out

    async def dial(
        self, requests: AsyncIterator[common_pb2.DialInput]
    ) -> AsyncIterator[common_pb2.DialOutput]:
        with self._mapped():
            async for out in self._stub.Dial(requests):
                yield out

    async def listen(
        self, requests: AsyncIterator[common_pb2.ListenInput]
    ) -> AsyncIterator[common_pb2.ListenOutput]:
        with self._mapped():
            async for out in self._stub.Listen(requests):
                yield out

    async def put_source(
        self,
        workspace: str,
        chunks: AsyncIterator[bytes],
        *,
        replace: bool,
        deleted: list[str],
        size_bytes: int,
    ) -> nodeagent_pb2.SourceReceipt:
        """Send a tar of the workspace's source (no deadline: its size sets how long)."""

        async def upload() -> AsyncIterator[nodeagent_pb2.SourceUpload]:
            yield nodeagent_pb2.SourceUpload(
                start=nodeagent_pb2.SourceUploadStart(
                    workspace=workspace, replace=replace, deleted=deleted, size_bytes=size_bytes
                )
            )
            async for chunk in chunks:
                yield nodeagent_pb2.SourceUpload(chunk=chunk)

        with self._mapped():
            return await self._stub.PutSource(upload())

    async def get_source(self, workspace: str, since_unix_nano: int) -> AsyncIterator[bytes]:
        """A tar of the files of the node's copy changed since then (0: all)."""
        request = nodeagent_pb2.GetSourceRequest(
            workspace=workspace, since_unix_nano=since_unix_nano
        )
        with self._mapped():
            async for chunk in self._stub.GetSource(request):
                yield chunk.data

    async def delete_source(self, workspace: str) -> None:
        with self._mapped():
            await self._stub.DeleteSource(
                nodeagent_pb2.DeleteSourceRequest(workspace=workspace), timeout=DEFAULT_TIMEOUT
            )

    async def list_images(self, provider: str) -> list[common_pb2.ImageInfo]:
        with self._mapped():
            resp = await self._stub.ListImages(
                nodeagent_pb2.AgentListImagesRequest(provider=provider), timeout=60.0
            )
        return list(resp.images)

    async def import_image(
        self, upload: AsyncIterator[common_pb2.ImageUpload]
    ) -> list[common_pb2.ImageInfo]:
        """Relay an image upload (no deadline: its size sets how long it takes)."""
        with self._mapped():
            resp = await self._stub.ImportImage(upload)
        return list(resp.images)
