"""The blocking client: ``Client`` (``vendetta_client.AsyncClient`` is its asyncio twin).

    with Client("vendetta://build1:7443", token=..., fingerprint=...) as vd:
        vd.create_workspace("api", config_yaml=open(".vendetta/config.yaml").read())
        vd.up("api")
        print(vd.run("api", ["make", "test"]).exit_code)
        for line in vd.logs("api", follow=True):
            print(line.text)

Every failed call raises ``vendetta_client.errors.VendettaError`` (a subclass saying
which); ``stub`` is the generated stub for the methods not wrapped here (its errors
are grpc.RpcError: ``errors.from_rpc_error`` maps them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

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

_In = TypeVar("_In")
_Out = TypeVar("_Out")


class Stream(Generic[_Out]):
    """A server stream as an iterator; ``cancel()`` (or leaving ``with``) ends the call."""

    def __init__(self, call: Any, items: Callable[[Any], Iterable[_Out]]) -> None:
        self._call = call
        self._items = items
        self._it = self._iterate()

    def _iterate(self) -> Iterator[_Out]:
        try:
            for message in self._call:
                yield from self._items(message)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._cancelled:
                return
            raise from_rpc_error(exc) from exc

    _cancelled = False

    def __iter__(self) -> Iterator[_Out]:
        return self

    def __next__(self) -> _Out:
        return next(self._it)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> Stream[_Out]:
        return self

    def __exit__(self, *_: object) -> None:
        self.cancel()


class Client:
    """A connection to a coordinator: ``target`` ``vendetta://HOST:PORT`` with ``token``
    and ``fingerprint`` (or ``ca_file``), ``unix:PATH``, or None for VENDETTA_URL /
    VENDETTA_TOKEN / VENDETTA_TLS_FINGERPRINT, else the local coordinator's socket."""

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        fingerprint: str | None = None,
        ca_file: str | None = None,
        retries: int = 3,
    ) -> None:
        self.settings = Settings.resolve(target, token, fingerprint, ca_file, retries)
        creds, options = self.settings.channel_args()  # pins the certificate first
        address = self.settings.endpoint.address
        self.channel = (
            grpc.secure_channel(address, creds, options=options)
            if creds is not None
            else grpc.insecure_channel(address, options=options)
        )
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[Any, _Out],
        request: Any,
        timeout: float | None,
        retry: bool,
    ) -> _Out:
        attempts = self.settings.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return method(request, timeout=timeout)
            except grpc.RpcError as exc:
                if attempt + 1 < attempts and retryable(exc):
                    time.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                    continue
                raise from_rpc_error(exc) from exc
        raise AssertionError("unreachable")

    # Reads: retried when the connection fails.
    def server_info(self, *, timeout: float = READ_TIMEOUT) -> pb.ServerInfo:
        return self._unary(self.stub.GetServerInfo, pb.GetServerInfoRequest(), timeout, True)

    def list_workspaces(
        self, node: str = "", *, timeout: float = READ_TIMEOUT
    ) -> list[pb.Workspace]:
        got = self._unary(
            self.stub.ListWorkspaces, pb.ListWorkspacesRequest(node=node), timeout, True
        )
        return list(got.workspaces)

    def get_workspace(self, name: str, *, timeout: float = READ_TIMEOUT) -> pb.Workspace:
        return self._unary(self.stub.GetWorkspace, pb.GetWorkspaceRequest(name=name), timeout, True)

    def connection_info(self, name: str, *, timeout: float = READ_TIMEOUT) -> pb.ConnectionInfo:
        return self._unary(
            self.stub.GetConnectionInfo, pb.GetWorkspaceRequest(name=name), timeout, True
        )

    def list_nodes(self, *, timeout: float = READ_TIMEOUT) -> list[pb.Node]:
        return list(self._unary(self.stub.ListNodes, pb.ListNodesRequest(), timeout, True).nodes)

    # Mutations: one request id for every attempt, so a retry takes effect once.
    def create_workspace(
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
        return self._unary(self.stub.CreateWorkspace, request, timeout, True)

    def up(self, name: str, *, timeout: float = ACT_TIMEOUT) -> pb.Workspace:
        request = pb.WorkspaceRequest(name=name, request_id=request_id())
        return self._unary(self.stub.UpWorkspace, request, timeout, True)

    def down(self, name: str, *, timeout: float = ACT_TIMEOUT) -> pb.Workspace:
        request = pb.WorkspaceRequest(name=name, request_id=request_id())
        return self._unary(self.stub.DownWorkspace, request, timeout, True)

    def destroy(
        self, name: str, *, force: bool = False, timeout: float = ACT_TIMEOUT
    ) -> pb.DestroyWorkspaceResponse:
        request = pb.WorkspaceRequest(name=name, request_id=request_id(), force=force)
        return self._unary(self.stub.DestroyWorkspace, request, timeout, True)

    # Streams: not retried (a command must not run twice; a stream may be reopened).
    def exec(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str = "",
        timeout: float | None = None,
    ) -> Stream[cpb.ExecOutput]:
        request = pb.ExecWorkspaceRequest(name=name, argv=argv, env=env or {}, workdir=workdir)
        return Stream(self.stub.ExecWorkspace(request, timeout=timeout), lambda m: (m,))

    def run(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str = "",
        timeout: float | None = None,
    ) -> ExecResult:
        """Run ``argv`` inside and wait: its exit code and whole output."""
        out, err, code = bytearray(), bytearray(), -1
        with self.exec(name, argv, env=env, workdir=workdir, timeout=timeout) as stream:
            for message in stream:
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
    ) -> Stream[cpb.LogLine]:
        request = pb.StreamLogsRequest(name=name, follow=follow, tail=tail, service=service)
        return Stream(self.stub.StreamLogs(request), lambda batch: batch.lines)

    def watch(self, name: str = "") -> Stream[pb.WorkspaceEvent]:
        """Events of one workspace, or of all (``name`` empty), until cancelled."""
        return Stream(self.stub.WatchWorkspace(pb.WatchWorkspaceRequest(name=name)), lambda m: (m,))
