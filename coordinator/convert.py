"""Domain types <-> protos: the only place the coordinator's own types meet the wire.

The servicer converts what it answers; the agent client converts what agents
send. Everything between them works on ``coordinator.models``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coordinator.models import (
    Desired,
    Environment,
    EnvironmentState,
    NodeState,
    ServiceEvent,
    ServiceState,
    ServiceStatus,
    Transfer,
    WorkspaceRecord,
    WorkspaceSource,
    WorkspaceState,
)
from vendetta.v1 import common_pb2, nodeagent_pb2
from vendetta.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:  # the agent client converts here too, and nodes import the agent client
    from coordinator.nodes import NodeConnection

_NODE_STATE = {
    NodeState.CONNECTING: pb.NODE_STATE_CONNECTING,
    NodeState.READY: pb.NODE_STATE_READY,
    NodeState.DISCONNECTED: pb.NODE_STATE_DISCONNECTED,
}
_WS_STATE = {s: getattr(pb, f"WORKSPACE_STATE_{s.name}") for s in WorkspaceState}
_DESIRED = {Desired.STOPPED: pb.DESIRED_STATE_STOPPED, Desired.RUNNING: pb.DESIRED_STATE_RUNNING}
_SERVICE_STATE = {s: getattr(common_pb2, f"SERVICE_STATE_{s.name}") for s in ServiceState}
_SERVICE_STATE_BACK = {v: k for k, v in _SERVICE_STATE.items()}
_ENV_STATE_BACK = {getattr(common_pb2, f"ENVIRONMENT_STATE_{s.name}"): s for s in EnvironmentState}


def node_to_pb(conn: NodeConnection, workspaces: int = 0) -> pb.Node:
    r = conn.record
    node = pb.Node(
        name=r.name,
        address=r.address,
        user=r.user,
        port=r.port,
        transport=r.transport,
        state=_NODE_STATE[conn.state],
        host_key_fingerprint=r.host_key_fingerprint,
        last_error=conn.last_error,
        last_seen_unix_nano=conn.last_seen_unix_nano,
        identity_file=r.identity_file,
        workspaces=workspaces,
        grace_seconds=conn.grace,
        latency_seconds=conn.latency_seconds,
    )
    if conn.info is not None:
        node.agent_version = conn.info.version
        node.providers.extend(conn.info.providers)
    return node


def workspace_to_pb(
    ws: WorkspaceRecord, services: list[ServiceStatus] | None = None
) -> pb.Workspace:
    return pb.Workspace(
        services=[service_status_to_pb(s) for s in services or []],
        name=ws.name,
        node=ws.node,
        provider=ws.provider,
        image=ws.image,
        desired=_DESIRED[ws.desired],
        state=_WS_STATE[ws.observed],
        detail=ws.detail,
        environment_id=ws.environment_id,
        addresses=ws.addresses,
        created_unix_nano=ws.created_unix_nano,
        updated_unix_nano=ws.updated_unix_nano,
        config_path=ws.config_path,
        source=source_to_pb(ws.source),
        rebuild_pending=bool(ws.built_yaml),
    )


def service_status_to_pb(s: ServiceStatus) -> common_pb2.ServiceStatus:
    return common_pb2.ServiceStatus(
        name=s.name,
        state=_SERVICE_STATE[s.state],
        pid=s.pid,
        restarts=s.restarts,
        exit_code=s.exit_code,
        detail=s.detail,
        port=s.port,
        node_endpoint=s.node_endpoint,
        last_lines=s.last_lines,
        local_address=s.local_address,
        local_note=s.local_note,
    )


def service_status_from_pb(s: common_pb2.ServiceStatus) -> ServiceStatus:
    return ServiceStatus(
        name=s.name,
        # A state added to the proto later is not one this coordinator can act on.
        state=_SERVICE_STATE_BACK.get(s.state, ServiceState.UNSPECIFIED),
        pid=s.pid,
        restarts=s.restarts,
        exit_code=s.exit_code,
        detail=s.detail,
        port=s.port,
        node_endpoint=s.node_endpoint,
        last_lines=list(s.last_lines),
        local_address=s.local_address,
        local_note=s.local_note,
    )


def service_event_from_pb(ev: common_pb2.ServiceEvent) -> ServiceEvent:
    return ServiceEvent(
        workspace=ev.workspace,
        service=service_status_from_pb(ev.service),
        message=ev.message,
        time_unix_nano=ev.time_unix_nano,
    )


def environment_from_pb(env: nodeagent_pb2.Environment) -> Environment:
    return Environment(
        workspace=env.workspace,
        provider=env.provider,
        state=_ENV_STATE_BACK.get(env.state, EnvironmentState.UNKNOWN),
        id=env.id,
        image=env.image,
        addresses=list(env.addresses),
        detail=env.detail,
        source_mode=env.source_mode,
        workdir=env.workdir,
        owner=env.owner,
    )


def transfer_to_pb(t: Transfer) -> pb.SourceTransfer:
    return pb.SourceTransfer(
        direction=t.direction,
        files=t.files,
        bytes=t.bytes,
        total_files=t.total_files,
        total_bytes=t.total_bytes,
        seconds=t.seconds,
        done=t.done,
        summary=t.summary,
        paths=t.paths,
        deleted=t.deleted,
    )


def source_to_pb(s: WorkspaceSource) -> pb.WorkspaceSource:
    return pb.WorkspaceSource(
        kind=s.kind,
        origin=s.origin,
        branch=s.branch,
        path=s.path,
        node_path=s.node_path,
        mode=s.mode,
        workdir=s.workdir,
        transport=s.transport,
        last_transfer_unix_nano=s.last_transfer_unix_nano,
        base_commit=s.base_commit,
    )
