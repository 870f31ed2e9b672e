"""vendetta-client: a typed client of vendetta's coordinator (gRPC over TLS with a token,
or its local socket). ``Client`` blocks, ``AsyncClient`` awaits; both raise the error
tree of ``vendetta_client.errors``. The messages are ``vendetta.v1.coordinator_pb2``
(re-exported as ``pb``; ``common_pb2`` as ``pb_common``); the .proto files are in
``vendetta_client/protos``.
"""

from vendetta.v1 import common_pb2 as pb_common
from vendetta.v1 import coordinator_pb2 as pb
from vendetta_client._common import ExecResult
from vendetta_client.aio import AsyncClient, AsyncStream
from vendetta_client.client import Client, Stream
from vendetta_client.errors import VendettaError

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "Client",
    "ExecResult",
    "Stream",
    "VendettaError",
    "pb",
    "pb_common",
]
