"""Domain records -> protos, at the coordinator's edge."""

from __future__ import annotations

from coordinator.models import Desired, NodeState, WorkspaceRecord, WorkspaceState
from coordinator.nodes import NodeConnection
from vendetta.v1 import common_pb2
from vendetta.v1 import coordinator_pb2 as pb

_NODE_STATE = {
    NodeState.CONNECTING: pb.NODE_STATE_CONNECTING,
    NodeState.READY: pb.NODE_STATE_READY,
    NodeState.DISCONNECTED: pb.NODE_STATE_DISCONNECTED,
}
_WS_STATE = {s: getattr(pb, f"WORKSPACE_STATE_{s.name}") for s in WorkspaceState}
_DESIRED = {Desired.STOPPED: pb.DESIRED_STATE_STOPPED, Desired.RUNNING: pb.DESIRED_STATE_RUNNING}


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
    )
    if conn.info is not None:
        node.agent_version = conn.info.version
        node.providers.extend(conn.info.providers)
    return node


def workspace_to_pb(
    ws: WorkspaceRecord, services: list[common_pb2.ServiceStatus] | None = None
) -> pb.Workspace:
    return pb.Workspace(
        services=services or [],
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
    )
