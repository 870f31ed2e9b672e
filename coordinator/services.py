"""Project config services -> the agent's ServiceSpecs, and summaries of their state."""

from __future__ import annotations

from common.config import ProjectConfig
from common.config import Service as ServiceConfig
from vendetta.v1 import common_pb2


def _argv(command: str | list[str]) -> list[str]:
    return ["sh", "-c", command] if isinstance(command, str) else list(command)


def service_specs(cfg: ProjectConfig | None) -> list[common_pb2.ServiceSpec]:
    if cfg is None:
        return []
    return [_spec(name, svc) for name, svc in cfg.services.items()]


def _spec(name: str, svc: ServiceConfig) -> common_pb2.ServiceSpec:
    spec = common_pb2.ServiceSpec(
        name=name,
        command=_argv(svc.command),
        port=svc.port or 0,
        depends_on=svc.depends_on,
        env=svc.env,
        restart=svc.restart,
    )
    if svc.health_check is not None:
        h = svc.health_check
        spec.health.CopyFrom(
            common_pb2.HealthCheck(
                http=h.http or "",
                tcp=h.tcp or 0,
                command=_argv(h.command) if h.command is not None else [],
                interval_seconds=h.interval,
                timeout_seconds=h.timeout,
                retries=h.retries,
                start_period_seconds=h.start_period,
            )
        )
    return spec


def ports(cfg: ProjectConfig | None) -> list[int]:
    """Every port the node must reach: services' own and TCP health ports."""
    if cfg is None:
        return []
    found: set[int] = set()
    for svc in cfg.services.values():
        if svc.port:
            found.add(svc.port)
        if svc.health_check and svc.health_check.tcp:
            found.add(svc.health_check.tcp)
    return sorted(found)


def state_name(state: int) -> str:
    return common_pb2.ServiceState.Name(state).removeprefix("SERVICE_STATE_").lower()  # type: ignore[arg-type]


def failure_summary(statuses: list[common_pb2.ServiceStatus]) -> str:
    lines = []
    for s in statuses:
        mark = state_name(s.state)
        lines.append(f"  {s.name}: {mark}" + (f" - {s.detail}" if s.detail else ""))
        if s.state == common_pb2.SERVICE_STATE_FAILED and s.last_lines:
            lines.extend(f"      | {ln}" for ln in s.last_lines[-5:])
    return "\n".join(lines)
