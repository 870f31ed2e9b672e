"""What the supervisor says about services: its own enum and dataclasses.

The servicer turns them into protobuf messages at the agent's edge
(``nodeagent.convert``); nothing in ``nodeagent.services`` sees generated code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ServiceState(enum.Enum):
    PENDING = "pending"  # waiting for its dependencies
    STARTING = "starting"  # running, health not yet passed
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # was healthy, checks now fail
    EXITED = "exited"  # ended (stopped, or no restart wanted)
    FAILED = "failed"  # never became healthy, or gave up restarting
    STOPPED = "stopped"  # stopped by `down`


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: ServiceState
    pid: int = 0
    restarts: int = 0
    exit_code: int = 0
    detail: str = ""  # why it failed, what the health check said
    port: int = 0  # the port inside the environment
    node_endpoint: str = ""  # host:port that reaches it on the node
    last_lines: tuple[str, ...] = ()  # end of its log when it failed


@dataclass(frozen=True)
class ServiceEvent:
    workspace: str
    service: ServiceStatus
    message: str
    time_unix_nano: int
