"""Adding, testing and removing nodes (the registry keeps them connected)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    VendettaError,
)
from common.names import validate_name
from common.paths import vendetta_client_key
from common.version import build_id
from coordinator import node_test
from coordinator.models import LOCAL_NODE, NodeRecord, NodeState
from coordinator.nodes import NodeConnection, NodeRegistry
from coordinator.ssh_keys import key_for_node
from coordinator.store import Store
from coordinator.transports import LocalTransport, SshTransport, Transport, scan_host_key
from coordinator.transports.ssh import fingerprint

log = logging.getLogger("vendetta.coordinator")

# How long `node upgrade` waits for one node (a first bundle is built with pip, then sent).
UPGRADE_TIMEOUT = 900.0


@dataclass(frozen=True)
class NodeUpgrade:
    name: str
    old_version: str  # "" if it was not connected
    new_version: str  # "" if it failed
    error: str = ""


# The longest grace period a node may have (a day: beyond, `disconnected` says little).
MAX_GRACE = 86400.0


def make_transport_factory(
    home: Path, local_agent_dir: Path, local_agent_args: list[str]
) -> Callable[[NodeRecord], Transport]:
    def factory(record: NodeRecord) -> Transport:
        if record.transport == "local":
            return LocalTransport(local_agent_dir, local_agent_args)
        return SshTransport(
            node=record.name,
            address=record.address,
            port=record.port,
            user=record.user,
            host_key=record.host_key,
            tunnel_dir=home / "tunnels",
            identity_file=record.identity_file,
            agent_command=record.agent_command,
            vendetta_key=vendetta_client_key(home),
            bundles_dir=home / "bundles",
        )

    return factory


class NodeService:
    def __init__(self, store: Store, nodes: NodeRegistry, home: Path) -> None:
        self.store = store
        self.nodes = nodes
        self.vendetta_key = vendetta_client_key(home)
        # Told when a node (and with --force, its workspaces) is gone.
        self.after_remove: Callable[[], Awaitable[None]] | None = None

    async def start(self) -> None:
        """Register the local node if missing, then supervise every known node."""
        if await self.store.get_node(LOCAL_NODE) is None:
            await self.store.add_node(
                NodeRecord(name=LOCAL_NODE, address="localhost", transport="local", port=0)
            )
        for record in await self.store.list_nodes():
            self.nodes.add(self.nodes.connection(record))

    async def scan(self, address: str, port: int) -> tuple[str, str, str]:
        if not address:
            raise InvalidArgumentError("no address given: `vendetta node add NAME ADDRESS`")
        key = await scan_host_key(address, port)
        line = key.export_public_key("openssh").decode().strip()
        return line, str(key.get_fingerprint("sha256")), key.get_algorithm()

    async def add(
        self,
        *,
        name: str,
        address: str,
        user: str,
        port: int,
        identity_file: str,
        host_key: str,
        agent_command: list[str],
        password: str = "",
        grace_seconds: float = 0.0,
    ) -> NodeConnection:
        validate_name("node", name)
        if not 0 <= grace_seconds <= MAX_GRACE:  # NaN too
            raise InvalidArgumentError(
                f"--grace must be between 0 (the coordinator's default) and {MAX_GRACE:g} "
                f"seconds, not {grace_seconds:g}"
            )
        if name == LOCAL_NODE:
            raise InvalidArgumentError(
                f"{LOCAL_NODE!r} is the coordinator's own node; pick another name"
            )
        if not address:
            raise InvalidArgumentError("no address given: `vendetta node add NAME ADDRESS`")
        if not host_key:
            raise InvalidArgumentError(
                "no host key to pin: the CLI shows the node's fingerprint and pins it "
                "(`vendetta node add` does this; other clients call ScanHostKey first)"
            )
        if identity_file and not os.path.isfile(identity_file):
            raise InvalidArgumentError(f"identity file {identity_file} does not exist")
        existing = await self.store.get_node(name)
        if existing is not None:
            raise AlreadyExistsError(
                f"node {name!r} already exists ({existing.user + '@' if existing.user else ''}"
                f"{existing.address}:{existing.port}); remove it first with "
                f"`vendetta node remove {name}` or pick another name"
            )
        try:
            fp = fingerprint(host_key)
        except Exception as exc:
            raise InvalidArgumentError(f"not an OpenSSH public key: {host_key[:60]!r}") from exc
        record = NodeRecord(
            name=name,
            address=address,
            transport="ssh",
            user=user,
            port=port,
            host_key=host_key,
            host_key_fingerprint=fp,
            identity_file=identity_file,
            agent_command=agent_command,
            created_unix_nano=time.time_ns(),
            grace_seconds=grace_seconds,
        )
        conn = self.nodes.connection(record)
        # Errors reach the user; nothing is recorded.
        if not identity_file:
            await key_for_node("", self.vendetta_key)  # makes vendetta's key if there is none
        try:
            await conn.open()
        except PermissionDeniedError as exc:
            line, source = await key_for_node(identity_file, self.vendetta_key)
            if not password or not isinstance(conn.transport, SshTransport):
                raise PermissionDeniedError(
                    f"{exc}. The key to install is {source}: {line}"
                ) from None
            await conn.transport.install_key(password, line)
            log.info("node %s: installed the key from %s with the password", name, source)
            await conn.open()  # with the key only, from now on
        try:
            await self.store.add_node(record)
        except BaseException:
            await conn.close()
            raise
        self.nodes.add(conn)
        return conn

    async def trust(self, name: str, host_key: str) -> NodeConnection:
        """Pin ``host_key`` (the one the user just checked) and reconnect with it."""
        if name == LOCAL_NODE:
            raise InvalidArgumentError("the local node is not reached over SSH: no host key")
        record = await self.store.get_node(name)
        if record is None:
            self.nodes.get(name)  # raises NotFoundError with the known names
            raise NotFoundError(f"unknown node {name!r}")
        try:
            fp = fingerprint(host_key)
        except Exception as exc:
            raise InvalidArgumentError(f"not an OpenSSH public key: {host_key[:60]!r}") from exc
        record.host_key, record.host_key_fingerprint = host_key, fp
        await self.store.set_host_key(name, host_key, fp)
        await self.nodes.remove(name)
        conn = self.nodes.connection(record)
        self.nodes.add(conn)
        return conn

    async def test(self, name: str) -> node_test.NodeTestResult:
        return await node_test.run(self.nodes.get(name), build_id())

    async def upgrade(self, names: list[str]) -> list[NodeUpgrade]:
        """Bring each node's agent to the coordinator's build now, as a reconnect does
        (install if missing, replace an agent of another build); every node, if no names."""
        conns = [self.nodes.get(n) for n in names] if names else self.nodes.all()
        return list(await asyncio.gather(*(self._upgrade(c) for c in conns)))

    async def _upgrade(self, conn: NodeConnection) -> NodeUpgrade:
        build = build_id()
        old = await self._running_build(conn)
        if old == build and conn.state == NodeState.READY:
            return NodeUpgrade(conn.name, old, build)
        try:
            await conn.reconnect(UPGRADE_TIMEOUT)
        except VendettaError as exc:
            return NodeUpgrade(conn.name, old, "", str(exc))
        new = conn.info.version if conn.info is not None else ""
        if new != build:  # an agent installed by hand (--agent-command): not ours to replace
            return NodeUpgrade(
                conn.name,
                old,
                new,
                f"the agent installed on the node by hand is build {new}, the coordinator is "
                f"{build}: upgrade vendetta there, or add the node again without "
                "--agent-command so the coordinator installs its own",
            )
        return NodeUpgrade(conn.name, old, new)

    @staticmethod
    async def _running_build(conn: NodeConnection) -> str:
        """The build the node's agent runs now, asked afresh (the agent may have been
        replaced since the last connect); what it said then if it does not answer."""
        try:
            client = await conn.client(wait=0)
            conn.info = await client.info()
        except VendettaError as exc:
            log.info("node %s: no fresh Info before the upgrade: %s", conn.name, exc)
        return conn.info.version if conn.info is not None else ""

    async def remove(self, name: str, force: bool, purge: bool = False) -> None:
        """Forget the node and stop its agent (its workspaces' environments keep running).

        An unreachable node is still forgotten: its agent stays until it is stopped
        there. With ``purge`` the agent's installs and state are removed from the node
        too, and a node where that cannot be done is kept, with the reason.
        """
        if name == LOCAL_NODE:
            raise InvalidArgumentError(
                "the local node is part of the coordinator; it cannot be removed"
            )
        record = await self.store.get_node(name)
        if record is None:
            self.nodes.get(name)  # raises NotFoundError with the known names
            raise NotFoundError(f"unknown node {name!r}")
        workspaces = await self.store.list_workspaces(name)
        if workspaces and not force:
            names = ", ".join(w.name for w in workspaces)
            raise FailedPreconditionError(
                f"node {name!r} still has workspaces ({names}): destroy them first, or "
                f"`vendetta node remove {name} --force` to forget them with the node"
            )
        # Supervision ends first, so it cannot start the agent again meanwhile.
        transport = self.nodes.get(name).transport
        await self.nodes.remove(name)
        try:
            await transport.stop_agent(purge=purge)
        except VendettaError as exc:
            if purge:
                self.nodes.add(self.nodes.connection(record))
                raise type(exc)(
                    f"{exc}. Node {name!r} is kept: retry when it can be reached, or remove "
                    "it without --purge (the agent's files then stay on the node)"
                ) from exc
            log.warning("node %s: its agent was not stopped: %s", name, exc)
        finally:
            await transport.close()
        for ws in workspaces:
            await self.store.delete_workspace(ws.name)
        await self.store.delete_node(name)
        if self.after_remove is not None:
            await self.after_remove()
