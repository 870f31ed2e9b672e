"""Run the coordinator: a grpc.aio server on a user-private unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import grpc.aio

from common import keepalive
from common.paths import (
    check_socket_path,
    coordinator_pid,
    coordinator_socket,
    private_dir,
    private_file,
    write_private,
)
from common.rpc_errors import ErrorMappingInterceptor
from coordinator.listener import ListenConfig, Listener, add_standard_services
from coordinator.models import NodeRecord, WorkspaceState
from coordinator.nodes import NodeRegistry
from coordinator.reconciler import Reconciler
from coordinator.service_nodes import NodeService, make_transport_factory
from coordinator.ssh_entries import SshEntries
from coordinator.store import SqliteStore
from coordinator.token_rpcs import ApiServicer
from coordinator.transports import Transport
from coordinator.workspaces import WorkspaceService
from vendetta.v1 import coordinator_pb2_grpc

log = logging.getLogger("vendetta.coordinator")


class Coordinator:
    """Everything the coordinator process holds, with an async lifetime."""

    def __init__(
        self,
        home: Path,
        local_agent_args: list[str] | None = None,
        transport_factory: Callable[[NodeRecord], Transport] | None = None,
        reconcile_interval: float | None = None,
        node_grace: float | None = None,
        listen: ListenConfig | None = None,
    ) -> None:
        self.home = private_dir(home)
        self.socket = check_socket_path(coordinator_socket(home))
        private_file(home / "state.db").close()  # SQLite gives its -wal and -shm this mode
        self.store = SqliteStore(home / "state.db")
        self.nodes = NodeRegistry(
            transport_factory
            or make_transport_factory(home, home / "agent", local_agent_args or []),
            grace=node_grace,
        )
        self.node_service = NodeService(self.store, self.nodes, self.home)
        self.workspaces = WorkspaceService(self.store, self.nodes, self.home)
        self.reconciler = Reconciler(self.workspaces, reconcile_interval)
        self.ssh_entries = SshEntries(self.home)
        self.node_service.after_remove = self._write_ssh_entries
        self._tasks: list[asyncio.Task[None]] = []
        self.server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor()], options=keepalive.SERVER_OPTIONS
        )
        self.servicer = ApiServicer(
            self.store,
            self.nodes,
            self.node_service,
            self.workspaces,
            str(self.socket),
            str(self.store.path),
        )
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(self.servicer, self.server)
        add_standard_services(self.server)
        # TLS on TCP with tokens, only when asked for (coordinator/listener.py)
        self.listener = (
            Listener(self.home, listen, self.servicer, self.servicer.tokens) if listen else None
        )

    async def start(self) -> None:
        if self.listener:  # first: once the socket answers, ServerInfo says where it is
            await self.listener.start()
            self.servicer.listen = self.listener.address
            self.servicer.tls_fingerprint = self.listener.fingerprint
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        old_umask = os.umask(0o177)
        try:
            self.server.add_insecure_port(f"unix:{self.socket}")
            await self.server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.socket, 0o600)
        self.reconciler.start()  # before the nodes connect: their first connect reconciles
        await self.node_service.start()
        await asyncio.to_thread(self.ssh_entries.prepare)
        await self._write_ssh_entries()
        self._tasks.append(asyncio.create_task(self._follow_workspaces()))
        log.info("coordinator listening on %s", self.socket)

    async def _write_ssh_entries(self) -> None:
        await self.ssh_entries.write_async(w.name for w in await self.store.list_workspaces())

    async def _follow_workspaces(self) -> None:
        """Rewrite the SSH entries when a workspace appears or goes."""
        known = {w.name for w in await self.store.list_workspaces()}
        with self.workspaces.events.subscribe() as sub:
            async for ev in sub:
                gone = ev.workspace.observed == WorkspaceState.DESTROYED
                if gone == (ev.workspace.name in known):
                    known = {w.name for w in await self.store.list_workspaces()}
                    await self.ssh_entries.write_async(known)

    async def stop(self, grace: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        await self.reconciler.stop()
        self.workspaces.relays.close()
        if self.listener:
            await self.listener.stop(grace)
        await self.server.stop(grace)
        await self.nodes.close()
        await self.store.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


async def serve(
    home: Path,
    local_agent_args: list[str] | None = None,
    node_grace: float | None = None,
    listen: ListenConfig | None = None,
) -> None:
    coordinator = Coordinator(home, local_agent_args, node_grace=node_grace, listen=listen)
    await coordinator.start()
    write_private(coordinator_pid(home), f"{os.getpid()}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("coordinator stopping")
        await coordinator.stop()
        with contextlib.suppress(FileNotFoundError):
            coordinator_pid(home).unlink()
