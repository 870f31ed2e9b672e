"""ListWorkspaces answers are reused until a workspace is written or a node's readiness moves."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from coordinator.list_cache import WorkspaceListCache
from coordinator.models import NodeRecord, NodeState, WorkspaceRecord, WorkspaceState
from coordinator.store import SqliteStore
from vendetta.v1 import coordinator_pb2 as pb


async def test_the_answer_is_built_again_only_when_it_could_differ(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    await store.add_node(NodeRecord(name="n1", address="h", transport="ssh"))
    conn = SimpleNamespace(name="n1", state=NodeState.READY)
    cache = WorkspaceListCache(store, cast(Any, SimpleNamespace(all=lambda: [conn])))
    builds: list[list[str]] = []

    async def build() -> pb.ListWorkspacesResponse:
        names = [w.name for w in await store.list_workspaces()]
        builds.append(names)
        return pb.ListWorkspacesResponse(workspaces=[pb.Workspace(name=n) for n in names])

    async def listed() -> list[str]:
        return [w.name for w in (await cache.get("", build)).workspaces]

    assert await listed() == [] and await listed() == []
    assert len(builds) == 1  # nothing changed: the same answer
    ws = WorkspaceRecord(name="w1", node="n1", provider="docker", image="i")
    await store.add_workspace(ws)
    assert await listed() == ["w1"]
    ws.observed = WorkspaceState.RUNNING
    await store.update_workspace(ws)
    await listed()
    assert len(builds) == 3  # each write: built again
    conn.state = NodeState.DISCONNECTED  # its workspaces are shown as unknown now
    await listed()
    assert len(builds) == 4
    await listed()
    await store.delete_workspace("w1")
    assert await listed() == []
    assert len(builds) == 5
    await store.close()


async def test_workspace_counts_are_taken_again_after_a_write(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    await store.add_node(NodeRecord(name="n1", address="h", transport="ssh"))
    cache = WorkspaceListCache(store, cast(Any, SimpleNamespace(all=list)))
    assert await cache.counts() == {}
    await store.add_workspace(WorkspaceRecord(name="w1", node="n1", provider="docker", image="i"))
    assert await cache.counts() == {"n1": 1}
    await store.delete_workspace("w1")
    assert await cache.counts() == {}
    await store.close()
