"""Docker's streams: exec sockets, multiplexed log frames, timestamps.

Blocking readers for ``providers.threaded.ThreadedStream``: closing shuts the
socket down, so a thread blocked in ``recv`` returns at once.
"""

from __future__ import annotations

import calendar
import contextlib
import functools
import re
import socket
import struct
import urllib.parse
from collections.abc import Iterator
from typing import Any

import docker.errors
import docker.types
import requests.exceptions
from docker.utils.socket import frames_iter

from providers.base import LogRecord
from providers.threaded import Closer

# Stream ids of Docker's multiplexed stream format (the first byte of each frame header).
STDOUT = 1
STDERR = 2

_FRAME_HEADER = struct.Struct(">BxxxL")

# Every reader thread of this module has a name starting with this, so tests
# (and operators looking at a thread dump) can find them.
THREAD_PREFIX = "vendetta-docker-"


# -- sockets --------------------------------------------------------------------


def shutdown_socket(sock: Any) -> None:
    """Unblock a thread reading ``sock`` (from ``exec_start(socket=True)``), then close it all.

    ``close()`` alone does not wake a thread blocked in ``recv``; ``shutdown`` does.
    For a unix socket docker-py returns a ``socket.SocketIO`` whose ``_sock`` is
    the socket, and hangs the HTTP response on it as ``_response`` (the same
    attributes docker-py's own ``CancellableStream.close`` relies on).
    """
    raw = getattr(sock, "_sock", sock)
    with contextlib.suppress(OSError, AttributeError):
        raw.shutdown(socket.SHUT_RDWR)
    for part in (getattr(sock, "_response", None), sock, raw):
        if part is not None:
            with contextlib.suppress(Exception):
                part.close()


def exec_frames(sock: Any) -> Iterator[tuple[int, bytes]]:
    """(stream id, bytes) frames of a non-tty exec socket, until the command's output ends."""
    for stream_id, data in frames_iter(sock, False):
        yield int(stream_id), bytes(data)


# -- logs -----------------------------------------------------------------------


def _raise_for_status(response: Any) -> None:
    try:
        response.raise_for_status()
    except requests.exceptions.HTTPError as exc:
        response.close()
        # Raises docker.errors.NotFound/APIError with the daemon's explanation.
        docker.errors.create_api_error_from_http_exception(exc)
        raise


def _read_exactly(raw: Any, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = raw.read(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _log_frames(response: Any, *, follow: bool) -> Iterator[list[tuple[int, bytes]]]:
    """Frames of Docker's multiplexed stream (8-byte header: stream id, length; then data).

    Yields them in batches, everything complete in one read, so a busy log
    costs one hand-over to the event loop per read rather than per line. A
    finite log is read in large blocks; a followed one with ``read1`` (what
    has arrived, so a new line is passed on at once), which with Docker's
    chunked answers means about one line per read.
    """
    raw = response.raw
    read_some = getattr(raw, "read1", None) if follow else raw.read
    if read_some is None:  # urllib3 < 2 has no read1: read each frame exactly
        while True:
            header = _read_exactly(raw, _FRAME_HEADER.size)
            data = None if header is None else _read_exactly(raw, _FRAME_HEADER.unpack(header)[1])
            if header is None or data is None:
                return
            yield [(_FRAME_HEADER.unpack(header)[0], data)]
    buf = bytearray()
    while True:
        chunk = read_some(65536)
        if not chunk:
            return
        buf += chunk
        if batch := _whole_frames(buf):
            yield batch


def _whole_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete frame off the front of ``buf``; a partial one stays."""
    pos = 0
    batch: list[tuple[int, bytes]] = []
    while len(buf) - pos >= _FRAME_HEADER.size:
        stream_id, length = _FRAME_HEADER.unpack_from(buf, pos)
        end = pos + _FRAME_HEADER.size + length
        if end > len(buf):
            break
        batch.append((stream_id, bytes(buf[pos + _FRAME_HEADER.size : end])))
        pos = end
    del buf[:pos]
    return batch


def _record_batches(frames: Iterator[list[tuple[int, bytes]]]) -> Iterator[list[LogRecord]]:
    last_time = 0
    for batch in frames:
        records: list[LogRecord] = []
        for stream_id, data in batch:
            if stream_id not in (STDOUT, STDERR):
                continue  # stdin (never attached for our containers)
            name = "stderr" if stream_id == STDERR else "stdout"
            for record in log_records(data, name, last_time):
                last_time = record.time_unix_nano
                records.append(record)
        if records:
            yield records


def _socket_frames(sock: socket.socket, buf: bytearray) -> Iterator[list[tuple[int, bytes]]]:
    """Docker's frames from a close-delimited body: every complete frame of each recv."""
    while True:
        if batch := _whole_frames(buf):
            yield batch
        chunk = sock.recv(_RECV)
        if not chunk:
            return
        buf += chunk


_RECV = 256 * 1024


def _open_raw_logs(
    api: Any, path: str, params: dict[str, str | int]
) -> tuple[Iterator[list[tuple[int, bytes]]], Closer] | None:
    """The logs request over the engine's unix socket as HTTP/1.0, or None to use requests.

    Docker answers a followed log with one HTTP chunk per line; read through
    urllib3 that is one read (and one hand-over to the loop) per line, which
    capped `workspace logs -f` near 35,000 lines/s. An HTTP/1.0 request gets a
    body that simply runs until the connection closes, so one recv takes every
    line that has arrived. Only for an engine on a unix socket answering 200;
    anything else goes the requests way (which raises the engine's own errors).
    """
    socket_path = getattr(getattr(api, "_custom_adapter", None), "socket_path", None)
    if not isinstance(socket_path, str) or not api.base_url.startswith("http+docker://"):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        query = urllib.parse.urlencode(params)
        sock.sendall(f"GET {path}?{query} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        head = bytearray()
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(_RECV)
            if not chunk or len(head) > 65536:
                sock.close()
                return None
            head += chunk
        header, _, body = bytes(head).partition(b"\r\n\r\n")
        status = header.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or status[1] != b"200":
            sock.close()
            return None
    except OSError:
        sock.close()
        return None
    return _socket_frames(sock, bytearray(body)), functools.partial(shutdown_socket, sock)


def open_log_records(
    api: Any, container_id: str, *, follow: bool, tail: int | None, since_unix_nano: int
) -> tuple[Iterator[list[LogRecord]], Closer]:
    """Open one logs request for stdout *and* stderr: batches of records, in log order.

    One multiplexed request (rather than one per stream) keeps Docker's own
    order and makes ``tail`` count lines of both streams together. docker-py's
    ``logs()`` drops the stream id of each frame, so the request is made with
    the client's public requests API and the frames are read here; closing
    goes through docker-py's ``CancellableStream``. Blocking: call in a thread.
    """
    params: dict[str, str | int] = {
        "stdout": 1,
        "stderr": 1,
        "timestamps": 1,
        "follow": 1 if follow else 0,
        "tail": "all" if tail is None else tail,
    }
    if since_unix_nano > 0:
        seconds, nanos = divmod(since_unix_nano, 1_000_000_000)
        params["since"] = f"{seconds}.{nanos:09d}"
    path = f"/v{api.api_version}/containers/{container_id}/logs"
    raw = _open_raw_logs(api, path, params)
    if raw is not None:
        return _record_batches(raw[0]), raw[1]
    url = f"{api.base_url}{path}"
    # timeout=None: a followed log may be silent for hours.
    response = api.get(url, params=params, stream=True, timeout=None)
    _raise_for_status(response)
    cancellable = docker.types.CancellableStream(iter(()), response)
    return _record_batches(_log_frames(response, follow=follow)), cancellable.close


_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)(?: |$)")


@functools.lru_cache(maxsize=64)
def _epoch_seconds(head: str, zone: str) -> int:
    """Seconds since the epoch of "YYYY-MM-DDTHH:MM:SS" in ``zone`` (cached: lines share it)."""
    seconds = calendar.timegm(
        (int(head[0:4]), int(head[5:7]), int(head[8:10]), int(head[11:13]), int(head[14:16]),
         int(head[17:19]), 0, 0, 0)
    )  # fmt: skip
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds


def parse_timestamp(text: str) -> tuple[int, str] | None:
    """Split Docker's RFC3339Nano prefix off ``text``: (unix nanoseconds, rest) or None."""
    # Docker's own form, UTC with a fraction, without the regex (per line, so it counts).
    end = text.find("Z", 20, 30)
    if end > 0 and text[19] == "." and text[end + 1 : end + 2] in (" ", ""):
        fraction = text[20:end]
        if fraction.isdigit() and text[4] == "-" and text[10] == "T":
            try:
                seconds = _epoch_seconds(text[:19], "Z")
            except ValueError:
                pass
            else:
                nanos = int(fraction) * 10 ** (9 - len(fraction))
                return seconds * 1_000_000_000 + nanos, text[end + 2 :]
    match = _TIMESTAMP.match(text)
    if match is None:
        return None
    head, fraction, zone = match.group(1, 2, 3)
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    return _epoch_seconds(head, zone) * 1_000_000_000 + nanos, text[match.end() :]


def log_records(data: bytes, stream: str, last_time_unix_nano: int) -> list[LogRecord]:
    """The records in one log frame (one message: "TIMESTAMP text\\n"), newline stripped.

    A line without a timestamp (not expected from Docker) gets the previous time.
    """
    text = data.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    records: list[LogRecord] = []
    for line in text.split("\n"):
        parsed = parse_timestamp(line)
        if parsed is None:
            records.append(LogRecord(last_time_unix_nano, stream, line))
            continue
        last_time_unix_nano, body = parsed
        records.append(LogRecord(last_time_unix_nano, stream, body.removesuffix("\r")))
    return records
