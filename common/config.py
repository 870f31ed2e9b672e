"""Project config: ``.vendetta/config.yaml``, validated before anything starts.

Errors name the file, the key and what is wrong. Short forms from the seed
configs are accepted: ``health_check: "/health"``, ``healthcheck: {url: ...}``,
``provider: lxc``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common import config_read
from common.names import NAME_RE

PROVIDERS = ("docker", "lxd", "qemu")
# Bounds that keep values inside what the agent's messages carry (int32 CPUs).
MAX_CPUS = 1024
_PROVIDER_ALIASES = {"lxc": "lxd", "kvm": "qemu"}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """'8G', '512M', '2GiB', 1024 -> bytes (binary units, as QEMU and LXD read them)."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a size: use e.g. 512M, 8G")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    size = float(m.group(1)) * 1024**power
    if not math.isfinite(size):  # int(inf) raised OverflowError (fuzzing found it)
        raise ValueError(f"{value[:40]!r} is not a size: use e.g. 512M, 8G")
    if size >= 2**63:  # bytes travel as an int64: beyond, the coordinator failed on create
        raise ValueError(f"{value[:40]!r} is too big a size (more than 8 EiB)")
    return int(size)


# Durations as docker compose writes them: units glued together, largest first.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_DURATION_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str | float) -> float:
    """'500ms', '1s', '2m', '1h30m', 1.5, '2' -> seconds (bare numbers are seconds)."""
    # null, lists, maps: not a duration (they reached .strip() and crashed; fuzzing found it)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} is not a duration: use e.g. 500ms, 1s, 2m, 1h30m or 1.5")
    if isinstance(value, int | float):
        try:
            return _finite(float(value), value)
        except OverflowError:  # an int beyond any float
            raise ValueError("too long a duration: use e.g. 500ms, 1s, 2m or 1.5") from None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(
                f"{value!r} is not a duration: use e.g. 500ms, 1s, 2m, 1h30m or 1.5"
            ) from None
        seconds = sum(float(n) * _DURATION_UNIT[u] for n, u in parts)
    return _finite(seconds, value)


def _finite(seconds: float, value: object) -> float:
    if not math.isfinite(seconds):  # inf would wait forever, nan compares false to bounds
        raise ValueError(f"{value!r} is not a finite duration: use e.g. 500ms, 1s, 2m or 1.5")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Remote(_Strict):
    node: str
    user: str | None = None
    port: int = Field(default=22, ge=1, le=65535)


class DockerSection(_Strict):
    image: str = "ubuntu:22.04"
    # The environment's main process; absent: an idle keep-alive.
    command: list[str] | None = None


def _check_size(value: str | None) -> str | None:
    if value is not None:
        parse_size(value)
    return value


class LxdSection(_Strict):
    image: str = "ubuntu/22.04"
    cpu: int | None = Field(default=None, ge=1, le=MAX_CPUS)
    memory: str | None = None

    @field_validator("memory")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        return _check_size(v)


class QemuSection(_Strict):
    image: str = "debian-12"
    cpu: int = Field(default=2, ge=1, le=MAX_CPUS)
    memory: str = "2G"
    disk: str = "20G"

    @field_validator("memory", "disk")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


class HealthCheck(_Strict):
    http: str | None = None
    tcp: int | None = Field(default=None, ge=1, le=65535)
    command: str | list[str] | None = None
    interval: Duration = Field(default=1.0, gt=0)
    timeout: Duration = Field(default=2.0, gt=0)
    retries: int = Field(default=30, ge=1, le=1_000_000)
    start_period: Duration = Field(default=0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        if isinstance(data, str):  # health_check: "/health"
            return {"http": data}
        if isinstance(data, dict) and "url" in data:  # healthcheck: {url: ...}
            data = dict(data)
            data.setdefault("http", data.pop("url"))
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> HealthCheck:
        kinds = [k for k in ("http", "tcp", "command") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of http, tcp or command")
        return self


class Service(_Strict):
    command: str | list[str]
    port: int | None = Field(default=None, ge=1, le=65535)
    # The port on the user's machine, pinned: taken is an error, never a shift.
    local_port: int | None = Field(default=None, ge=1, le=65535)
    depends_on: list[str] = Field(default_factory=list)
    health_check: HealthCheck | None = Field(default=None, alias="health_check")
    env: dict[str, str] = Field(default_factory=dict)
    restart: Literal["no", "on-failure", "always"] = "on-failure"

    @model_validator(mode="before")
    @classmethod
    def _healthcheck_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "healthcheck" in data:
            data = dict(data)
            if "health_check" in data:
                raise ValueError("give either health_check or healthcheck, not both")
            data["health_check"] = data.pop("healthcheck")
        return data


class SourceSection(_Strict):
    """Limits on what is sent of the source to a remote node: a guard against shipping a
    huge folder by accident (the message names the largest entries)."""

    max_size: str = "500M"
    max_files: int = Field(default=50_000, ge=1)

    @field_validator("max_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v

    @property
    def max_bytes(self) -> int:
        return parse_size(self.max_size)


_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$|^\d+(:\d+)?$")


class Hooks(_Strict):
    setup: str | None = None
    teardown: str | None = None


class AgentsSection(_Strict):
    """Rule files for AI coding agents: templates (paths from the project folder) that
    `workspace up` renders with the workspace's facts into its workdir (common/agent_rules.py)."""

    rules: list[str] = Field(default_factory=list, max_length=20)

    @field_validator("rules")
    @classmethod
    def _rules(cls, v: list[str]) -> list[str]:
        for path in v:
            if not path.strip() or "\0" in path or path.endswith("/"):
                raise ValueError(
                    f"{path[:80]!r}: give a template file, e.g. .vendetta/AGENTS.md.tmpl"
                )
        return v


class ProjectConfig(_Strict):
    name: str
    provider: Literal["docker", "lxd", "qemu"] = "docker"
    remote: Remote | None = None
    docker: DockerSection = Field(default_factory=DockerSection)
    lxd: LxdSection = Field(default_factory=LxdSection)
    qemu: QemuSection = Field(default_factory=QemuSection)
    services: dict[str, Service] = Field(default_factory=dict)
    hooks: Hooks | None = None
    # Where the source is inside the environment; commands, hooks and services start there.
    workdir: str = "/workspace"
    # Who works inside (owns workdir's files); absent: the image's default user.
    user: str | None = None
    source: SourceSection = Field(default_factory=SourceSection)
    agents: AgentsSection = Field(default_factory=AgentsSection)

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str) -> str:
        if not v.startswith("/") or "\0" in v or any(p == ".." for p in v.split("/")):
            raise ValueError(f"{v!r}: use an absolute path inside the environment, e.g. /workspace")
        return v.rstrip("/") or "/"

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and not _USER_RE.fullmatch(v):
            raise ValueError(f"{v!r}: use a user name (e.g. dev) or a uid (e.g. 1000 or 1000:1000)")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                "use 1-63 lowercase letters, digits and '-', starting with a letter or digit"
            )
        return v

    @field_validator("provider", mode="before")
    @classmethod
    def _provider_alias(cls, v: Any) -> Any:
        return _PROVIDER_ALIASES.get(v, v) if isinstance(v, str) else v


def _services_problems(cfg: ProjectConfig) -> list[str]:
    problems: list[str] = []
    ports: dict[int, str] = {}
    local: dict[int, str] = {}
    for name, svc in cfg.services.items():
        if not NAME_RE.fullmatch(name):
            problems.append(f"services.{name}: invalid service name (lowercase, digits, '-')")
        for dep in svc.depends_on:
            if dep not in cfg.services:
                problems.append(
                    f"services.{name}.depends_on: unknown service {dep!r} "
                    f"(known: {', '.join(sorted(cfg.services)) or 'none'})"
                )
        if svc.port is not None:
            if svc.port in ports:
                problems.append(
                    f"services.{name}.port: port {svc.port} is already used by "
                    f"service {ports[svc.port]!r}"
                )
            ports.setdefault(svc.port, name)
        if svc.local_port is not None:
            if svc.port is None:
                problems.append(
                    f"services.{name}.local_port: needs services.{name}.port (the port "
                    "inside that it reaches)"
                )
            if svc.local_port in local:
                problems.append(
                    f"services.{name}.local_port: port {svc.local_port} is already the "
                    f"local port of service {local[svc.local_port]!r}"
                )
            local.setdefault(svc.local_port, name)
    cycle = _find_cycle({n: s.depends_on for n, s in cfg.services.items()})
    if cycle:
        problems.append("services: dependency cycle " + " -> ".join(cycle))
    return problems


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, []):
            if d not in graph:
                continue
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def parse_config(text: str, source: str = ".vendetta/config.yaml") -> ProjectConfig:
    """Parse and validate config text; ConfigError lists every problem found.

    Bounded (size, depth, values) and never quoting the file: ``config_read``."""
    where = config_read.source_of(source)
    known = set(ProjectConfig.model_fields) | {
        f.alias for f in ProjectConfig.model_fields.values() if f.alias
    }
    data = config_read.load_mapping(text, where, known)
    try:
        cfg = ProjectConfig.model_validate(data)
    except ValidationError as exc:
        raise config_read.invalid(where, config_read.validation_problems(exc)) from None
    problems = _services_problems(cfg)
    if problems:
        raise config_read.invalid(where, problems)
    return cfg


def load_config(path: Path) -> ProjectConfig:
    """The config at ``path``: a regular file of at most 1 MiB (``config_read``)."""
    return parse_config(config_read.read_config_text(path), str(path))
