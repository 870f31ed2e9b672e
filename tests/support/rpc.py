"""gRPC errors as a client receives them, for tests of how they are read."""

from __future__ import annotations

import grpc
import grpc.aio


def rpc_error(
    code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*trailing),
        details=details,
        debug_error_string="",
    )
