"""The coordinator's plain domain types (protos are converted at the servicer)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from common.service_state import ServiceState as ServiceState  # shared by agent and coordinator


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


class EnvironmentState(enum.Enum):
    """What a node's agent reports of a workspace's environment."""

    UNSPECIFIED = "unspecified"
    ABSENT = "absent"
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


@dataclass
class Environment:
    """One observation of a workspace's environment on its node."""

    workspace: str
    provider: str = ""
    state: EnvironmentState = EnvironmentState.UNSPECIFIED
    id: str = ""
    image: str = ""
    addresses: list[str] = field(default_factory=list)
    detail: str = ""
    source_mode: str = ""  # "mounted" | "copied" | "": how the source is inside
    workdir: str = ""
    owner: str = ""  # the coordinator that made it (its id); "": not labelled


@dataclass
class WorkspaceSource:
    """Where a workspace's code comes from (on this machine) and where it went (the node)."""

    kind: str = ""  # "git" | "folder" | "": none
    origin: str = ""  # the folder or git URL given
    branch: str = ""  # git: the workspace's branch
    path: str = ""  # on this machine: the worktree, the clone, or the folder itself
    repo: str = ""  # git: the repository the worktree belongs to ("" for a clone)
    node_path: str = ""  # on the node: the folder mounted at workdir
    mode: str = ""  # "mounted" | "copied": as the environment reports it
    workdir: str = ""
    transport: str = ""  # "live" (the node shares this disk) | "shipped"
    last_transfer_unix_nano: int = 0
    base_commit: str = ""  # git: the commit the branch started from


@dataclass
class Transfer:
    """Progress of a transfer of a workspace's source, then (done) what it did."""

    direction: str  # "send" | "receive"
    files: int = 0
    bytes: int = 0
    total_files: int = 0
    total_bytes: int = 0
    seconds: float = 0.0
    done: bool = False
    summary: str = ""
    paths: list[str] = field(default_factory=list)
    deleted: int = 0


@dataclass
class ServiceStatus:
    """A service of a workspace as last reported by its agent, plus where it is here."""

    name: str
    state: ServiceState = ServiceState.UNSPECIFIED
    pid: int = 0
    restarts: int = 0
    exit_code: int = 0
    detail: str = ""
    port: int = 0  # the port inside the environment
    node_endpoint: str = ""  # host:port that reaches it on the node
    last_lines: list[str] = field(default_factory=list)  # end of its log when it failed
    local_address: str = ""  # where it is on the user's machine (set by the coordinator)
    local_note: str = ""  # e.g. why the local port differs from the service's


@dataclass
class ServiceEvent:
    """A change of one service, as the agent announces it."""

    workspace: str
    service: ServiceStatus
    message: str = ""
    time_unix_nano: int = 0


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
    grace_seconds: float = 0.0  # silence before `disconnected`; 0: the coordinator's default


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
    source: WorkspaceSource = field(default_factory=WorkspaceSource)
    # The config its environment was made from, when `up` took a newer one that needs
    # a rebuild ("": config_yaml).
    built_yaml: str = ""
