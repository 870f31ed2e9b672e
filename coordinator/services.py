"""A project's config -> what the agent is asked for (environment and service specs, sent
as built), and summaries of the services' state."""

from __future__ import annotations

from common.config import ProjectConfig, parse_size
from common.config import Service as ServiceConfig
from coordinator.models import ServiceState, ServiceStatus
from vendetta.v1 import common_pb2, nodeagent_pb2


def environment_spec(
    name: str, provider: str, cfg: ProjectConfig | None
) -> nodeagent_pb2.EnvironmentSpec:
    cfg = cfg or ProjectConfig(name=name)
    spec = nodeagent_pb2.EnvironmentSpec(workspace=name, provider=provider)
    if provider == "docker":
        spec.image = cfg.docker.image
        spec.command.extend(cfg.docker.command or [])
    elif provider == "lxd":
        spec.image = cfg.lxd.image
        spec.cpus = cfg.lxd.cpu or 0
        spec.memory_bytes = parse_size(cfg.lxd.memory) if cfg.lxd.memory else 0
    else:
        spec.image = cfg.qemu.image
        spec.cpus = cfg.qemu.cpu
        spec.memory_bytes = parse_size(cfg.qemu.memory)
        spec.disk_bytes = parse_size(cfg.qemu.disk)
    spec.ports.extend(ports(cfg))
    return spec


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


def failure_summary(statuses: list[ServiceStatus]) -> str:
    lines = []
    for s in statuses:
        lines.append(f"  {s.name}: {s.state.value}" + (f" - {s.detail}" if s.detail else ""))
        if s.state == ServiceState.FAILED and s.last_lines:
            lines.extend(f"      | {ln}" for ln in s.last_lines[-5:])
    return "\n".join(lines)
