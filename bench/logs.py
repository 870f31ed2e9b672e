"""Log streaming (issue 7 item 3): `workspace logs -f` versus `ssh NODE docker logs -f`.

Both followers read the same container's main-process output (a Docker
workspace's `workspace logs` without --service), one at a time, alternating:

- throughput: a follower attaches (and proves it with a SYNC line), then a
  `docker exec` (the same trigger for both sides, started at t0) writes N lines
  to /proc/1/fd/1 followed by an END line; time = t0 -> END printed on the
  user's side. lines/s = N / time, MB/s = bytes of those lines (with their
  newlines) / time. The in-container writer and the exec start are inside the
  time for both sides. A third line, the writer alone (the same exec with no
  follower, timed until it returns), shows what the engine itself ingests.
- latency: the workspace's main process prints a line every 20 ms; for each
  line, latency = arrival on the user's side minus Docker's own timestamp of
  the line (when dockerd received it from the container), same clock; lines
  stamped before a follower's first line arrived (backlog from --since while
  the stream was being set up) are left out on both sides.
  Starting a `docker exec` per line would add its ~50 ms start to each sample,
  so the per-line stamp is Docker's rather than one taken before an exec.

The vendetta side is the coordinator's StreamLogs stub asked as `workspace logs -f`
asks (compact: lines as blocks of text), turned into the bytes the CLI would print
(cli.log_text), through the coordinator and the SSH tunnel; the baseline is OpenSSH's
client running `docker logs -f` on the node, host key pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import AsyncIterator
from typing import Any

import docker

from bench.cluster import IMAGE, Cluster, Node
from bench.stats import Series, row
from cli.log_text import log_text
from vendetta.v1 import coordinator_pb2 as pb

IDLE_MAIN = '["sh", "-c", "echo ready; exec sleep 2147483647"]'
TICK_MAIN = '["sh", "-c", "i=0; while :; do i=$((i+1)); echo tick-$i; usleep 20000; done"]'


def _config(name: str, command: str) -> str:
    return f"name: {name}\ndocker: {{image: '{IMAGE}', command: {command}}}\n"


class _Marker:
    """Finds a marker line in a byte stream read in arbitrary chunks."""

    def __init__(self, marker: str) -> None:
        self.needle = f"{marker}\n".encode()
        self.tail = b""

    def feed(self, chunk: bytes) -> bool:
        data = self.tail + chunk
        found = self.needle in data
        self.tail = data[-len(self.needle) :]
        return found


async def _exec_write(container: Any, script: str) -> None:
    await asyncio.to_thread(
        container.exec_run, ["sh", "-c", f"{{ {script} ; }} > /proc/1/fd/1"], detach=True
    )


async def _read_until_end(
    chunks: AsyncIterator[bytes], k: int, synced: asyncio.Event
) -> tuple[float, int]:
    """Read printed output until END-k: its arrival time and the payload bytes
    between SYNC-k and END-k (a SYNC written again while connecting is not payload)."""
    sync, end = _Marker(f"SYNC-{k}"), _Marker(f"END-{k}")
    nbytes = 0
    async for chunk in chunks:
        if not synced.is_set():
            if sync.feed(chunk):
                synced.set()
            continue
        nbytes += len(chunk) - chunk.count(sync.needle) * len(sync.needle)
        if end.feed(chunk):
            return time.perf_counter(), nbytes - len(end.needle)
    raise RuntimeError("the log stream ended before END")


async def _vendetta_round(
    cl: Cluster, ws: str, container: Any, k: int, script: str
) -> tuple[float, int]:
    """Seconds from trigger to END on the user's side, and text bytes received."""
    call = cl.stub.StreamLogs(
        pb.StreamLogsRequest(name=ws, follow=True, since_unix_nano=time.time_ns(), compact=True)
    )
    synced = asyncio.Event()

    async def printed() -> AsyncIterator[bytes]:
        async for batch in call:
            yield log_text(batch, prefix=True)

    reader = asyncio.create_task(_read_until_end(printed(), k, synced))
    try:
        while not synced.is_set():
            await _exec_write(container, f"echo SYNC-{k}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(synced.wait(), 5)
        t0 = time.perf_counter()
        await _exec_write(container, f"{script}; echo END-{k}")
        t_end, nbytes = await asyncio.wait_for(reader, 120)
        return t_end - t0, nbytes
    finally:
        reader.cancel()
        call.cancel()
        with contextlib.suppress(BaseException):
            await reader


async def _ssh_round(node: Node, container: Any, k: int, script: str) -> tuple[float, int]:
    since = f"{time.time():.6f}"
    argv = node.ssh_argv()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        "docker",
        "logs",
        "-f",
        "--since",
        since,
        container.id,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    stdout = proc.stdout
    synced = asyncio.Event()

    async def printed() -> AsyncIterator[bytes]:
        while chunk := await stdout.read(1 << 20):
            yield chunk

    reader = asyncio.create_task(_read_until_end(printed(), k, synced))
    try:
        while not synced.is_set():
            await _exec_write(container, f"echo SYNC-{k}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(synced.wait(), 5)
        t0 = time.perf_counter()
        await _exec_write(container, f"{script}; echo END-{k}")
        t_end, nbytes = await asyncio.wait_for(reader, 120)
        return t_end - t0, nbytes
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()


def _docker_stamp_ns(stamp: str) -> int:
    """RFC 3339 with nanoseconds, as `docker logs --timestamps` prints it -> unix ns."""
    main, _, frac = stamp.rstrip("Z").partition(".")
    dt = datetime.datetime.fromisoformat(main).replace(tzinfo=datetime.UTC)
    return int(dt.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


async def _vendetta_latency(cl: Cluster, ws: str, seconds: float, out: Series) -> None:
    call = cl.stub.StreamLogs(
        pb.StreamLogsRequest(name=ws, follow=True, since_unix_nano=time.time_ns(), compact=True)
    )

    async def read() -> None:
        live = 0  # lines stamped before the stream was live are backlog, not latency
        async for batch in call:
            now = time.time_ns()
            live = live or now
            stamped = [(ln.time_unix_nano, ln.text.encode()) for ln in batch.lines]
            stamped += zip(batch.times_unix_nano, batch.text.split(b"\n"), strict=False)
            for stamp, text in stamped:
                if text.startswith(b"tick-") and stamp > live:
                    out.seconds.append((now - stamp) / 1e9)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), seconds)
    call.cancel()


async def _ssh_latency(node: Node, container_id: str, seconds: float, out: Series) -> None:
    proc = await asyncio.create_subprocess_exec(
        *node.ssh_argv(),
        "docker",
        "logs",
        "-f",
        "--timestamps",
        "--since",
        f"{time.time():.6f}",
        container_id,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    stdout = proc.stdout

    async def read() -> None:
        live = 0  # as above: only lines written once the stream was live
        while line := await stdout.readline():
            now = time.time_ns()
            live = live or now
            stamp, _, text = line.decode().partition(" ")
            stamp_ns = _docker_stamp_ns(stamp)
            if text.startswith("tick-") and stamp_ns > live:
                out.seconds.append((now - stamp_ns) / 1e9)

    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read(), seconds)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()


async def run(cl: Cluster, quick: bool) -> dict[str, Any]:
    node = cl.nodes["n1"]
    client = docker.from_env()
    tp, lat = "bench-logs-tp", "bench-logs-lat"
    rows: list[dict[str, Any]] = []
    throughput: list[dict[str, Any]] = []
    try:
        for name, command in ((tp, IDLE_MAIN), (lat, TICK_MAIN)):
            await cl.stub.CreateWorkspace(
                pb.CreateWorkspaceRequest(name=name, node="n1", config_yaml=_config(name, command))
            )
            await cl.stub.UpWorkspace(pb.WorkspaceRequest(name=name))
        tp_ws = await cl.stub.GetWorkspace(pb.GetWorkspaceRequest(name=tp))
        lat_ws = await cl.stub.GetWorkspace(pb.GetWorkspaceRequest(name=lat))
        container = await asyncio.to_thread(client.containers.get, tp_ws.environment_id)

        # -- throughput: short lines (lines/s) and long lines (MB/s)
        rounds = 2 if quick else 4
        cases = [
            ("64-byte lines", 63, 100_000 if quick else 200_000),
            ("1 KiB lines", 1023, 20_000 if quick else 40_000),
        ]
        k = 0
        for label, width, n in cases:
            script = f"yes {'x' * width} | head -n {n}"
            v = Series(f"workspace logs -f, {label}: seconds for {n:,}", unit="s")
            s = Series(f"ssh docker logs -f, {label}: seconds for {n:,}", unit="s")
            w = Series(f"writer alone, no follower, {label}: seconds for {n:,}", unit="s")
            v_bytes: list[int] = []
            s_bytes: list[int] = []
            for _ in range(rounds):
                k += 1
                # The engine's own ceiling: the exec returns once the container's
                # stdout pipe has taken every line (dockerd ingesting them).
                t0 = time.perf_counter()
                await asyncio.to_thread(
                    container.exec_run, ["sh", "-c", f"{{ {script} ; }} > /proc/1/fd/1"]
                )
                w.seconds.append(time.perf_counter() - t0)
                k += 1
                secs, nb = await _vendetta_round(cl, tp, container, k, script)
                v.seconds.append(secs)
                v_bytes.append(nb)
                k += 1
                secs, nb = await _ssh_round(node, container, k, script)
                s.seconds.append(secs)
                s_bytes.append(nb)
            want = n * (width + 1)
            for series, got in ((v, v_bytes), (s, s_bytes)):
                if any(b != want for b in got):
                    raise RuntimeError(f"{series.name}: got {got} bytes, wanted {want} each")
            for series, base in ((w, None), (s, None), (v, s)):
                lines_s = Series(series.name.split(":")[0] + f", {label}: lines/s", unit="lines/s")
                lines_s.seconds = [n / t for t in series.seconds]
                mb_s = Series(series.name.split(":")[0] + f", {label}: MB/s", unit="MB/s")
                mb_s.seconds = [want / t / 1e6 for t in series.seconds]
                throughput.append(
                    {
                        "case": label,
                        "side": "vendetta"
                        if base is not None
                        else ("openssh" if series is s else "writer alone"),
                        "lines": n,
                        "bytes": want,
                        "seconds": list(series.seconds),
                        "lines_per_s": lines_s.summary(),
                        "mb_per_s": mb_s.summary(),
                    }
                )
            rows.append(row(v, s, lines=n, bytes=want))
            rows.append(row(s, None, lines=n, bytes=want))
            rows.append(row(w, None, lines=n, bytes=want))

        # -- latency: Docker's stamp -> printed on the user's side
        v_lat = Series("workspace logs -f: line latency (dockerd -> user)")
        s_lat = Series("ssh docker logs -f: line latency (dockerd -> user)")
        window = 3.0 if quick else 8.0
        for _ in range(2 if quick else 3):
            await _vendetta_latency(cl, lat, window, v_lat)
            await _ssh_latency(node, lat_ws.environment_id, window, s_lat)
        rows.append(row(s_lat))
        rows.append(row(v_lat, s_lat))
        return {"rows": rows, "throughput": throughput}
    finally:
        client.close()
        for name in (tp, lat):
            with contextlib.suppress(Exception):
                await cl.stub.DestroyWorkspace(pb.WorkspaceRequest(name=name, force=True))
