"""NodeAgent gRPC servicer: thin; converts at the edge and calls the providers."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from common.batching import batched
from common.errors import InvalidArgumentError
from common.names import validate_name
from common.version import VERSION
from nodeagent import convert
from nodeagent.providers import ProviderSet
from providers.base import LogRecord
from vendetta.v1 import common_pb2, nodeagent_pb2, nodeagent_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class NodeAgentServicer(nodeagent_pb2_grpc.NodeAgentServicer):
    def __init__(self, agent_id: str, providers: ProviderSet, socket_path: str) -> None:
        self.agent_id = agent_id
        self.providers = providers
        self.socket_path = socket_path

    async def Info(
        self, request: nodeagent_pb2.InfoRequest, context: Ctx
    ) -> nodeagent_pb2.InfoResponse:
        infos = [
            convert.provider_info_to_pb(p.name, p.capabilities, r)
            for p, r in await self.providers.readiness()
        ]
        return nodeagent_pb2.InfoResponse(
            version=VERSION,
            agent_id=self.agent_id,
            hostname=socket.gethostname(),
            providers=infos,
            capacity=nodeagent_pb2.Capacity(cpus=os.cpu_count() or 0, memory_bytes=_total_memory()),
            socket_path=self.socket_path,
        )

    async def Heartbeat(
        self, request: nodeagent_pb2.HeartbeatRequest, context: Ctx
    ) -> nodeagent_pb2.HeartbeatResponse:
        return nodeagent_pb2.HeartbeatResponse(
            time_unix_nano=time.time_ns(), agent_id=self.agent_id
        )

    async def CreateEnvironment(
        self, request: nodeagent_pb2.CreateEnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.Environment:
        spec = convert.spec_from_pb(request.spec)
        validate_name("workspace", spec.workspace)
        if not spec.image:
            raise InvalidArgumentError("no image given for the environment")
        provider = self.providers.get(request.spec.provider)
        return convert.status_to_pb(await provider.create(spec))

    async def StartEnvironment(
        self, request: nodeagent_pb2.EnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.Environment:
        provider = self.providers.get(request.provider)
        return convert.status_to_pb(await provider.start(request.workspace))

    async def StopEnvironment(
        self, request: nodeagent_pb2.StopEnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.Environment:
        provider = self.providers.get(request.provider)
        timeout = request.timeout_seconds or 10.0
        return convert.status_to_pb(await provider.stop(request.workspace, timeout))

    async def DestroyEnvironment(
        self, request: nodeagent_pb2.EnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.DestroyEnvironmentResponse:
        await self.providers.get(request.provider).destroy(request.workspace)
        return nodeagent_pb2.DestroyEnvironmentResponse()

    async def InspectEnvironment(
        self, request: nodeagent_pb2.EnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.Environment:
        provider = self.providers.get(request.provider)
        return convert.status_to_pb(await provider.inspect(request.workspace))

    async def ListEnvironments(
        self, request: nodeagent_pb2.ListEnvironmentsRequest, context: Ctx
    ) -> nodeagent_pb2.ListEnvironmentsResponse:
        envs: list[nodeagent_pb2.Environment] = []
        for provider, ready in await self.providers.readiness():
            if ready.ready:
                envs.extend(convert.status_to_pb(s) for s in await provider.list())
        return nodeagent_pb2.ListEnvironmentsResponse(environments=envs)

    async def Exec(
        self, request: nodeagent_pb2.ExecRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        if not request.argv:
            raise InvalidArgumentError("no command given to run")
        provider = self.providers.get(request.provider)
        async for chunk in provider.exec(
            request.workspace, list(request.argv), dict(request.env), request.workdir
        ):
            if chunk.stdout:
                yield common_pb2.ExecOutput(stdout=chunk.stdout)
            if chunk.stderr:
                yield common_pb2.ExecOutput(stderr=chunk.stderr)
            if chunk.exit_code is not None:
                yield common_pb2.ExecOutput(exit_code=chunk.exit_code)

    async def StreamLogs(
        self, request: nodeagent_pb2.AgentLogsRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.LogBatch]:
        provider = self.providers.get(request.provider)
        records = provider.logs(
            request.workspace,
            follow=request.follow,
            tail=request.tail or None,
            since_unix_nano=request.since_unix_nano,
        )
        async for batch in batched(records, size=_record_size):
            yield common_pb2.LogBatch(lines=[convert.log_to_pb(r) for r in batch])


def _record_size(rec: LogRecord) -> int:
    return len(rec.text) + 32
