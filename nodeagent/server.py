"""Run the agent: one process per agent dir, a 0600 unix socket, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import uuid
from pathlib import Path

import grpc.aio

from common.errors import FailedPreconditionError
from common.paths import (
    agent_pid,
    agent_socket,
    check_socket_path,
    dial_socket,
    private_dir,
    write_private,
)
from common.rpc_errors import ErrorMappingInterceptor
from nodeagent import convert
from nodeagent.dial_socket import DialSocketServer
from nodeagent.providers import ProviderSet, build_providers
from nodeagent.servicer import NodeAgentServicer
from nodeagent.services.manager import ServiceManager
from vendetta.v1 import nodeagent_pb2_grpc

log = logging.getLogger("vendetta.agent")


def agent_id(agent_dir: Path) -> str:
    """A stable id per agent dir: labels on environments carry it."""
    path = agent_dir / "agent-id"
    if path.exists():
        return path.read_text().strip()
    new = uuid.uuid4().hex
    write_private(path, new + "\n")
    return new


class _Lock:
    """An exclusive lock on the agent dir: two agents must never share one."""

    def __init__(self, agent_dir: Path) -> None:
        self._fd = os.open(agent_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise FailedPreconditionError(
                f"another agent is already running with {agent_dir}: "
                "stop it with `vendetta-agent --dir ... stop`"
            ) from None

    def release(self) -> None:
        os.close(self._fd)


class AgentServer:
    """The agent's gRPC server on ``agent_dir``'s socket, with an async lifetime."""

    def __init__(
        self, agent_dir: Path, docker_host: str | None = None, providers: ProviderSet | None = None
    ) -> None:
        self.agent_dir = private_dir(agent_dir)
        self.socket = check_socket_path(agent_socket(agent_dir))
        self.agent_id = agent_id(agent_dir)
        self.providers = providers or build_providers(
            self.agent_id, docker_host, io_root=agent_dir / "io"
        )
        self._lock: _Lock | None = None
        self.services = ServiceManager(
            agent_dir / "services", self.providers, legacy=convert.service_from_saved_pb
        )
        self._server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
        self._servicer = NodeAgentServicer(
            self.agent_id,
            self.providers,
            str(self.socket),
            self.services,
            spool_dir=self.agent_dir / "imports",
        )
        nodeagent_pb2_grpc.add_NodeAgentServicer_to_server(self._servicer, self._server)
        self._dial = DialSocketServer(dial_socket(agent_dir), self.providers)
        self._resume: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._lock = _Lock(self.agent_dir)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        # The dir is 0700 already; the umask closes the window before chmod.
        old_umask = os.umask(0o177)
        try:
            self._server.add_insecure_port(f"unix:{self.socket}")
            await self._server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.socket, 0o600)
        await self._dial.start()
        write_private(agent_pid(self.agent_dir), f"{os.getpid()}\n")
        log.info("agent %s listening on %s", self.agent_id, self.socket)
        # Services an earlier run of this agent supervised keep running: find them again.
        self._resume = asyncio.create_task(self.services.resume_all())

    async def stop(self, grace: float = 5.0) -> None:
        if self._resume is not None:
            self._resume.cancel()
        self._servicer.stopping.set()  # the watches end; other calls get the grace
        await self._dial.close()
        await self._server.stop(grace)
        await self.services.close()
        await self.providers.close()
        for path in (agent_pid(self.agent_dir), self.socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


async def serve(agent_dir: Path, docker_host: str | None = None) -> None:
    server = AgentServer(agent_dir, docker_host)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("agent stopping")
        await server.stop()
