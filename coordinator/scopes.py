"""Which scope each Coordinator method needs over the TLS listener: the one table.

A method missing here is refused on the listener (and fails
tests/unit/test_scopes.py, which walks the service descriptor). ``workspace``
says where an operate call names its workspace, so a token limited to some
workspaces is held to them: a field of the request, or of the first message's
``start`` for a streamed request.
"""

from __future__ import annotations

import dataclasses

SERVICE = "vendetta.v1.Coordinator"


@dataclasses.dataclass(frozen=True)
class Rule:
    scope: str  # read | operate | admin
    workspace: str = ""  # the field naming the workspace ("start.workspace" for streams)


_READ = Rule("read")
_ADMIN = Rule("admin")
_OPERATE_NAME = Rule("operate", "name")
_OPERATE_START = Rule("operate", "start.workspace")

METHODS: dict[str, Rule] = {
    "GetServerInfo": _READ,
    # nodes: seeing them is read (connect asks a node's capabilities); changing them admin
    "ScanHostKey": _ADMIN,
    "AddNode": _ADMIN,
    "ListNodes": _READ,
    "GetNode": _READ,
    "TestNode": _ADMIN,
    "RemoveNode": _ADMIN,
    "UpgradeNodes": _ADMIN,
    "TrustNode": _ADMIN,
    "WatchNodes": _READ,
    # orphans: environments on a node no workspace owns (maybe another coordinator's);
    # `node status` lists them
    "ListOrphans": _READ,
    "AdoptWorkspace": _ADMIN,
    "CleanNode": _ADMIN,
    # workspaces
    "CreateWorkspace": _OPERATE_NAME,
    "UpWorkspace": _OPERATE_NAME,
    "RebuildWorkspace": _OPERATE_NAME,
    "DownWorkspace": _OPERATE_NAME,
    "DestroyWorkspace": _OPERATE_NAME,
    "GetWorkspace": _READ,
    "ListWorkspaces": _READ,
    "WatchWorkspace": _READ,
    "StreamLogs": _READ,
    "ExecWorkspace": _OPERATE_NAME,
    "GetConnectionInfo": _READ,
    "Connect": _OPERATE_START,
    "Dial": _OPERATE_START,
    # refused on the listener all the same: the route is a socket on this machine
    "DialRoute": Rule("operate", "workspace"),
    "Listen": _OPERATE_START,
    "PushWorkspace": _OPERATE_NAME,
    # Pull writes into the workspace's source on the coordinator's own disk (the owner's
    # folder or worktree): over the network, only for admin.
    "PullWorkspace": _ADMIN,
    # images
    "ListImages": _READ,
    "ImportImage": _ADMIN,
    # tokens
    "CreateToken": _ADMIN,
    "ListTokens": _ADMIN,
    "RevokeToken": _ADMIN,
    # a line in a workspace's events (the MCP server's record of its calls): anyone who
    # may read, held to a limited token's workspaces
    "RecordWorkspaceEvent": Rule("read", "name"),
}

# Served on the listener besides the Coordinator: health needs no token (a load
# balancer probes it); reflection describes the API, so it needs a token of any scope.
OPEN = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
REFLECTION = frozenset(
    {
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


def rule_for(full_method: str) -> Rule | None:
    """The rule for ``/vendetta.v1.Coordinator/Name``; None: not a Coordinator method
    this table knows (refused)."""
    if full_method in REFLECTION:
        return _READ
    service, _, method = full_method.lstrip("/").partition("/")
    return METHODS.get(method) if service == SERVICE else None
