"""Plain service definitions (from protos, at the agent's edge) and their ordering."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.errors import InvalidArgumentError
from vendetta.v1 import common_pb2


@dataclass(frozen=True)
class Health:
    http: str = ""
    tcp: int = 0
    command: tuple[str, ...] = ()
    interval: float = 1.0
    timeout: float = 2.0
    retries: int = 30
    start_period: float = 0.0


@dataclass(frozen=True)
class ServiceDef:
    name: str
    argv: tuple[str, ...]
    port: int = 0
    depends_on: tuple[str, ...] = ()
    health: Health | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    restart: str = "on-failure"

    def ports(self) -> set[int]:
        """Ports the node must reach: the service's own and a TCP health port."""
        found = {self.port} if self.port else set()
        if self.health and self.health.tcp:
            found.add(self.health.tcp)
        return found


def from_pb(pb: common_pb2.ServiceSpec) -> ServiceDef:
    health = None
    if pb.HasField("health"):
        h = pb.health
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


def to_pb(s: ServiceDef) -> common_pb2.ServiceSpec:
    pb = common_pb2.ServiceSpec(
        name=s.name,
        command=s.argv,
        port=s.port,
        depends_on=s.depends_on,
        env=dict(s.env),
        restart=s.restart,
    )
    if s.health is not None:
        h = s.health
        pb.health.CopyFrom(
            common_pb2.HealthCheck(
                http=h.http,
                tcp=h.tcp,
                command=h.command,
                interval_seconds=h.interval,
                timeout_seconds=h.timeout,
                retries=h.retries,
                start_period_seconds=h.start_period,
            )
        )
    return pb


def levels(services: Sequence[ServiceDef]) -> list[list[ServiceDef]]:
    """Topological layers: each layer depends only on earlier ones (runs in parallel)."""
    by_name = {s.name: s for s in services}
    for s in services:
        for dep in s.depends_on:
            if dep not in by_name:
                raise InvalidArgumentError(f"service {s.name!r} depends on unknown {dep!r}")
    done: set[str] = set()
    layers: list[list[ServiceDef]] = []
    remaining = list(services)
    while remaining:
        layer = [s for s in remaining if set(s.depends_on) <= done]
        if not layer:
            cycle = ", ".join(s.name for s in remaining)
            raise InvalidArgumentError(f"services have a dependency cycle among: {cycle}")
        layers.append(layer)
        done |= {s.name for s in layer}
        remaining = [s for s in remaining if s.name not in done]
    return layers


def env_var_name(service: str) -> str:
    return "VENDETTA_SERVICE_" + service.upper().replace("-", "_")


def injected_env(service: ServiceDef, all_services: Mapping[str, ServiceDef]) -> dict[str, str]:
    """VENDETTA_SERVICE_<DEP>_URL/_PORT for each dependency, then the service's own env."""
    env: dict[str, str] = {}
    for dep in service.depends_on:
        port = all_services[dep].port
        if port:
            env[f"{env_var_name(dep)}_PORT"] = str(port)
            env[f"{env_var_name(dep)}_URL"] = f"http://localhost:{port}"
    env.update(service.env)
    return env
