"""Plain service definitions (made from protos at the agent's edge, in
``nodeagent.convert``) and their ordering."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.errors import InvalidArgumentError


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
