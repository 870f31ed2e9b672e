from __future__ import annotations

import abc
from pathlib import Path
from typing import Protocol

import grpc.aio

# Reconnect quickly after a tunnel comes back: gRPC's defaults back off to minutes.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Subchannels of this channel only. gRPC shares them per address across channels by
    # default: a call object still alive from a broken connection (an error's traceback)
    # kept the old subchannel, failed and backing off, and every new channel to the same
    # tunnel socket inherited its failure, so the node never came back (issue 15).
    ("grpc.use_local_subchannel_pool", 1),
]


class Forward(Protocol):
    """A listener on this machine's loopback that reaches a port on the node."""

    @property
    def port(self) -> int: ...

    def close(self) -> None: ...


class Transport(abc.ABC):
    """Opens a gRPC channel to one node's agent, starting the agent if needed.

    ``connect`` raises the error tree (NodeUnreachableError, PermissionDeniedError,
    HostKeyMismatchError, ...); ``wait_closed`` returns when the underlying
    connection drops, so the caller can reconnect.
    """

    kind: str

    @abc.abstractmethod
    async def connect(self) -> grpc.aio.Channel: ...

    @abc.abstractmethod
    async def wait_closed(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def stop_agent(self, purge: bool = False) -> None:
        """Stop the node's agent (`node remove`); with ``purge`` also remove the agent
        installed there and its state. The error tree if the node cannot be reached.
        Transports whose agent belongs to the coordinator do nothing."""
        return None

    def dial_socket(self) -> Path | None:
        """A unix socket on this machine that reaches the agent's dial socket
        (nodeagent/dial_socket.py) without passing through this process; None if none."""
        return None

    def control_socket(self) -> Path | None:
        """The ControlPath of an OpenSSH master to the node, through which a client on
        this machine may open a connection from the node (cli/tunnel_master.py)."""
        return None

    @abc.abstractmethod
    async def forward(self, listen_port: int, dest_host: str, dest_port: int) -> Forward:
        """Listen on 127.0.0.1:listen_port (0: any free port) here, reach dest on the node.

        OSError if the port is taken; the error tree if the node is unreachable.
        """
