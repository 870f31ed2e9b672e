"""The coordinator through its gRPC wire, over real in-process agents with fake providers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import grpc
import grpc.aio
import pytest

from common.errors import EngineUnavailableError, ImageNotFoundError
from common.events import EventBus
from common.rpc_errors import from_rpc_error
from providers.base import EnvState
from tests.support.fakes import Cluster, ssh_public_key_line, wait_until
from vendetta.v1 import common_pb2
from vendetta.v1 import coordinator_pb2 as pb

STOPPED = pb.WORKSPACE_STATE_STOPPED
RUNNING = pb.WORKSPACE_STATE_RUNNING
UNKNOWN = pb.WORKSPACE_STATE_UNKNOWN

CONFIG_PATH = "/home/dev/my-project/.vendetta/config.yaml"
# What read() returns at the end of a stream (grpc-stubs does not declare it).
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def create(cluster: Cluster, name: str, node: str = "node1", **kw: Any) -> pb.Workspace:
    return await cluster.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name, node=node, **kw))


async def up(cluster: Cluster, name: str) -> pb.Workspace:
    return await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name=name))


async def get(cluster: Cluster, name: str) -> pb.Workspace:
    return await cluster.stub.GetWorkspace(pb.GetWorkspaceRequest(name=name))


async def names(cluster: Cluster) -> list[str]:
    resp = await cluster.stub.ListWorkspaces(pb.ListWorkspacesRequest())
    return [w.name for w in resp.workspaces]


async def node_state(cluster: Cluster, name: str) -> int:
    resp = await cluster.stub.ListNodes(pb.ListNodesRequest())
    return {n.name: n.state for n in resp.nodes}[name]


async def wait_subscribers(bus: EventBus[Any], count: int) -> None:
    # A Watch stream subscribes once the server has started the call: wait until it has.
    await wait_until(lambda: len(bus._subscribers) >= count, f"{count} event subscriber(s)")


# ----------------------------------------------------------------------------- lifecycle


async def test_lifecycle_create_up_down_destroy(cluster: Cluster) -> None:
    fake = cluster.provider("node1")

    ws = await create(cluster, "ws1")
    assert (ws.name, ws.node, ws.provider) == ("ws1", "node1", "docker")
    assert ws.state == STOPPED
    assert ws.desired == pb.DESIRED_STATE_STOPPED
    assert ws.image == "ubuntu:22.04"
    assert ws.environment_id == fake.environments["ws1"].id
    assert fake.state_of("ws1") == EnvState.CREATED
    assert cluster.provider("local").state_of("ws1") == EnvState.ABSENT

    ws = await up(cluster, "ws1")
    assert ws.state == RUNNING
    assert ws.desired == pb.DESIRED_STATE_RUNNING
    assert fake.state_of("ws1") == EnvState.RUNNING
    got = await get(cluster, "ws1")
    assert got.state == RUNNING
    assert list(got.addresses) == ["10.0.0.2"]

    ws = await cluster.stub.DownWorkspace(pb.WorkspaceRequest(name="ws1"))
    assert ws.state == STOPPED
    assert ws.desired == pb.DESIRED_STATE_STOPPED
    assert fake.state_of("ws1") == EnvState.STOPPED
    assert (await get(cluster, "ws1")).state == STOPPED

    await cluster.stub.DestroyWorkspace(pb.WorkspaceRequest(name="ws1"))
    err = await rpc_error(get(cluster, "ws1"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert fake.state_of("ws1") == EnvState.ABSENT
    assert await names(cluster) == []


async def test_create_without_node_uses_local(cluster: Cluster) -> None:
    ws = await cluster.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name="ws1"))
    assert ws.node == "local"
    assert cluster.provider("local").state_of("ws1") == EnvState.CREATED
    assert cluster.provider("node1").state_of("ws1") == EnvState.ABSENT


async def test_create_takes_node_image_and_command_from_config(cluster: Cluster) -> None:
    config = (
        "name: my-project\n"
        "remote: {node: node1}\n"
        "docker: {image: 'alpine:3.20', command: [sleep, infinity]}\n"
    )
    ws = await cluster.stub.CreateWorkspace(
        pb.CreateWorkspaceRequest(name="ws1", config_yaml=config, config_path=CONFIG_PATH)
    )
    assert ws.node == "node1"
    assert ws.image == "alpine:3.20"
    assert ws.config_path == CONFIG_PATH
    spec = cluster.provider("node1").environments["ws1"].spec
    assert spec.image == "alpine:3.20"
    assert list(spec.command or []) == ["sleep", "infinity"]


# ----------------------------------------------------------------------------- idempotency


async def test_up_twice_and_down_twice_succeed(cluster: Cluster) -> None:
    await create(cluster, "ws1")
    assert (await up(cluster, "ws1")).state == RUNNING
    assert (await up(cluster, "ws1")).state == RUNNING
    assert cluster.provider("node1").state_of("ws1") == EnvState.RUNNING
    for _ in range(2):
        ws = await cluster.stub.DownWorkspace(pb.WorkspaceRequest(name="ws1"))
        assert ws.state == STOPPED
    assert cluster.provider("node1").state_of("ws1") == EnvState.STOPPED


async def test_create_with_same_request_id_answers_once(cluster: Cluster) -> None:
    first = await create(cluster, "ws1", request_id="req-1")
    again = await create(cluster, "ws1", request_id="req-1")
    assert again == first
    creates = [c for c in cluster.provider("node1").calls if c == ("create", "ws1")]
    assert len(creates) == 1, "a retried request must not reach the agent again"

    err = await rpc_error(create(cluster, "ws1", request_id="req-2"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    details = err.details() or ""
    assert "node1" in details
    assert "vendetta workspace destroy ws1" in details


async def test_up_with_same_request_id_answers_once(cluster: Cluster) -> None:
    await create(cluster, "ws1")
    first = await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name="ws1", request_id="u-1"))
    again = await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name="ws1", request_id="u-1"))
    assert again == first
    assert cluster.provider("node1").calls.count(("start", "ws1")) == 1


async def test_request_id_reused_for_another_method_is_refused(cluster: Cluster) -> None:
    await create(cluster, "ws1", request_id="same")
    err = await rpc_error(
        cluster.stub.UpWorkspace(pb.WorkspaceRequest(name="ws1", request_id="same"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CreateWorkspace" in (err.details() or "")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["Bad", "-ws", "a_b", "x" * 64, ""])
async def test_invalid_workspace_name(cluster: Cluster, name: str) -> None:
    err = await rpc_error(create(cluster, name))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lowercase letters, digits and '-'" in (err.details() or "")
    assert await names(cluster) == []


async def test_unknown_workspace_lists_known_names(cluster: Cluster) -> None:
    await create(cluster, "alpha")
    await create(cluster, "beta")
    for call in (
        get(cluster, "nope"),
        up(cluster, "nope"),
        cluster.stub.DownWorkspace(pb.WorkspaceRequest(name="nope")),
        cluster.stub.DestroyWorkspace(pb.WorkspaceRequest(name="nope")),
    ):
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        details = err.details() or ""
        assert "'nope'" in details
        assert "alpha, beta" in details


async def test_create_on_unknown_node(cluster: Cluster) -> None:
    err = await rpc_error(create(cluster, "ws1", node="ghost"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    details = err.details() or ""
    assert "vendetta node add ghost" in details
    assert "local, node1" in details
    assert await names(cluster) == []


async def test_create_with_unknown_provider(cluster: Cluster) -> None:
    err = await rpc_error(create(cluster, "ws1", provider="podman"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown provider 'podman'" in (err.details() or "")
    assert await names(cluster) == []


async def test_create_with_provider_the_node_lacks(cluster: Cluster) -> None:
    # The coordinator knows lxd; the fake agent only offers docker.
    err = await rpc_error(create(cluster, "ws1", provider="lxc"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert "'lxd' is not available on this node" in details
    assert "docker" in details
    assert await names(cluster) == []


async def test_create_with_malformed_config(cluster: Cluster) -> None:
    err = await rpc_error(
        create(cluster, "ws1", config_yaml="name: ws1\nbogus_key: 1\n", config_path=CONFIG_PATH)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert CONFIG_PATH in details
    assert "bogus_key" in details
    assert await names(cluster) == []
    assert cluster.provider("node1").calls == []


async def test_create_with_invalid_size_in_config(cluster: Cluster) -> None:
    config = "name: ws1\nprovider: qemu\nqemu: {memory: lots}\n"
    err = await rpc_error(create(cluster, "ws1", config_yaml=config, config_path=CONFIG_PATH))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "qemu.memory" in (err.details() or "")


async def test_list_workspaces_of_unknown_node(cluster: Cluster) -> None:
    err = await rpc_error(cluster.stub.ListWorkspaces(pb.ListWorkspacesRequest(node="ghost")))
    assert err.code() == grpc.StatusCode.NOT_FOUND


# ----------------------------------------------------------------------------- agent failures


async def test_agent_create_failure_reaches_client_and_records_nothing(cluster: Cluster) -> None:
    fake = cluster.provider("node1")
    message = "image 'nope:1' is not on node node1: pull it or fix docker.image"
    fake.fail_create = ImageNotFoundError(message)

    err = await rpc_error(create(cluster, "ws1"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == message
    assert isinstance(from_rpc_error(err), ImageNotFoundError)
    assert await names(cluster) == []
    assert (await rpc_error(get(cluster, "ws1"))).code() == grpc.StatusCode.NOT_FOUND

    # Nothing half-created: the same name works once the image is there.
    fake.fail_create = None
    assert (await create(cluster, "ws1")).state == STOPPED


async def test_agent_start_failure_leaves_desired_state_unchanged(cluster: Cluster) -> None:
    await create(cluster, "ws1")
    cluster.provider("node1").fail_start = EngineUnavailableError("docker is down on node1")
    err = await rpc_error(up(cluster, "ws1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "docker is down" in (err.details() or "")
    ws = await get(cluster, "ws1")
    assert ws.state == pb.WORKSPACE_STATE_ERROR
    assert ws.desired == pb.DESIRED_STATE_STOPPED
    assert "docker is down" in ws.detail


# ----------------------------------------------------------------------------- node connection


async def test_node_disconnect_and_reconnect(fast_reconnect: None, cluster: Cluster) -> None:
    fake = cluster.provider("node1")
    transport = cluster.transport("node1")
    await create(cluster, "ws1")
    await up(cluster, "ws1")
    connects = transport.connects

    transport.unreachable = True
    transport.drop()
    await wait_until(
        lambda: _is(node_state(cluster, "node1"), pb.NODE_STATE_DISCONNECTED),
        "node1 to be DISCONNECTED",
    )
    assert await node_state(cluster, "local") == pb.NODE_STATE_READY

    ws = await get(cluster, "ws1")
    assert ws.state == UNKNOWN
    assert ws.desired == pb.DESIRED_STATE_RUNNING

    err = await rpc_error(up(cluster, "ws1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    details = err.details() or ""
    assert "'node1'" in details
    assert "vendetta node status node1" in details
    for call in (
        cluster.stub.DownWorkspace(pb.WorkspaceRequest(name="ws1")),
        cluster.stub.DestroyWorkspace(pb.WorkspaceRequest(name="ws1")),
    ):
        assert (await rpc_error(call)).code() == grpc.StatusCode.UNAVAILABLE
    # The record is kept, and so is the environment.
    assert await names(cluster) == ["ws1"]
    assert fake.state_of("ws1") == EnvState.RUNNING
    node = (await cluster.stub.GetNode(pb.GetNodeRequest(name="node1"))).last_error
    assert "fake network is down" in node

    # While away, the environment stopped behind the coordinator's back.
    fake.set_state("ws1", EnvState.STOPPED)
    transport.unreachable = False
    await wait_until(
        lambda: _is(node_state(cluster, "node1"), pb.NODE_STATE_READY), "node1 to be READY"
    )
    assert transport.connects > connects
    # The reconciler restores the desired state.
    await wait_until(lambda: fake.state_of("ws1") == EnvState.RUNNING, "ws1 restarted")
    await wait_until(lambda: _is_ws_state(get(cluster, "ws1"), RUNNING), "ws1 RUNNING again")
    assert (await get(cluster, "ws1")).desired == pb.DESIRED_STATE_RUNNING


async def test_reconnect_observes_a_stopped_workspace_without_starting_it(
    fast_reconnect: None, cluster: Cluster
) -> None:
    fake = cluster.provider("node1")
    transport = cluster.transport("node1")
    await create(cluster, "ws1")  # desired: stopped
    transport.unreachable = True
    transport.drop()
    await wait_until(
        lambda: _is(node_state(cluster, "node1"), pb.NODE_STATE_DISCONNECTED), "DISCONNECTED"
    )
    assert (await get(cluster, "ws1")).state == UNKNOWN
    transport.unreachable = False
    await wait_until(lambda: _is(node_state(cluster, "node1"), pb.NODE_STATE_READY), "READY")
    await wait_until(lambda: _is_ws_state(get(cluster, "ws1"), STOPPED), "ws1 STOPPED")
    assert ("start", "ws1") not in fake.calls


async def test_destroy_while_disconnected_needs_force(
    fast_reconnect: None, cluster: Cluster
) -> None:
    fake = cluster.provider("node1")
    transport = cluster.transport("node1")
    await create(cluster, "ws1")
    transport.unreachable = True
    transport.drop()
    await wait_until(
        lambda: _is(node_state(cluster, "node1"), pb.NODE_STATE_DISCONNECTED), "DISCONNECTED"
    )
    err = await rpc_error(cluster.stub.DestroyWorkspace(pb.WorkspaceRequest(name="ws1")))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    details = err.details() or ""
    assert "Nothing was destroyed" in details
    assert "vendetta workspace destroy ws1 --force" in details
    assert await names(cluster) == ["ws1"]

    await cluster.stub.DestroyWorkspace(pb.WorkspaceRequest(name="ws1", force=True))
    assert await names(cluster) == []
    # Forgotten, not destroyed: the environment is still on the node.
    assert fake.state_of("ws1") == EnvState.CREATED


async def test_reconnect_reports_an_environment_removed_behind_our_back(
    fast_reconnect: None, cluster: Cluster
) -> None:
    fake = cluster.provider("node1")
    transport = cluster.transport("node1")
    await create(cluster, "ws1")
    await up(cluster, "ws1")
    transport.unreachable = True
    transport.drop()
    await wait_until(
        lambda: _is(node_state(cluster, "node1"), pb.NODE_STATE_DISCONNECTED), "DISCONNECTED"
    )
    await fake.destroy("ws1")
    transport.unreachable = False
    await wait_until(
        lambda: _is_ws_state(get(cluster, "ws1"), pb.WORKSPACE_STATE_ERROR), "ws1 in ERROR"
    )
    ws = await get(cluster, "ws1")
    assert "missing on node node1" in ws.detail
    assert "vendetta workspace destroy ws1" in ws.detail
    # The reconciler does not recreate it silently; destroy still cleans up.
    assert fake.state_of("ws1") == EnvState.ABSENT
    await cluster.stub.DestroyWorkspace(pb.WorkspaceRequest(name="ws1"))
    assert await names(cluster) == []


async def test_dropped_connection_is_reopened(fast_reconnect: None, cluster: Cluster) -> None:
    transport = cluster.transport("node1")
    connects = transport.connects
    transport.drop()
    await wait_until(lambda: transport.connects > connects, "a reconnect")
    await wait_until(lambda: _is(node_state(cluster, "node1"), pb.NODE_STATE_READY), "READY")
    # The new connection works.
    assert (await create(cluster, "ws1")).state == STOPPED


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _is_ws_state(ws: Awaitable[pb.Workspace], expected: int) -> bool:
    return (await ws).state == expected


# ----------------------------------------------------------------------------- logs and exec


async def _read(call: Any, timeout: float = 5.0) -> Any:
    msg = await asyncio.wait_for(call.read(), timeout)
    assert msg is not EOF, "the stream ended early"
    return msg


async def test_stream_logs_in_order_with_tail(cluster: Cluster) -> None:
    fake = cluster.provider("node1")
    await create(cluster, "ws1")
    await up(cluster, "ws1")
    for i in range(5):
        fake.add_log("ws1", f"line {i}", stream="stderr" if i == 3 else "stdout")

    texts: list[str] = []
    streams: list[str] = []
    async for batch in cluster.stub.StreamLogs(pb.StreamLogsRequest(name="ws1")):
        texts.extend(line.text for line in batch.lines)
        streams.extend(line.stream for line in batch.lines)
    assert texts == [f"line {i}" for i in range(5)]
    assert streams[3] == "stderr"

    tail = [
        line.text
        async for batch in cluster.stub.StreamLogs(pb.StreamLogsRequest(name="ws1", tail=2))
        for line in batch.lines
    ]
    assert tail == ["line 3", "line 4"]


async def test_stream_logs_negative_tail_is_refused(cluster: Cluster) -> None:
    await create(cluster, "ws1")
    call = cluster.stub.StreamLogs(pb.StreamLogsRequest(name="ws1", tail=-1))
    err = await rpc_error(call.read())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stream_logs_of_unknown_workspace(cluster: Cluster) -> None:
    call = cluster.stub.StreamLogs(pb.StreamLogsRequest(name="nope"))
    err = await rpc_error(call.read())
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_stream_logs_follow_gets_new_lines(cluster: Cluster) -> None:
    fake = cluster.provider("node1")
    await create(cluster, "ws1")
    await up(cluster, "ws1")
    fake.add_log("ws1", "before")

    call = cluster.stub.StreamLogs(pb.StreamLogsRequest(name="ws1", follow=True))
    try:
        first = await _read(call)
        assert [line.text for line in first.lines] == ["before"]
        assert fake.active_log_streams == 1
        fake.add_log("ws1", "after")
        second = await _read(call)
        assert [line.text for line in second.lines] == ["after"]
    finally:
        call.cancel()
    # Cancelling the client's call ends the agent's stream too (no leaked follower).
    await wait_until(lambda: fake.active_log_streams == 0, "the agent's log stream to end")


async def test_stream_logs_follow_ends_when_environment_stops(cluster: Cluster) -> None:
    fake = cluster.provider("node1")
    await create(cluster, "ws1")
    await up(cluster, "ws1")
    fake.add_log("ws1", "only")
    call = cluster.stub.StreamLogs(pb.StreamLogsRequest(name="ws1", follow=True))
    assert [line.text for line in (await _read(call)).lines] == ["only"]
    fake.set_state("ws1", EnvState.STOPPED)
    assert await asyncio.wait_for(call.read(), 5.0) is EOF
    assert await call.code() == grpc.StatusCode.OK


async def _exec(cluster: Cluster, **kw: Any) -> list[common_pb2.ExecOutput]:
    return [out async for out in cluster.stub.ExecWorkspace(pb.ExecWorkspaceRequest(**kw))]


async def test_exec_output_and_exit_code(cluster: Cluster) -> None:
    fake = cluster.provider("node1")
    await create(cluster, "ws1")
    await up(cluster, "ws1")

    outputs = await _exec(
        cluster, name="ws1", argv=["echo", "hello"], env={"A": "1"}, workdir="/src"
    )
    assert [o.WhichOneof("output") for o in outputs] == ["stdout", "exit_code"]
    assert outputs[0].stdout == b"echo hello\n"
    assert outputs[-1].exit_code == 0
    assert fake.exec_calls == [("ws1", ["echo", "hello"], {"A": "1"}, "/src")]

    fake.exec_exit_code = 3
    fake.exec_stderr = b"oops\n"
    outputs = await _exec(cluster, name="ws1", argv=["false"])
    assert b"".join(o.stderr for o in outputs) == b"oops\n"
    assert outputs[-1].WhichOneof("output") == "exit_code"
    assert outputs[-1].exit_code == 3


async def test_exec_errors(cluster: Cluster) -> None:
    await create(cluster, "ws1")
    err = await rpc_error(_exec(cluster, name="ws1", argv=[]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The fake refuses exec in a stopped environment; the agent's error comes through.
    err = await rpc_error(_exec(cluster, name="ws1", argv=["true"]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not running" in (err.details() or "")


# ----------------------------------------------------------------------------- watch


async def test_watch_workspace_streams_current_state_then_changes(cluster: Cluster) -> None:
    await create(cluster, "ws1")
    bus = cluster.coordinator.workspaces.events
    call = cluster.stub.WatchWorkspace(pb.WatchWorkspaceRequest(name="ws1"))
    try:
        first = await _read(call)
        assert first.workspace.name == "ws1"
        assert first.workspace.state == STOPPED
        await wait_subscribers(bus, 1)

        await up(cluster, "ws1")
        await create(cluster, "other")  # events of other workspaces are filtered out
        seen: list[tuple[str, int]] = []
        while not seen or seen[-1][1] != RUNNING:
            ev = await _read(call)
            seen.append((ev.workspace.name, ev.workspace.state))
        assert seen == [("ws1", pb.WORKSPACE_STATE_STARTING), ("ws1", RUNNING)]
    finally:
        call.cancel()


async def test_watch_all_workspaces_sees_create(cluster: Cluster) -> None:
    await create(cluster, "old")
    bus = cluster.coordinator.workspaces.events
    call = cluster.stub.WatchWorkspace(pb.WatchWorkspaceRequest())
    try:
        first = await _read(call)
        assert (first.workspace.name, first.workspace.state) == ("old", STOPPED)
        await wait_subscribers(bus, 1)
        await create(cluster, "new")
        events = [await _read(call), await _read(call)]
        assert [(e.workspace.name, e.workspace.state) for e in events] == [
            ("new", pb.WORKSPACE_STATE_CREATING),
            ("new", STOPPED),
        ]
        assert events[-1].message == "created"
    finally:
        call.cancel()


async def test_watch_workspace_rejects_invalid_name(cluster: Cluster) -> None:
    call = cluster.stub.WatchWorkspace(pb.WatchWorkspaceRequest(name="Not Valid"))
    assert (await rpc_error(call.read())).code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_does_not_lose_events_between_snapshot_and_subscription(
    cluster: Cluster,
) -> None:
    await create(cluster, "ws1")
    coordinator = cluster.coordinator
    store = coordinator.store
    original = store.get_workspace
    armed = True

    async def get_workspace_then_up(name: str) -> Any:
        # The watcher reads the snapshot; the workspace starts right after.
        nonlocal armed
        result = await original(name)
        if armed:
            armed = False
            await coordinator.workspaces.up(name)
        return result

    store.get_workspace = get_workspace_then_up  # type: ignore[method-assign]
    call = cluster.stub.WatchWorkspace(pb.WatchWorkspaceRequest(name="ws1"))
    try:
        states = [(await _read(call)).workspace.state]
        while states[-1] != RUNNING:
            states.append((await _read(call, timeout=1.0)).workspace.state)
    finally:
        call.cancel()
        store.get_workspace = original  # type: ignore[method-assign]
    assert states[-1] == RUNNING


# ----------------------------------------------------------------------------- nodes


async def test_list_nodes(cluster: Cluster) -> None:
    await create(cluster, "ws1")
    resp = await cluster.stub.ListNodes(pb.ListNodesRequest())
    nodes = {n.name: n for n in resp.nodes}
    assert sorted(nodes) == ["local", "node1"]
    assert all(n.state == pb.NODE_STATE_READY for n in nodes.values())
    assert nodes["node1"].workspaces == 1
    assert nodes["local"].workspaces == 0
    assert [p.name for p in nodes["node1"].providers] == ["docker"]
    assert nodes["node1"].providers[0].ready


async def test_watch_nodes_reports_a_connection_reopened_within_the_grace(
    fast_reconnect: None, cluster: Cluster
) -> None:
    call = cluster.stub.WatchNodes(pb.WatchNodesRequest())
    try:
        current = [(await _read(call)).node for _ in range(2)]
        assert [(n.name, n.state) for n in current] == [
            ("local", pb.NODE_STATE_READY),
            ("node1", pb.NODE_STATE_READY),
        ]
        # The stream subscribes once the server has started the call: wait until it has.
        await wait_subscribers(cluster.coordinator.nodes.events, 1)
        cluster.transport("node1").drop()
        events: list[pb.NodeEvent] = []
        while not events or events[-1].message != "connected":
            ev = await _read(call)
            if ev.node.name == "node1":
                events.append(ev)
        # Back at once, within the grace period: said, but never `disconnected`.
        assert [e.node.state for e in events] == [pb.NODE_STATE_READY, pb.NODE_STATE_READY]
        assert events[0].message == "connection lost; reconnecting"
    finally:
        call.cancel()


async def test_remove_node(cluster: Cluster) -> None:
    await create(cluster, "ws1")
    err = await rpc_error(cluster.stub.RemoveNode(pb.RemoveNodeRequest(name="node1")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert "ws1" in details
    assert "--force" in details
    assert await names(cluster) == ["ws1"]
    transport = cluster.transport("node1")
    assert transport.agent_stops == 0

    await cluster.stub.RemoveNode(pb.RemoveNodeRequest(name="node1", force=True))
    resp = await cluster.stub.ListNodes(pb.ListNodesRequest())
    assert [n.name for n in resp.nodes] == ["local"]
    assert await names(cluster) == []
    assert transport.agent_stops == 1  # its agent was stopped, not just left behind
    assert cluster.transport("node1").closes >= 1

    err = await rpc_error(cluster.stub.RemoveNode(pb.RemoveNodeRequest(name="node1")))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_remove_empty_node_without_force(cluster: Cluster) -> None:
    await cluster.stub.RemoveNode(pb.RemoveNodeRequest(name="node1"))
    resp = await cluster.stub.ListNodes(pb.ListNodesRequest())
    assert [n.name for n in resp.nodes] == ["local"]


async def test_local_node_cannot_be_removed(cluster: Cluster) -> None:
    for force in (False, True):
        req = pb.RemoveNodeRequest(name="local", force=force)
        err = await rpc_error(cluster.stub.RemoveNode(req))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot be removed" in (err.details() or "")
    resp = await cluster.stub.ListNodes(pb.ListNodesRequest())
    assert "local" in [n.name for n in resp.nodes]


async def test_add_node(cluster: Cluster) -> None:
    await cluster.start_agent("node2")
    node = await cluster.stub.AddNode(
        pb.AddNodeRequest(
            name="node2", address="node2.test", user="dev", host_key=ssh_public_key_line()
        )
    )
    assert node.state == pb.NODE_STATE_READY
    assert node.host_key_fingerprint.startswith("SHA256:")
    assert node.port == 22
    assert [p.name for p in node.providers] == ["docker"]

    ws = await create(cluster, "ws2", node="node2")
    assert ws.node == "node2"
    assert cluster.provider("node2").state_of("ws2") == EnvState.CREATED

    err = await rpc_error(
        cluster.stub.AddNode(
            pb.AddNodeRequest(name="node2", address="elsewhere", host_key=ssh_public_key_line())
        )
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "vendetta node remove node2" in (err.details() or "")


async def test_add_node_refusals(cluster: Cluster) -> None:
    key = ssh_public_key_line()
    cases = [
        (pb.AddNodeRequest(name="Bad!", address="x", host_key=key), "invalid node name"),
        (pb.AddNodeRequest(name="local", address="x", host_key=key), "coordinator's own node"),
        (pb.AddNodeRequest(name="n2", host_key=key), "no address"),
        (pb.AddNodeRequest(name="n2", address="x"), "no host key"),
        (pb.AddNodeRequest(name="n2", address="x", host_key="junk"), "not an OpenSSH public key"),
        (pb.AddNodeRequest(name="n2", address="x", host_key=key, grace_seconds=-1), "--grace"),
        (
            pb.AddNodeRequest(name="n2", address="x", host_key=key, grace_seconds=float("nan")),
            "--grace",
        ),
    ]
    for request, expected in cases:
        err = await rpc_error(cluster.stub.AddNode(request))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in (err.details() or "")
    resp = await cluster.stub.ListNodes(pb.ListNodesRequest())
    assert [n.name for n in resp.nodes] == ["local", "node1"]


async def test_add_unreachable_node_records_nothing(cluster: Cluster) -> None:
    # No agent runs for node3: the fake transport refuses to connect.
    err = await rpc_error(
        cluster.stub.AddNode(
            pb.AddNodeRequest(name="node3", address="node3.test", host_key=ssh_public_key_line())
        )
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "node3" in (err.details() or "")
    resp = await cluster.stub.ListNodes(pb.ListNodesRequest())
    assert [n.name for n in resp.nodes] == ["local", "node1"]


async def test_test_node(cluster: Cluster) -> None:
    resp = await cluster.stub.TestNode(pb.GetNodeRequest(name="node1"))
    assert resp.node.name == "node1"
    assert resp.node.state == pb.NODE_STATE_READY
    assert resp.agent_rtt_seconds > 0


# ----------------------------------------------------------------------------- persistence


async def test_state_survives_a_coordinator_restart(cluster: Cluster) -> None:
    await create(cluster, "ws1")
    await up(cluster, "ws1")
    await create(cluster, "ws2", node="local")
    before = {
        w.name: w
        for w in (await cluster.stub.ListWorkspaces(pb.ListWorkspacesRequest())).workspaces
    }

    await cluster.restart_coordinator()

    resp = await cluster.stub.ListNodes(pb.ListNodesRequest())
    assert [(n.name, n.address) for n in resp.nodes] == [
        ("local", "localhost"),
        ("node1", "node1.test"),
    ]
    after = {
        w.name: w
        for w in (await cluster.stub.ListWorkspaces(pb.ListWorkspacesRequest())).workspaces
    }
    assert sorted(after) == ["ws1", "ws2"]
    for name in after:
        for attr in ("node", "provider", "image", "desired", "environment_id", "created_unix_nano"):
            assert getattr(after[name], attr) == getattr(before[name], attr), (name, attr)
    await wait_until(lambda: _is_ws_state(get(cluster, "ws1"), RUNNING), "ws1 RUNNING")
    assert (await get(cluster, "ws2")).state == STOPPED
    # Still manageable after the restart.
    ws = await cluster.stub.DownWorkspace(pb.WorkspaceRequest(name="ws1"))
    assert ws.state == STOPPED
    assert cluster.provider("node1").state_of("ws1") == EnvState.STOPPED


async def test_server_info_and_connection_info(cluster: Cluster) -> None:
    info = await cluster.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.socket_path == str(cluster.coordinator.socket)
    assert info.state_path.endswith("state.db")
    await create(cluster, "ws1")
    conn = await cluster.stub.GetConnectionInfo(pb.GetWorkspaceRequest(name="ws1"))
    assert (conn.workspace, conn.node, conn.provider) == ("ws1", "node1", "docker")
    assert conn.environment_id == cluster.provider("node1").environments["ws1"].id
    assert list(conn.exec_hint) == ["vendetta", "workspace", "connect", "ws1"]
