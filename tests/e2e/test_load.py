"""Load (issue 15): 20 concurrent clients, mixed operations, one coordinator, 3 nodes.

Three nodes behind real sshds, reached as the non-root test user MEMBER (agents by
--agent-command, run as that user; real Docker). Twenty gRPC clients on the
coordinator's socket, as the CLI talks to it, for a bounded time
(VENDETTA_LOAD_SECONDS, default 60): most drive a workspace of their own through
create, up, exec, logs, get, down, up and destroy with reads of everything in
between; a few only read (list workspaces and nodes, get, node status, orphans).
No call may fail. At the end the coordinator and the engines agree: one container
per workspace, running iff the workspace is, none without a workspace. p50/p99 per
call are printed (not asserted: the machine is shared).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Awaitable, Iterator
from typing import Any

import docker
import grpc.aio
import pytest

from tests.conftest import TEST_IMAGE
from tests.support.cli import Env, agent_id
from tests.support.member_node import member_env
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import coordinator_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.sshd]

SECONDS = float(os.environ.get("VENDETTA_LOAD_SECONDS", "60"))
CLIENTS = 20
READERS = 4  # of the clients, these only read
NODES = ("ld1", "ld2", "ld3")
CONFIG = (
    f"name: load\nprovider: docker\ndocker:\n  image: '{TEST_IMAGE}'\n"
    # sh as the container's first process ignores SIGTERM unless it traps it: a down
    # would wait out its whole grace period.
    "  command: [/bin/sh, -c, 'trap \"exit 0\" TERM; while :; do echo tick; sleep 1; done']\n"
)
CALL_TIMEOUT = 180.0  # a stuck call fails the test rather than hanging it


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with member_env("vd-load-") as (e, m):
        e.cli("server", "start")
        for i, name in enumerate(NODES):
            m.add(name, m.sshd(name, f"127.0.0.{51 + i}"))
        yield e


class Calls:
    """Each call's latency by method; any error fails the run at the end."""

    def __init__(self, stub: coordinator_pb2_grpc.CoordinatorAsyncStub) -> None:
        self.stub = stub
        self.times: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []

    async def call(self, method: str, run: Awaitable[Any], who: str) -> Any:
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(run, CALL_TIMEOUT)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else "timed out"
            self.errors.append(f"{who} {method}: {detail}")
            raise
        self.times[method].append(time.perf_counter() - start)
        return result

    def report(self) -> str:
        lines = [f"{'call':<16} {'n':>5} {'p50 ms':>8} {'p99 ms':>8}"]
        for method, took in sorted(self.times.items()):
            took.sort()
            p99 = took[min(len(took) - 1, round(0.99 * (len(took) - 1)))]
            lines.append(
                f"{method:<16} {len(took):>5} {statistics.median(took) * 1e3:>8.1f} "
                f"{p99 * 1e3:>8.1f}"
            )
        return "\n".join(lines)


async def _drain(stream: Any) -> int:
    n = 0
    async for _ in stream:
        n += 1
    return n


async def worker(calls: Calls, i: int, deadline: float) -> int:
    """Drive workspace ld-w{i} through its life, reading in between; cycles done."""
    s, rng, name = calls.stub, random.Random(i), f"ldw{i}"
    node = NODES[i % len(NODES)]
    cycles = 0

    async def reads() -> None:
        for _ in range(rng.randint(1, 3)):
            what = rng.choice(["get", "list", "nodes"])
            if what == "get":
                await calls.call(
                    "GetWorkspace", s.GetWorkspace(pb.GetWorkspaceRequest(name=name)), name
                )
            elif what == "list":
                await calls.call(
                    "ListWorkspaces", s.ListWorkspaces(pb.ListWorkspacesRequest()), name
                )
            else:
                await calls.call("ListNodes", s.ListNodes(pb.ListNodesRequest()), name)

    while time.monotonic() < deadline:
        req = pb.CreateWorkspaceRequest(
            name=name, node=node, config_yaml=CONFIG, config_path="load"
        )
        await calls.call("CreateWorkspace", s.CreateWorkspace(req), name)
        await reads()
        for _ in range(2):
            await calls.call("UpWorkspace", s.UpWorkspace(pb.WorkspaceRequest(name=name)), name)
            await reads()
            ex = pb.ExecWorkspaceRequest(name=name, argv=["echo", "hi"])
            await calls.call("ExecWorkspace", _drain(s.ExecWorkspace(ex)), name)
            logs = pb.StreamLogsRequest(name=name, tail=5)
            await calls.call("StreamLogs", _drain(s.StreamLogs(logs)), name)
            await calls.call("DownWorkspace", s.DownWorkspace(pb.WorkspaceRequest(name=name)), name)
            await reads()
            if time.monotonic() > deadline:
                break
        if rng.random() < 0.5 or time.monotonic() > deadline:
            await calls.call("UpWorkspace", s.UpWorkspace(pb.WorkspaceRequest(name=name)), name)
            if time.monotonic() > deadline:
                return cycles  # left running: the drift check sees it so
        await calls.call(
            "DestroyWorkspace", s.DestroyWorkspace(pb.WorkspaceRequest(name=name)), name
        )
        cycles += 1
    return cycles


async def reader(calls: Calls, i: int, deadline: float) -> int:
    s, rng, n = calls.stub, random.Random(100 + i), 0
    while time.monotonic() < deadline:
        node = rng.choice(NODES)
        what = rng.choice(["list", "nodes", "node", "orphans", "get"])
        if what == "list":
            await calls.call(
                "ListWorkspaces", s.ListWorkspaces(pb.ListWorkspacesRequest(node=node)), "r"
            )
        elif what == "nodes":
            await calls.call("ListNodes", s.ListNodes(pb.ListNodesRequest()), "r")
        elif what == "node":
            await calls.call("GetNode", s.GetNode(pb.GetNodeRequest(name=node)), "r")
        elif what == "orphans":
            await calls.call("ListOrphans", s.ListOrphans(pb.GetNodeRequest(name=node)), "r")
        else:
            listed = await calls.call(
                "ListWorkspaces", s.ListWorkspaces(pb.ListWorkspacesRequest()), "r"
            )
            for ws in listed.workspaces[:2]:
                try:
                    await s.GetWorkspace(pb.GetWorkspaceRequest(name=ws.name))
                except grpc.aio.AioRpcError as exc:  # destroyed meanwhile: expected
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        calls.errors.append(f"reader GetWorkspace: {exc.details()}")
        n += 1
        await asyncio.sleep(rng.uniform(0, 0.2))
    return n


async def drive(e: Env) -> tuple[Calls, list[int]]:
    sock = e.home / "coord" / "coordinator.sock"
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        calls = Calls(coordinator_pb2_grpc.CoordinatorStub(channel))
        deadline = time.monotonic() + SECONDS
        tasks = [
            reader(calls, i, deadline) if i < READERS else worker(calls, i, deadline)
            for i in range(CLIENTS)
        ]
        done = await asyncio.gather(*tasks, return_exceptions=True)
    counts = [d for d in done if isinstance(d, int)]
    for d in done:
        if isinstance(d, BaseException) and not isinstance(d, (grpc.aio.AioRpcError, TimeoutError)):
            calls.errors.append(f"client crashed: {d!r}")
    return calls, counts


def engine(e: Env) -> dict[str, list[str]]:
    ids = {agent_id(d) for d in e.agent_dirs if d.name in NODES}
    assert len(ids) == len(NODES) and "-" not in ids, ids
    client = docker.from_env()
    try:
        found: dict[str, list[str]] = defaultdict(list)
        # Low-level: no inspect per container, which a container removed meanwhile fails.
        for c in client.api.containers(all=True, filters={"label": "vendetta.managed=true"}):
            labels = c.get("Labels") or {}
            if labels.get("vendetta.agent") in ids:
                found[labels.get("vendetta.workspace", "")].append(c.get("State", ""))
        return dict(found)
    finally:
        client.close()


def test_twenty_clients_mixed_operations_three_nodes(env: Env) -> None:
    e = env
    for name in NODES:
        e.wait_node(name, "ready", within=60)
    started = time.monotonic()
    calls, counts = asyncio.run(drive(e))
    took = time.monotonic() - started
    total = sum(len(t) for t in calls.times.values())
    print(f"\n{CLIENTS} clients, {len(NODES)} nodes, {took:.0f} s: {total} calls, cycles {counts}")
    print(calls.report())
    assert not calls.errors, "\n".join(calls.errors[:20])
    listed = {w["name"]: w["state"] for w in e.json("workspace", "list")}
    on_engine = engine(e)
    assert set(on_engine) == set(listed), f"drift: workspaces {listed}, containers {on_engine}"
    for name, state in listed.items():
        assert len(on_engine[name]) == 1, (name, on_engine[name])
        running = on_engine[name][0] == "running"
        assert running == (state == "WORKSPACE_STATE_RUNNING"), (name, state, on_engine[name])
