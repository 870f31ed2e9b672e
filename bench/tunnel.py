"""Tunnel throughput (issue 7 item 4): a forwarded service port versus `ssh -L`.

A Docker workspace runs a service that sends SIZE bytes to each connection
(busybox `nc -ll -e` running `dd` from /dev/zero). After `up`, the coordinator
forwards localhost:PORT to the service's node endpoint over its SSH connection
(`workspace ports`: local_address); the baseline is OpenSSH's client,
`ssh -N -L LOCAL:NODE_ENDPOINT`, against the same sshd, host key pinned. A third
path is `ssh -L LOCAL:127.0.0.1:PORT NAME.vendetta` through the generated entries
(the ProxyCommand's Dial stream to a relay inside). Pulls alternate between the
paths; MB/s = SIZE / (connect -> EOF).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import yaml

from bench.cluster import IMAGE, Cluster
from bench.stats import Series, row
from vendetta.v1 import coordinator_pb2 as pb

MB = 1_000_000
SERVICE_PORT = 9000


def _config(name: str, megabytes: int) -> str:
    gen = f"exec dd if=/dev/zero bs=1000000 count={megabytes} 2>/dev/null"
    command = (
        f"printf '#!/bin/sh\\n{gen}\\n' > /tmp/gen && chmod +x /tmp/gen && "
        f"exec nc -ll -p {SERVICE_PORT} -e /tmp/gen"
    )
    return yaml.safe_dump(
        {
            "name": name,
            "docker": {"image": IMAGE},
            "services": {"blob": {"command": command, "port": SERVICE_PORT}},
        }
    )


def _pull(host: str, port: int, timeout: float = 60.0) -> tuple[float, int]:
    """Seconds from connect to EOF and the bytes read; retries refused connects briefly."""
    deadline = time.monotonic() + 10
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        try:
            t0 = time.perf_counter()
            sock = socket.create_connection((host, port), timeout=timeout)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    n = 0
    with sock:
        while True:
            got = sock.recv_into(view)
            if not got:
                break
            n += got
    return time.perf_counter() - t0, n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def run(
    cl: Cluster, quick: bool, size_mb: int | None = None, rounds: int | None = None
) -> dict[str, Any]:
    ws = "bench-tunnel"
    size_mb = size_mb or (100 if quick else 200)
    rounds = rounds or (3 if quick else 8)
    node = cl.nodes["n1"]
    ssh: asyncio.subprocess.Process | None = None
    editor: asyncio.subprocess.Process | None = None
    try:
        await cl.stub.CreateWorkspace(
            pb.CreateWorkspaceRequest(name=ws, node="n1", config_yaml=_config(ws, size_mb))
        )
        await cl.stub.UpWorkspace(pb.WorkspaceRequest(name=ws), timeout=120)
        deadline = time.monotonic() + 60
        while True:
            got = await cl.stub.GetWorkspace(pb.GetWorkspaceRequest(name=ws))
            svc = next((s for s in got.services if s.port == SERVICE_PORT), None)
            if svc is not None and svc.local_address and svc.node_endpoint:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"service port never forwarded: {got}")
            await asyncio.sleep(0.2)
        local_host, _, local_port = svc.local_address.rpartition(":")
        local_host = "127.0.0.1" if local_host == "localhost" else local_host
        ssh_port = _free_port()
        ssh = await asyncio.create_subprocess_exec(
            *node.ssh_argv(
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                f"127.0.0.1:{ssh_port}:{svc.node_endpoint}",
            ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        # `ssh -L` through the generated `Host NAME.vendetta` entry (issue 13): the
        # proxy's Dial stream, the agent's relay inside (busybox nc here) to 127.0.0.1.
        editor_port = _free_port()
        editor = await asyncio.create_subprocess_exec(
            "ssh", "-F", str(cl.home / "ssh" / "config"), "-N",
            "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{editor_port}:127.0.0.1:{SERVICE_PORT}", f"{ws}.vendetta",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        v = Series(f"forwarded service port (coordinator), {size_mb} MB: MB/s", unit="MB/s")
        s = Series(f"ssh -L (OpenSSH), {size_mb} MB: MB/s", unit="MB/s")
        e = Series(f"ssh -L {ws}.vendetta to 127.0.0.1 inside, {size_mb} MB: MB/s", unit="MB/s")
        paths = [
            (v, local_host, int(local_port)),
            (s, "127.0.0.1", ssh_port),
            (e, "127.0.0.1", editor_port),
        ]
        # Warm-up: the first pull of each side also proves both paths work end to end.
        for _, host, port in paths:
            _, n = await asyncio.to_thread(_pull, host, port)
            if n != size_mb * MB:
                raise RuntimeError(f"pulled {n} bytes through {host}:{port}, wanted {size_mb} MB")
        for _ in range(rounds):
            for series, host, port in paths:
                secs, n = await asyncio.to_thread(_pull, host, port)
                if n != size_mb * MB:
                    raise RuntimeError(f"{series.name}: pulled {n} bytes")
                series.seconds.append(n / secs / MB)
        return {
            "rows": [row(s), row(v, s), row(e, s)],
            "node_endpoint": svc.node_endpoint,
            "local_address": svc.local_address,
        }
    finally:
        for proc in (ssh, editor):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        with contextlib.suppress(Exception):
            await cl.stub.DestroyWorkspace(pb.WorkspaceRequest(name=ws, force=True))
