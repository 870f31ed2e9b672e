"""The relays the agent runs inside environments for `ssh -L/-D` (nodeagent/dial.py)
and `ssh -R/-A` (nodeagent/listen.py), run here as local processes: each program
the dial relay may pick (python3, bash's /dev/tcp, busybox nc), its half-close and
its refusals; the listener's frames, TCP and a private unix socket."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from common.errors import FailedPreconditionError, UnavailableError
from nodeagent import dial, listen
from nodeagent.providers import ProviderSet
from providers.base import Capabilities
from tests.support.local_pipes import LocalPipes
from vendetta.v1 import common_pb2


def _only(tmp: Path, tools: dict[str, str]) -> str:
    """A PATH holding only ``tools`` (name -> the program it is)."""
    folder = tmp / "bin"
    folder.mkdir()
    for name, target in tools.items():
        (folder / name).symlink_to(target)
    return str(folder)


@pytest.fixture(params=["python3", "bash", "nc", "nc+dd"])
def inside(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, ProviderSet]:
    busybox = shutil.which("busybox")
    if request.param == "python3":
        path = os.environ["PATH"]
    elif request.param == "bash":
        path = _only(tmp_path, {t: shutil.which(t) or t for t in ("sh", "bash", "cat", "kill")})
    else:
        if busybox is None:
            pytest.skip("busybox not installed")
        # nc+dd: the relay batches nc's small writes through dd where the image has it.
        tools = ["sh", "nc", "dd"] if request.param == "nc+dd" else ["sh", "nc"]
        path = _only(tmp_path, dict.fromkeys(tools, busybox))
    return request.param, cast(ProviderSet, LocalPipes(path))


async def _echo_server(size: int | None) -> tuple[asyncio.Server, int, list[bytes]]:
    """Echoes in upper case once it has ``size`` bytes, or (None) once the client has
    half-closed: then half-close must work."""
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await (reader.read() if size is None else reader.readexactly(size))
        got.append(data)
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], got


async def _dial(providers: ProviderSet, port: int, send: list[bytes]) -> list[Any]:
    async def requests() -> AsyncIterator[common_pb2.DialInput]:
        start = common_pb2.DialStart(workspace="w", host="127.0.0.1", port=port)
        yield common_pb2.DialInput(start=start)
        for data in send:
            yield common_pb2.DialInput(data=data)
        yield common_pb2.DialInput(eof=True)
        await asyncio.sleep(30)  # the client stays until the far side is done

    out = []
    async for msg in dial.dial(providers, requests()):
        out.append(msg)
        if msg.WhichOneof("output") == "eof":
            break
    return out


async def test_dial_relays_both_ways(inside: tuple[str, ProviderSet]) -> None:
    tool, providers = inside
    payload = [b"hello ", os.urandom(300_000).hex().encode()]
    whole = b"".join(payload)
    # Only python3 passes a half-close on (bash and nc cannot shut a socket half).
    server, port, got = await _echo_server(None if tool == "python3" else len(whole))
    async with server:
        out = await asyncio.wait_for(_dial(providers, port, payload), 60)
    assert out[0].WhichOneof("output") == "connected"
    assert got == [whole]
    assert b"".join(m.data for m in out if m.WhichOneof("output") == "data") == whole.upper()


async def test_dial_refused_says_so(inside: tuple[str, ProviderSet]) -> None:
    tool, providers = inside
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    if tool.startswith("nc"):
        # nc gives no "connected" signal: the channel opens and closes at once.
        out = await asyncio.wait_for(_dial(providers, port, []), 30)
        assert [m.WhichOneof("output") for m in out] == ["connected", "eof"]
        return
    with pytest.raises(UnavailableError, match="connection refused inside the workspace"):
        await asyncio.wait_for(_dial(providers, port, []), 30)


async def test_dial_without_any_tool(tmp_path: Path) -> None:
    path = _only(tmp_path, {"sh": shutil.which("sh") or "sh"})
    with pytest.raises(FailedPreconditionError, match="no python3, bash or nc"):
        await _dial(cast(ProviderSet, LocalPipes(path)), 1, [])


def test_frames_cut_anywhere() -> None:
    stream = b"".join(
        listen.FRAME.pack(k, n, len(d)) + d
        for k, n, d in [(listen.ACCEPTED, 1, b"1.2.3.4 5"), (listen.DATA, 1, b"x" * 1000)]
    )
    frames = listen.Frames()
    out = []
    for i in range(0, len(stream), 7):
        out += frames.feed(stream[i : i + 7])
    assert out == [(listen.ACCEPTED, 1, b"1.2.3.4 5"), (listen.DATA, 1, b"x" * 1000)]


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_listener_inside(kind: str, tmp_path: Path) -> None:
    providers = cast(ProviderSet, LocalPipes(os.environ["PATH"]))
    path = str(tmp_path / "private" / "agent") if kind == "unix" else ""
    inputs: asyncio.Queue[common_pb2.ListenInput | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[common_pb2.ListenInput]:
        yield common_pb2.ListenInput(start=common_pb2.ListenStart(workspace="w", path=path))
        while (msg := await inputs.get()) is not None:
            yield msg

    outputs = aiter(listen.listen(providers, requests()))
    first = await anext(outputs)
    port = first.listening
    if kind == "unix":
        assert port == 0
        assert stat.S_IMODE(os.stat(Path(path).parent).st_mode) == 0o700
        reader, writer = await asyncio.open_unix_connection(path)
    else:
        assert port > 0
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    accepted = await anext(outputs)
    n = accepted.accepted.conn
    assert n == 1
    writer.write(b"ping")
    await writer.drain()
    got = await anext(outputs)
    assert (got.data.conn, got.data.data) == (n, b"ping")
    inputs.put_nowait(common_pb2.ListenInput(data=common_pb2.ListenData(conn=n, data=b"pong")))
    inputs.put_nowait(common_pb2.ListenInput(eof=n))
    assert await reader.read() == b"pong"  # then end-of-file
    writer.close()
    assert (await anext(outputs)).eof == n
    inputs.put_nowait(None)  # the session ends: so does the listener
    async for _ in outputs:
        pass
    if kind == "unix":
        assert not Path(path).exists()


async def test_engines_without_streamed_stdin_refuse_with_a_reason() -> None:
    """QEMU's guest agent takes no streamed input: forwarding says so, up front."""

    class _NoStdin(LocalPipes):
        name = "qemu"
        capabilities = Capabilities(stdin=False)

    providers = cast(ProviderSet, _NoStdin(os.environ["PATH"]))
    with pytest.raises(FailedPreconditionError, match="not available yet"):
        await _dial(providers, 1, [])

    async def start() -> AsyncIterator[common_pb2.ListenInput]:
        yield common_pb2.ListenInput(start=common_pb2.ListenStart(workspace="w", port=0))

    with pytest.raises(FailedPreconditionError, match="not available yet"):
        await anext(aiter(listen.listen(providers, start())))


async def test_dial_goes_straight_to_the_environments_address(tmp_path: Path) -> None:
    """A published port, at an environment with an address: connected without any
    relay (the PATH inside has none of the relay's tools), half-close included."""
    inside = LocalPipes(_only(tmp_path, {}), addresses=("127.0.0.1",))
    providers = cast(ProviderSet, inside)
    payload = [b"straight ", os.urandom(100_000)]
    server, port, got = await _echo_server(None)
    async with server:
        # A port the workspace does not publish goes through the relay (none here).
        with pytest.raises(FailedPreconditionError, match="no python3, bash or nc"):
            await asyncio.wait_for(_dial(providers, port, payload), 30)
        inside.ports[port] = f"127.0.0.1:{port}"
        out = await asyncio.wait_for(_dial(providers, port, payload), 30)
    assert out[0].WhichOneof("output") == "connected"
    assert got == [b"".join(payload)]
    assert b"".join(m.data for m in out if m.WhichOneof("output") == "data") == got[0].upper()


async def test_dial_uses_the_relay_when_the_address_refuses() -> None:
    """The service listens on 127.0.0.1 alone (as dev servers do): the environment's
    address refuses, and the relay inside reaches it."""
    inside = LocalPipes(os.environ["PATH"], addresses=("127.0.0.2",))
    providers = cast(ProviderSet, inside)
    server, port, got = await _echo_server(None)
    inside.ports[port] = f"127.0.0.1:{port}"
    async with server:
        out = await asyncio.wait_for(_dial(providers, port, [b"via the relay"]), 30)
    assert got == [b"via the relay"]
    assert b"".join(m.data for m in out if m.WhichOneof("output") == "data") == b"VIA THE RELAY"


async def test_dial_goes_to_the_published_endpoint_without_an_address(tmp_path: Path) -> None:
    """No address on the node (an LXD instance without a network, a QEMU guest): the
    port's published endpoint (here a server on another port of this machine)."""
    inside = LocalPipes(_only(tmp_path, {}))
    server, port, got = await _echo_server(None)
    inside.ports[8080] = f"127.0.0.1:{port}"
    async with server:
        out = await asyncio.wait_for(_dial(cast(ProviderSet, inside), 8080, [b"endpoint"]), 30)
    assert got == [b"endpoint"]
    assert b"".join(m.data for m in out if m.WhichOneof("output") == "data") == b"ENDPOINT"
