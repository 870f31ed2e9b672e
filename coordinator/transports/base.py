from __future__ import annotations

import abc

import grpc.aio

# Reconnect quickly after a tunnel comes back: gRPC's defaults back off to minutes.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


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
