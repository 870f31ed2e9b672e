"""The local node: the agent's unix socket on this machine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc.aio

from common import agent_process
from common.paths import dial_socket as agent_dial_socket
from common.process import gone
from coordinator.transports.base import CHANNEL_OPTIONS, Forward, Transport
from coordinator.transports.tcp_proxy import TcpForward


class LocalTransport(Transport):
    kind = "local"
    # Seconds between two looks at the agent's process while connected.
    watch_every = 0.25

    def __init__(self, agent_dir: Path, agent_args: list[str] | None = None) -> None:
        self.agent_dir = agent_dir
        self.agent_args = agent_args or []
        self._channel: grpc.aio.Channel | None = None
        self._closed = asyncio.Event()
        self._pid = 0

    async def connect(self) -> grpc.aio.Channel:
        status = await agent_process.ensure(self.agent_dir, self.agent_args)
        self._closed.clear()
        self._pid = status.pid
        self._channel = grpc.aio.insecure_channel(f"unix:{status.socket}", options=CHANNEL_OPTIONS)
        return self._channel

    async def wait_closed(self) -> None:
        """No connection of our own to lose: the agent's process ending is the loss.
        Heartbeats alone would wait out the node's grace (15 s) before the next connect
        started a new agent, every call to the node failing meanwhile."""
        while not self._closed.is_set():
            if self._pid > 0 and gone(self._pid):  # a look in /proc: no thread needed
                return
            try:
                async with asyncio.timeout(self.watch_every):
                    await self._closed.wait()
            except TimeoutError:
                pass

    def dial_socket(self) -> Path | None:
        path = agent_dial_socket(self.agent_dir)
        return path if path.exists() else None

    async def forward(self, listen_port: int, dest_host: str, dest_port: int) -> Forward:
        return await TcpForward.open(listen_port, dest_host, dest_port)

    async def close(self) -> None:
        self._closed.set()
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
