"""What the supervisor says about services: its own enum and dataclasses.

The servicer turns them into protobuf messages at the agent's edge
(``nodeagent.convert``); nothing in ``nodeagent.services`` sees generated code.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.service_state import ServiceState as ServiceState  # shared by agent and coordinator


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
