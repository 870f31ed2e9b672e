"""ListWorkspaces answers kept until they could differ (issue 16: lists at 1,000 nodes).

Building the answer reads and decodes every row and converts each workspace to
protobuf: 15-30 ms at 1,000 nodes, on the event loop the heartbeats share. The
answer only changes when a workspace is written (the store's version) or a node
goes between ready and not (`WorkspaceService.view` shows its workspaces as
unknown), so it is built again only then. The cached message is shared by every
caller: nothing may change it after it is made.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from coordinator.models import NodeState
from coordinator.nodes import NodeRegistry
from coordinator.store import Store
from vendetta.v1 import coordinator_pb2 as pb

Key = tuple[int, frozenset[str]]
MAX_FILTERS = 64  # one entry per node filter asked for; bounded whatever callers ask


class WorkspaceListCache:
    def __init__(self, store: Store, nodes: NodeRegistry) -> None:
        self.store = store
        self.nodes = nodes
        self._answers: dict[str, tuple[Key, pb.ListWorkspacesResponse]] = {}
        self._counts: tuple[int, dict[str, int]] = (-1, {})

    async def counts(self) -> dict[str, int]:
        """Workspaces per node (ListNodes), counted again only after a workspace write."""
        version = self.store.workspaces_version
        if self._counts[0] != version:
            self._counts = (version, await self.store.count_workspaces())
        return self._counts[1]

    def _key(self) -> Key:
        # Read before the list is: a write landing meanwhile can only make this entry miss.
        ready = frozenset(c.name for c in self.nodes.all() if c.state == NodeState.READY)
        return self.store.workspaces_version, ready

    async def get(
        self, node: str, build: Callable[[], Awaitable[pb.ListWorkspacesResponse]]
    ) -> pb.ListWorkspacesResponse:
        key = self._key()
        cached = self._answers.get(node)
        if cached is not None and cached[0] == key:
            return cached[1]
        answer = await build()
        if len(self._answers) >= MAX_FILTERS:
            self._answers.clear()
        self._answers[node] = (key, answer)
        return answer
