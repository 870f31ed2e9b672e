"""Images on nodes: listing them, and relaying an import's upload to the node's agent.

The coordinator keeps no copy: the client's chunks go on to the agent as they come
(gRPC's flow control holds the client back while the node's link is slower).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from common.errors import InvalidArgumentError
from common.names import validate_name
from coordinator.nodes import NodeRegistry
from vendetta.v1 import common_pb2


async def list_images(nodes: NodeRegistry, node: str, provider: str) -> list[common_pb2.ImageInfo]:
    validate_name("node", node)
    client = await nodes.get(node).client()
    return await client.list_images(provider)


async def import_image(
    nodes: NodeRegistry, requests: AsyncIterator[common_pb2.ImageUpload]
) -> list[common_pb2.ImageInfo]:
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("upload") != "start":
        raise InvalidArgumentError("an image upload starts with a `start` message")
    node = first.start.node
    validate_name("node", node)
    client = await nodes.get(node).client()

    async def relayed() -> AsyncIterator[common_pb2.ImageUpload]:
        yield first
        async for message in requests:
            yield message

    return await client.import_image(relayed())
