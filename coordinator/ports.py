"""Service ports on the user's machine: chosen, remembered, forwarded to the node.

Forwards belong to the coordinator, not to a CLI session: they outlive the
CLI, are re-established when a node reconnects, and go on down/destroy. A
service gets its own port number when that is free here, else a free one;
the choice is stored and reused on the next `up`, and a shift is announced.
"""

from __future__ import annotations

import contextlib
import errno
import logging

from common.errors import VendettaError
from coordinator.nodes import NodeRegistry
from coordinator.store import Store
from coordinator.transports.base import Forward
from vendetta.v1 import common_pb2

log = logging.getLogger("vendetta.ports")


class PortManager:
    def __init__(self, store: Store, nodes: NodeRegistry) -> None:
        self.store = store
        self.nodes = nodes
        # (workspace, service) -> (forward, node endpoint it reaches)
        self._forwards: dict[tuple[str, str], tuple[Forward, str]] = {}

    async def ensure(
        self, workspace: str, node: str, statuses: list[common_pb2.ServiceStatus]
    ) -> list[str]:
        """Forward every published service port; fill local_address; return announcements."""
        transport = self.nodes.get(node).transport
        stored = await self.store.get_ports(workspace)
        notes: list[str] = []
        for st in statuses:
            if not st.port or not st.node_endpoint:
                continue
            key = (workspace, st.name)
            current = self._forwards.get(key)
            if current is not None and current[1] == st.node_endpoint:
                st.local_address = f"localhost:{current[0].port}"
                continue
            self._close(key)
            host, _, port = st.node_endpoint.rpartition(":")
            wanted = stored.get(st.name, st.port)
            try:
                fwd = await transport.forward(wanted, host, int(port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    log.warning("forward of %s/%s failed: %s", workspace, st.name, exc)
                    continue
                fwd = await transport.forward(0, host, int(port))
                st.local_note = f"port {wanted} is taken on this machine"
                notes.append(
                    f"{st.name}: port {wanted} is taken on this machine, "
                    f"using localhost:{fwd.port} instead"
                )
            except VendettaError as exc:
                log.warning("forward of %s/%s failed: %s", workspace, st.name, exc)
                continue
            self._forwards[key] = (fwd, st.node_endpoint)
            st.local_address = f"localhost:{fwd.port}"
            if stored.get(st.name) != fwd.port:
                await self.store.set_port(workspace, st.name, fwd.port)
        return notes

    def annotate(self, workspace: str, statuses: list[common_pb2.ServiceStatus]) -> None:
        for st in statuses:
            current = self._forwards.get((workspace, st.name))
            if current is not None:
                st.local_address = f"localhost:{current[0].port}"

    def _close(self, key: tuple[str, str]) -> None:
        current = self._forwards.pop(key, None)
        if current is not None:
            with contextlib.suppress(Exception):
                current[0].close()

    def close_workspace(self, workspace: str) -> None:
        for key in [k for k in self._forwards if k[0] == workspace]:
            self._close(key)

    def close_all(self) -> None:
        for key in list(self._forwards):
            self._close(key)
