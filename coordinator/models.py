"""The coordinator's plain domain types (protos are converted at the servicer)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class NodeState(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    DISCONNECTED = "disconnected"


class WorkspaceState(enum.Enum):
    CREATING = "creating"
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    DESTROYING = "destroying"
    UNKNOWN = "unknown"
    ERROR = "error"
    DESTROYED = "destroyed"


class Desired(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"


LOCAL_NODE = "local"


@dataclass
class NodeRecord:
    name: str
    address: str
    transport: str  # "local" | "ssh"
    user: str = ""
    port: int = 22
    host_key: str = ""  # pinned OpenSSH public key line
    host_key_fingerprint: str = ""
    identity_file: str = ""
    agent_command: list[str] = field(default_factory=list)
    created_unix_nano: int = field(default_factory=time.time_ns)


@dataclass
class WorkspaceRecord:
    name: str
    node: str
    provider: str
    image: str
    config_yaml: str = ""
    config_path: str = ""
    desired: Desired = Desired.STOPPED
    observed: WorkspaceState = WorkspaceState.CREATING
    detail: str = ""
    environment_id: str = ""
    addresses: list[str] = field(default_factory=list)
    created_unix_nano: int = field(default_factory=time.time_ns)
    updated_unix_nano: int = field(default_factory=time.time_ns)
    setup_done: bool = False  # the config's setup hook ran (once, at the first up)
