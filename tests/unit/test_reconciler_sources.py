"""A destroy or a create that the reconciler finishes after a crash also removes the
node's copy of the workspace's source (DeleteSource), not only the environment."""

from __future__ import annotations

from coordinator.models import WorkspaceRecord, WorkspaceSource, WorkspaceState
from coordinator.store import SqliteStore
from tests.support.fakes import Cluster, wait_until
from vendetta.v1 import coordinator_pb2 as pb


def shipped(name: str, observed: WorkspaceState, node_path: str) -> WorkspaceRecord:
    return WorkspaceRecord(
        name=name,
        node="node1",
        provider="docker",
        image="ubuntu:22.04",
        observed=observed,
        source=WorkspaceSource(
            kind="folder", origin="/nowhere", path="/nowhere", transport="shipped",
            node_path=node_path,
        ),
    )  # fmt: skip


async def test_the_node_copy_goes_when_the_reconciler_finishes(cluster: Cluster) -> None:
    sources = cluster.root / "a-node1" / "sources"
    copies = {name: sources / name for name in ("doomed", "never")}
    for folder in copies.values():
        folder.mkdir(parents=True)
        (folder / "main.py").write_text("print('hi')\n")
    await cluster.stop_coordinator()
    store = SqliteStore(cluster.home / "state.db")
    try:
        for name, state in (
            ("doomed", WorkspaceState.DESTROYING),
            ("never", WorkspaceState.CREATING),
        ):
            await store.add_workspace(shipped(name, state, str(copies[name])))
    finally:
        await store.close()
    await cluster.start_coordinator()

    async def settled() -> bool:
        resp = await cluster.stub.ListWorkspaces(pb.ListWorkspacesRequest())
        return not resp.workspaces

    await wait_until(settled, "`doomed` destroyed and `never` rolled back")
    assert not copies["doomed"].exists() and not copies["never"].exists()
