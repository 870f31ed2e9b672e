"""A loopback TCP forward for the local node (remote nodes forward through SSH)."""

from __future__ import annotations

import asyncio
import contextlib


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class TcpForward:
    def __init__(self, server: asyncio.Server, dest_host: str, dest_port: int) -> None:
        self._server = server
        self.dest = (dest_host, dest_port)

    @classmethod
    async def open(cls, listen_port: int, dest_host: str, dest_port: int) -> TcpForward:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(dest_host, dest_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
        return cls(server, dest_host, dest_port)

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        self._server.close()
