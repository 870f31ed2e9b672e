"""Tunnel throughput (issue 7 item 4): a forwarded service port versus `ssh -L`.

A Docker workspace runs a service that sends SIZE bytes to each connection
(busybox `nc -ll -e` running `dd` from /dev/zero). After `up`, the coordinator
forwards localhost:PORT to the service's node endpoint over its SSH connection
(`workspace ports`: local_address); the baseline is OpenSSH's client,
`ssh -N -L LOCAL:NODE_ENDPOINT`, against the same sshd, host key pinned. A third
path is `ssh -L LOCAL:127.0.0.1:PORT NAME.vendetta` through the generated entries
(the ProxyCommand, the agent's dial socket, and straight to the container's
address: the port is published). A fourth is the same to a port the workspace
does not publish, which the agent reaches through a relay inside (the engine's
exec stream). Pulls alternate between the paths; MB/s = SIZE / (connect -> EOF).

Another row is the topology's own ceiling: `ssh -L` to the same node endpoint
with the client routed through one more SSH connection to the node (a
ProxyCommand `ssh -W`), both on AES-GCM as vendetta's legs are. That is the
user's SSH inside a tunnel's SSH, as through `NAME.vendetta`, built from
OpenSSH alone; each row through `NAME.vendetta` also gives its ratio to it.

A last row is the engine alone: `docker exec CONTAINER dd` of SIZE bytes read
by the Docker CLI (Go, no vendetta, no SSH). Every byte a connection to an
unpublished port sends to `ssh -L` comes out through such an exec stream (the
relay's stdout; the agent cannot enter the container's network as a non-root
user), so this is the ceiling of that path on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import docker
import yaml

from bench.cluster import IMAGE, Cluster, Node
from bench.stats import Series, row
from providers.base import LABEL_AGENT, LABEL_WORKSPACE
from vendetta.v1 import coordinator_pb2 as pb

MB = 1_000_000
SERVICE_PORT = 9000
UNPUBLISHED_PORT = 9001


def _config(name: str, megabytes: int) -> str:
    gen = f"exec dd if=/dev/zero bs=1000000 count={megabytes} 2>/dev/null"

    def serve(port: int) -> str:
        return (
            f"printf '#!/bin/sh\\n{gen}\\n' > /tmp/gen && chmod +x /tmp/gen && "
            f"exec nc -ll -p {port} -e /tmp/gen"
        )

    return yaml.safe_dump(
        {
            "name": name,
            "docker": {"image": IMAGE},
            "services": {
                "blob": {"command": serve(SERVICE_PORT), "port": SERVICE_PORT},
                # The same, on a port the workspace does not publish: -L reaches it
                # through the relay inside, as a dev server started by hand.
                "unpublished": {"command": serve(UNPUBLISHED_PORT)},
            },
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


def _exec_pull(container: str, megabytes: int) -> tuple[float, int]:
    """Seconds for `docker exec CONTAINER dd` of SIZE MB read to its end, and the bytes."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["docker", "exec", container, "dd", "if=/dev/zero", "bs=1000000", f"count={megabytes}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    n = 0
    with proc.stdout:
        while got := os.read(proc.stdout.fileno(), 1 << 20):
            n += len(got)
    proc.wait()
    return time.perf_counter() - t0, n


def container_of(cl: Cluster, node: str, ws: str) -> str:
    """The Docker container of workspace WS on bench node NODE."""
    found = docker.from_env().containers.list(
        filters={"label": [f"{LABEL_WORKSPACE}={ws}", f"{LABEL_AGENT}={cl.nodes[node].agent_id()}"]}
    )
    if len(found) != 1:
        raise RuntimeError(f"workspace {ws}: {len(found)} containers, wanted one")
    return str(found[0].id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _forward(node: Node, port: int, target: str, *options: str) -> asyncio.subprocess.Process:
    """OpenSSH's `ssh -N -L 127.0.0.1:PORT:TARGET` to ``node``, with ``options``."""
    return await asyncio.create_subprocess_exec(
        *node.ssh_argv(
            *options, "-N", "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{port}:{target}"
        ),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def run(
    cl: Cluster, quick: bool, size_mb: int | None = None, rounds: int | None = None
) -> dict[str, Any]:
    ws = "bench-tunnel"
    size_mb = size_mb or (100 if quick else 200)
    rounds = rounds or (3 if quick else 8)
    node = cl.nodes["n1"]
    ssh: asyncio.subprocess.Process | None = None
    hop: asyncio.subprocess.Process | None = None
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
        ssh_port, hop_port = _free_port(), _free_port()
        ssh = await _forward(node, ssh_port, svc.node_endpoint)
        hop = await _forward(node, hop_port, svc.node_endpoint, *node.hop_options())
        # `ssh -L` through the generated `Host NAME.vendetta` entry (issue 13): the
        # proxy's Dial stream, the agent's relay inside (busybox nc here) to 127.0.0.1.
        editor_port, relayed_port = _free_port(), _free_port()
        editor = await asyncio.create_subprocess_exec(
            "ssh", "-F", str(cl.home / "ssh" / "config"), "-N",
            "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{editor_port}:127.0.0.1:{SERVICE_PORT}",
            "-L", f"127.0.0.1:{relayed_port}:127.0.0.1:{UNPUBLISHED_PORT}", f"{ws}.vendetta",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        v = Series(f"forwarded service port (coordinator), {size_mb} MB: MB/s", unit="MB/s")
        s = Series(f"ssh -L (OpenSSH), {size_mb} MB: MB/s", unit="MB/s")
        j = Series(
            f"ssh -L through one more SSH hop to the node (OpenSSH alone), {size_mb} MB: MB/s",
            unit="MB/s",
        )
        e = Series(f"ssh -L {ws}.vendetta to a published port, {size_mb} MB: MB/s", unit="MB/s")
        r = Series(
            f"ssh -L {ws}.vendetta to an unpublished port (relay), {size_mb} MB: MB/s", unit="MB/s"
        )
        x = Series(f"docker exec dd, the engine alone, {size_mb} MB: MB/s", unit="MB/s")
        container = await asyncio.to_thread(container_of, cl, "n1", ws)
        paths: list[tuple[Series, Callable[[], tuple[float, int]]]] = [
            (v, functools.partial(_pull, local_host, int(local_port))),
            (s, functools.partial(_pull, "127.0.0.1", ssh_port)),
            (j, functools.partial(_pull, "127.0.0.1", hop_port)),
            (e, functools.partial(_pull, "127.0.0.1", editor_port)),
            (r, functools.partial(_pull, "127.0.0.1", relayed_port)),
            (x, functools.partial(_exec_pull, container, size_mb)),
        ]
        # Warm-up: the first pull of each side also proves every path works end to end.
        for series, pull in paths:
            _, n = await asyncio.to_thread(pull)
            if n != size_mb * MB:
                raise RuntimeError(f"{series.name}: pulled {n} bytes, wanted {size_mb} MB")
        for _ in range(rounds):
            for series, pull in paths:
                secs, n = await asyncio.to_thread(pull)
                if n != size_mb * MB:
                    raise RuntimeError(f"{series.name}: pulled {n} bytes")
                series.seconds.append(n / secs / MB)
        return {
            "rows": [
                row(s),
                row(v, s),
                row(j, s),
                row(
                    e, s, goal=">= 0.9x", met=e.median / s.median >= 0.9, of_hop=e.median / j.median
                ),
                row(r, s, of_hop=r.median / j.median),
                row(x, s, of_engine=r.median / x.median),
            ],
            "node_endpoint": svc.node_endpoint,
            "local_address": svc.local_address,
        }
    finally:
        for proc in (ssh, hop, editor):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        with contextlib.suppress(Exception):
            await cl.stub.DestroyWorkspace(pb.WorkspaceRequest(name=ws, force=True))
