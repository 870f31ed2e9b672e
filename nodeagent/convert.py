"""Proto <-> provider dataclasses, at the agent's edge (providers never see protos)."""

from __future__ import annotations

from providers.base import (
    Capabilities,
    EnvironmentSpec,
    EnvironmentStatus,
    EnvState,
    LogRecord,
    Readiness,
)
from vendetta.v1 import common_pb2, nodeagent_pb2

_STATE_TO_PB = {
    EnvState.ABSENT: common_pb2.ENVIRONMENT_STATE_ABSENT,
    EnvState.CREATED: common_pb2.ENVIRONMENT_STATE_CREATED,
    EnvState.RUNNING: common_pb2.ENVIRONMENT_STATE_RUNNING,
    EnvState.STOPPED: common_pb2.ENVIRONMENT_STATE_STOPPED,
    EnvState.UNKNOWN: common_pb2.ENVIRONMENT_STATE_UNKNOWN,
}


def spec_from_pb(pb: nodeagent_pb2.EnvironmentSpec) -> EnvironmentSpec:
    return EnvironmentSpec(
        workspace=pb.workspace,
        image=pb.image,
        command=list(pb.command) or None,
        env=dict(pb.env),
        cpus=pb.cpus or None,
        memory_bytes=pb.memory_bytes or None,
        disk_bytes=pb.disk_bytes or None,
        ports=tuple(pb.ports),
    )


def status_to_pb(st: EnvironmentStatus) -> nodeagent_pb2.Environment:
    return nodeagent_pb2.Environment(
        workspace=st.workspace,
        provider=st.provider,
        state=_STATE_TO_PB[st.state],
        id=st.id,
        image=st.image,
        addresses=list(st.addresses),
        detail=st.detail,
        ports=dict(st.ports),
    )


def provider_info_to_pb(name: str, caps: Capabilities, r: Readiness) -> common_pb2.ProviderInfo:
    return common_pb2.ProviderInfo(
        name=name,
        ready=r.ready,
        detail=r.detail,
        version=r.version,
        capabilities=[k for k, v in vars(caps).items() if v],
        images=list(r.images),
    )


def log_to_pb(rec: LogRecord) -> common_pb2.LogLine:
    return common_pb2.LogLine(
        time_unix_nano=rec.time_unix_nano, stream=rec.stream, service=rec.service, text=rec.text
    )
