"""Connecting to the coordinator, with its errors in the project's tree."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc.aio

from common.errors import UnavailableError
from common.paths import coordinator_socket, vendetta_home
from vendetta.v1 import coordinator_pb2_grpc


def request_id() -> str:
    return uuid.uuid4().hex


def not_running() -> UnavailableError:
    return UnavailableError(
        f"the coordinator is not running (no answer at {coordinator_socket(vendetta_home())}): "
        "start it with `vendetta server start`"
    )


@asynccontextmanager
async def coordinator() -> AsyncIterator[coordinator_pb2_grpc.CoordinatorAsyncStub]:
    sock = coordinator_socket(vendetta_home())
    if not sock.exists():
        raise not_running()
    async with grpc.aio.insecure_channel(
        f"unix:{sock}", options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)
