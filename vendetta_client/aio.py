"""The asyncio client: ``AsyncClient``, the same calls as ``Client`` awaited, streams as
async iterators.

    async with await AsyncClient.connect(URL, token=TOKEN, fingerprint=PIN) as vd:
        async for event in vd.watch():
            print(event.workspace.name, event.message)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

from vendetta.v1 import common_pb2 as cpb
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import coordinator_pb2_grpc
from vendetta_client._common import (
    ACT_TIMEOUT,
    BACKOFF,
    READ_TIMEOUT,
    ExecResult,
    Settings,
    request_id,
    retryable,
)
from vendetta_client.errors import from_rpc_error

_Out = TypeVar("_Out")


class AsyncStream(Generic[_Out]):
    """A server stream as an async iterator; ``cancel()`` (or leaving ``async with``)
    ends the call."""

    def __init__(self, call: Any, items: Callable[[Any], Iterable[_Out]]) -> None:
        self._call = call
        self._items = items
        self._it = self._iterate()
        self._cancelled = False

    async def _iterate(self) -> AsyncIterator[_Out]:
        try:
            async for message in self._call:
                for item in self._items(message):
                    yield item
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._cancelled:
                return
            raise from_rpc_error(exc) from exc
        except asyncio.CancelledError:
            if not self._cancelled:
                raise

    def __aiter__(self) -> AsyncIterator[_Out]:
        return self

    async def __anext__(self) -> _Out:
        return await anext(self._it)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncStream[_Out]:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.cancel()


class AsyncClient:
    """As ``Client``; build it with ``await AsyncClient.connect(...)`` (pinning the
    certificate is a TLS handshake), or ``AsyncClient(...)`` for the local socket or
    when blocking once is fine."""

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        fingerprint: str | None = None,
        ca_file: str | None = None,
        retries: int = 3,
        _channel_args: tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]] | None = None,
    ) -> None:
        self.settings = Settings.resolve(target, token, fingerprint, ca_file, retries)
        creds, options = _channel_args or self.settings.channel_args()
        address = self.settings.endpoint.address
        self.channel = (
            grpc.aio.secure_channel(address, creds, options=options)
            if creds is not None
            else grpc.aio.insecure_channel(address, options=options)
        )
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)  # typed as the async stub

    @classmethod
    async def connect(
        cls,
        target: str | None = None,
        *,
        token: str | None = None,
        fingerprint: str | None = None,
        ca_file: str | None = None,
        retries: int = 3,
    ) -> AsyncClient:
        settings = Settings.resolve(target, token, fingerprint, ca_file, retries)
        args = await asyncio.to_thread(settings.channel_args)
        return cls(
            target,
            token=token,
            fingerprint=fingerprint,
            ca_file=ca_file,
            retries=retries,
            _channel_args=args,
        )

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Any, _Out],
        request: Any,
        timeout: float | None,
    ) -> _Out:
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            try:
                return await method(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if attempt + 1 < attempts and retryable(exc):
                    await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                    continue
                raise from_rpc_error(exc) from exc
        raise AssertionError("unreachable")

    async def server_info(self, *, timeout: float = READ_TIMEOUT) -> pb.ServerInfo:
        return await self._unary(self.stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)

    async def list_workspaces(
        self, node: str = "", *, timeout: float = READ_TIMEOUT
    ) -> list[pb.Workspace]:
        request = pb.ListWorkspacesRequest(node=node)
        return list((await self._unary(self.stub.ListWorkspaces, request, timeout)).workspaces)

    async def get_workspace(self, name: str, *, timeout: float = READ_TIMEOUT) -> pb.Workspace:
        request = pb.GetWorkspaceRequest(name=name)
        return await self._unary(self.stub.GetWorkspace, request, timeout)

    async def connection_info(
        self, name: str, *, timeout: float = READ_TIMEOUT
    ) -> pb.ConnectionInfo:
        request = pb.GetWorkspaceRequest(name=name)
        return await self._unary(self.stub.GetConnectionInfo, request, timeout)

    async def list_nodes(self, *, timeout: float = READ_TIMEOUT) -> list[pb.Node]:
        return list((await self._unary(self.stub.ListNodes, pb.ListNodesRequest(), timeout)).nodes)

    async def create_workspace(
        self,
        name: str,
        *,
        config_yaml: str = "",
        provider: str = "",
        node: str = "",
        source: str = "",
        branch: str = "",
        timeout: float = ACT_TIMEOUT,
    ) -> pb.Workspace:
        request = pb.CreateWorkspaceRequest(
            name=name,
            config_yaml=config_yaml,
            provider=provider,
            node=node,
            source=source,
            branch=branch,
            request_id=request_id(),
        )
        return await self._unary(self.stub.CreateWorkspace, request, timeout)

    async def up(self, name: str, *, timeout: float = ACT_TIMEOUT) -> pb.Workspace:
        request = pb.WorkspaceRequest(name=name, request_id=request_id())
        return await self._unary(self.stub.UpWorkspace, request, timeout)

    async def down(self, name: str, *, timeout: float = ACT_TIMEOUT) -> pb.Workspace:
        request = pb.WorkspaceRequest(name=name, request_id=request_id())
        return await self._unary(self.stub.DownWorkspace, request, timeout)

    async def destroy(
        self, name: str, *, force: bool = False, timeout: float = ACT_TIMEOUT
    ) -> pb.DestroyWorkspaceResponse:
        request = pb.WorkspaceRequest(name=name, request_id=request_id(), force=force)
        return await self._unary(self.stub.DestroyWorkspace, request, timeout)

    def exec(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str = "",
        timeout: float | None = None,
    ) -> AsyncStream[cpb.ExecOutput]:
        request = pb.ExecWorkspaceRequest(name=name, argv=argv, env=env or {}, workdir=workdir)
        return AsyncStream(self.stub.ExecWorkspace(request, timeout=timeout), lambda m: (m,))

    async def run(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str = "",
        timeout: float | None = None,
    ) -> ExecResult:
        out, err, code = bytearray(), bytearray(), -1
        async with self.exec(name, argv, env=env, workdir=workdir, timeout=timeout) as stream:
            async for message in stream:
                kind = message.WhichOneof("output")
                if kind == "stdout":
                    out += message.stdout
                elif kind == "stderr":
                    err += message.stderr
                elif kind == "exit_code":
                    code = message.exit_code
        return ExecResult(code, bytes(out), bytes(err))

    def logs(
        self, name: str, *, follow: bool = False, tail: int = 0, service: str = ""
    ) -> AsyncStream[cpb.LogLine]:
        request = pb.StreamLogsRequest(name=name, follow=follow, tail=tail, service=service)
        return AsyncStream(self.stub.StreamLogs(request), lambda batch: batch.lines)

    def watch(self, name: str = "") -> AsyncStream[pb.WorkspaceEvent]:
        request = pb.WatchWorkspaceRequest(name=name)
        return AsyncStream(self.stub.WatchWorkspace(request), lambda m: (m,))
