"""A typed client for one node's agent: stubs plus error mapping, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio

from common.rpc_errors import mapped_rpc_errors
from vendetta.v1 import common_pb2, nodeagent_pb2, nodeagent_pb2_grpc

DEFAULT_TIMEOUT = 120.0


class AgentClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = nodeagent_pb2_grpc.NodeAgentStub(channel)

    async def info(self, timeout: float = 15.0) -> nodeagent_pb2.InfoResponse:
        with mapped_rpc_errors():
            return await self._stub.Info(nodeagent_pb2.InfoRequest(), timeout=timeout)

    async def heartbeat(self, timeout: float = 5.0) -> nodeagent_pb2.HeartbeatResponse:
        with mapped_rpc_errors():
            return await self._stub.Heartbeat(nodeagent_pb2.HeartbeatRequest(), timeout=timeout)

    async def create(self, spec: nodeagent_pb2.EnvironmentSpec) -> nodeagent_pb2.Environment:
        with mapped_rpc_errors():
            return await self._stub.CreateEnvironment(
                nodeagent_pb2.CreateEnvironmentRequest(spec=spec), timeout=DEFAULT_TIMEOUT
            )

    async def start(self, workspace: str, provider: str) -> nodeagent_pb2.Environment:
        with mapped_rpc_errors():
            return await self._stub.StartEnvironment(
                nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider=provider),
                timeout=DEFAULT_TIMEOUT,
            )

    async def stop(
        self, workspace: str, provider: str, timeout_seconds: float = 10.0
    ) -> nodeagent_pb2.Environment:
        with mapped_rpc_errors():
            return await self._stub.StopEnvironment(
                nodeagent_pb2.StopEnvironmentRequest(
                    workspace=workspace, provider=provider, timeout_seconds=timeout_seconds
                ),
                timeout=DEFAULT_TIMEOUT,
            )

    async def destroy(self, workspace: str, provider: str) -> None:
        with mapped_rpc_errors():
            await self._stub.DestroyEnvironment(
                nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider=provider),
                timeout=DEFAULT_TIMEOUT,
            )

    async def inspect(self, workspace: str, provider: str) -> nodeagent_pb2.Environment:
        with mapped_rpc_errors():
            return await self._stub.InspectEnvironment(
                nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider=provider),
                timeout=30.0,
            )

    async def exec(
        self, request: nodeagent_pb2.ExecRequest
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        with mapped_rpc_errors():
            async for out in self._stub.Exec(request):
                yield out

    async def logs(
        self, request: nodeagent_pb2.AgentLogsRequest
    ) -> AsyncIterator[common_pb2.LogBatch]:
        with mapped_rpc_errors():
            async for batch in self._stub.StreamLogs(request):
                yield batch

    async def start_services(
        self, workspace: str, provider: str, services: list[common_pb2.ServiceSpec]
    ) -> AsyncIterator[common_pb2.ServiceEvent]:
        request = nodeagent_pb2.StartServicesRequest(
            workspace=workspace, provider=provider, services=services
        )
        with mapped_rpc_errors():
            async for ev in self._stub.StartServices(request):
                yield ev

    async def get_services(self, workspace: str, provider: str) -> list[common_pb2.ServiceStatus]:
        with mapped_rpc_errors():
            resp = await self._stub.GetServices(
                nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider=provider),
                timeout=30.0,
            )
        return list(resp.services)

    async def watch_services(
        self, workspace: str, provider: str
    ) -> AsyncIterator[common_pb2.ServiceEvent]:
        request = nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider=provider)
        with mapped_rpc_errors():
            async for ev in self._stub.WatchServices(request):
                yield ev

    async def run_hook(
        self, workspace: str, provider: str, name: str, command: str
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        request = nodeagent_pb2.RunHookRequest(
            workspace=workspace, provider=provider, name=name, command=command
        )
        with mapped_rpc_errors():
            async for out in self._stub.RunHook(request):
                yield out

    async def attach(
        self, requests: AsyncIterator[common_pb2.AttachInput]
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        with mapped_rpc_errors():
            async for out in self._stub.Attach(requests):
                yield out
