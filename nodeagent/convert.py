"""Proto <-> domain dataclasses, at the agent's edge: the providers and the service
supervisor never see protos."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable, Iterator

from google.protobuf.message import DecodeError

from common.errors import InvalidArgumentError
from nodeagent.services.model import ServiceEvent, ServiceState, ServiceStatus
from nodeagent.services.spec import Health, ServiceDef
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

_SERVICE_STATE_TO_PB = {
    ServiceState.UNSPECIFIED: common_pb2.SERVICE_STATE_UNSPECIFIED,
    ServiceState.PENDING: common_pb2.SERVICE_STATE_PENDING,
    ServiceState.STARTING: common_pb2.SERVICE_STATE_STARTING,
    ServiceState.HEALTHY: common_pb2.SERVICE_STATE_HEALTHY,
    ServiceState.UNHEALTHY: common_pb2.SERVICE_STATE_UNHEALTHY,
    ServiceState.EXITED: common_pb2.SERVICE_STATE_EXITED,
    ServiceState.FAILED: common_pb2.SERVICE_STATE_FAILED,
    ServiceState.STOPPED: common_pb2.SERVICE_STATE_STOPPED,
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
        source_path=pb.source_path,
        workdir=pb.workdir,
        user=pb.user,
        git_dir=pb.git_dir,
        owner=pb.owner,
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
        source_mode=st.source_mode,
        workdir=st.workdir,
        owner=st.owner,
    )


def provider_info_to_pb(name: str, caps: Capabilities, r: Readiness) -> common_pb2.ProviderInfo:
    return common_pb2.ProviderInfo(
        name=name,
        ready=r.ready,
        detail=r.detail,
        version=r.version,
        capabilities=[k for k, v in vars(caps).items() if v],
        images=list(r.images),
        failed_check=r.failed,
        mode=r.mode,
    )


def log_to_pb(rec: LogRecord) -> common_pb2.LogLine:
    return common_pb2.LogLine(
        time_unix_nano=rec.time_unix_nano, stream=rec.stream, service=rec.service, text=rec.text
    )


_STREAM_SERVICE = operator.attrgetter("stream", "service")
_TEXT = operator.attrgetter("text")
_TIME = operator.attrgetter("time_unix_nano")


def log_blocks(records: Iterable[LogRecord]) -> Iterator[common_pb2.LogBatch]:
    """Records in LogBatch's compact form: a batch per run of one stream and service,
    its text joined once (C-level maps, no message per line)."""
    for (stream, service), run in itertools.groupby(records, _STREAM_SERVICE):
        recs = list(run)
        text = "\n".join(map(_TEXT, recs)) + "\n"
        if text.count("\n") != len(recs):  # a record holding a newline: would misalign times
            yield common_pb2.LogBatch(lines=[log_to_pb(r) for r in recs])
            continue
        yield common_pb2.LogBatch(
            text=text.encode("utf-8", "replace"),
            times_unix_nano=list(map(_TIME, recs)),
            stream=stream,
            service=service,
        )


def service_from_pb(pb: common_pb2.ServiceSpec) -> ServiceDef:
    health = None
    if pb.HasField("health"):
        h = pb.health
        _check_health(pb.name, h)
        health = Health(
            http=h.http,
            tcp=h.tcp,
            command=tuple(h.command),
            interval=h.interval_seconds or 1.0,
            timeout=h.timeout_seconds or 2.0,
            retries=h.retries or 30,
            start_period=h.start_period_seconds,
        )
    if not pb.command:
        raise InvalidArgumentError(f"service {pb.name!r} has no command")
    return ServiceDef(
        name=pb.name,
        argv=tuple(pb.command),
        port=pb.port,
        depends_on=tuple(pb.depends_on),
        health=health,
        env=dict(pb.env),
        restart=pb.restart or "on-failure",
    )


DAY = 86400.0


def _check_health(service: str, h: common_pb2.HealthCheck) -> None:
    """The config checks these too; an agent also gets messages from other clients,
    and a NaN interval or negative retries would make a health loop spin."""
    for what, seconds in (
        ("interval", h.interval_seconds),
        ("timeout", h.timeout_seconds),
        ("start_period", h.start_period_seconds),
    ):
        if not math.isfinite(seconds) or not 0 <= seconds <= DAY:
            raise InvalidArgumentError(
                f"service {service!r}: health-check {what} must be 0 to {DAY:.0f} seconds"
            )
    if not 0 <= h.retries <= 1_000_000:
        raise InvalidArgumentError(
            f"service {service!r}: health-check retries must be 0 to 1,000,000"
        )


def service_from_saved_pb(data: bytes) -> ServiceDef:
    """A service as agents before the supervisor's own state format saved it: a
    serialized ``ServiceSpec`` (see ``nodeagent.services.state``)."""
    try:
        return service_from_pb(common_pb2.ServiceSpec.FromString(data))
    except DecodeError as exc:
        raise ValueError(f"not a saved service: {exc}") from exc


def service_status_to_pb(st: ServiceStatus) -> common_pb2.ServiceStatus:
    return common_pb2.ServiceStatus(
        name=st.name,
        state=_SERVICE_STATE_TO_PB[st.state],
        pid=st.pid,
        restarts=st.restarts,
        exit_code=st.exit_code,
        detail=st.detail,
        port=st.port,
        node_endpoint=st.node_endpoint,
        last_lines=list(st.last_lines),
    )


def service_event_to_pb(ev: ServiceEvent) -> common_pb2.ServiceEvent:
    return common_pb2.ServiceEvent(
        workspace=ev.workspace,
        service=service_status_to_pb(ev.service),
        message=ev.message,
        time_unix_nano=ev.time_unix_nano,
    )
