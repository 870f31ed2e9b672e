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

from common.errors import FailedPreconditionError, VendettaError
from common.loopback import is_free
from coordinator.models import ServiceStatus
from coordinator.nodes import NodeRegistry
from coordinator.port_holder import who_holds
from coordinator.store import Store
from coordinator.transports.base import Forward

log = logging.getLogger("vendetta.ports")


class PortManager:
    def __init__(self, store: Store, nodes: NodeRegistry) -> None:
        self.store = store
        self.nodes = nodes
        # (workspace, service) -> (forward, node endpoint it reaches)
        self._forwards: dict[tuple[str, str], tuple[Forward, str]] = {}
        # Why a service's local port differs from its own, kept here rather than on a
        # status: the next service event replaces the status and would drop it.
        self._notes: dict[tuple[str, str], str] = {}

    def holder(self, port: int) -> str:
        """Who listens on ``port`` here: one of our forwards, else the process."""
        for (workspace, service), (fwd, _) in self._forwards.items():
            if fwd.port == port:
                return f"service {service!r} of workspace {workspace!r} (vendetta)"
        return who_holds(port)

    def check_pinned(self, workspace: str, pinned: dict[str, int]) -> None:
        """Before `up` starts anything: every pinned local port is ours or free."""
        for service, port in sorted(pinned.items()):
            current = self._forwards.get((workspace, service))
            if current is not None and current[0].port == port:
                continue
            if not is_free(port):
                raise FailedPreconditionError(
                    f"services.{service}.local_port: port {port} on this machine is held by "
                    f"{self.holder(port)}; stop it or choose another local_port (nothing was "
                    "started)"
                )

    async def ensure(
        self,
        workspace: str,
        node: str,
        statuses: list[ServiceStatus],
        pinned: dict[str, int] | None = None,
    ) -> list[str]:
        """Forward every published service port; fill local_address; return announcements.

        ``pinned`` ports (the config's local_port) are never shifted: taken, the
        service is left unforwarded and the note says who holds the port.
        """
        pinned = pinned or {}
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
            wanted = pinned.get(st.name) or stored.get(st.name, st.port)
            try:
                fwd = await transport.forward(wanted, host, int(port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    log.warning("forward of %s/%s failed: %s", workspace, st.name, exc)
                    continue
                if st.name in pinned:
                    st.local_note = f"local_port {wanted} is held by {self.holder(wanted)}"
                    self._notes[key] = st.local_note
                    notes.append(f"{st.name}: not forwarded: {st.local_note}")
                    continue
                fwd = await transport.forward(0, host, int(port))
                st.local_note = f"port {wanted} is taken on this machine"
                self._notes[key] = st.local_note
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

    def annotate(self, workspace: str, statuses: list[ServiceStatus]) -> None:
        for st in statuses:
            current = self._forwards.get((workspace, st.name))
            st.local_address = f"localhost:{current[0].port}" if current is not None else ""
            st.local_note = self._notes.get((workspace, st.name), "")

    def _close(self, key: tuple[str, str]) -> None:
        self._notes.pop(key, None)
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
