"""Editor file transfer (issue 13): `scp` into a workspace through `NAME.vendetta`
against `scp` of the same file to the node's own sshd.

A Docker workspace of the Debian test image (`vendetta/debian12`: OpenSSH's
sftp-server, which current scp speaks) on the bench node; a file of SIZE random
bytes on this machine. Each round copies it once each way, alternating: through
the generated `Host NAME.vendetta` entry (ProxyCommand, coordinator, agent, the
image's sftp-server) and with OpenSSH's scp to the node's sshd (host key
pinned). MB/s = SIZE / the scp process's wall time, its SSH handshake included
on both sides, as a user sees it.

Another row is the topology's own ceiling: the same `scp` to the node's sshd
with the client routed through one more SSH connection to the node (a
ProxyCommand `ssh -W`), both on AES-GCM as vendetta's legs are: the user's SSH
inside a tunnel's SSH, as through `NAME.vendetta`, in OpenSSH alone. The row
through `NAME.vendetta` also gives its ratio to it.

The last two rows time keystroke echo in an interactive session
(bench/keystroke.py): `ssh -tt NAME.vendetta cat` against `ssh -tt node cat`,
one character at a time, both sessions open and typed into in turn.

Two more rows time a session's input alone, without SFTP's requests and
replies: `ssh NAME.vendetta 'cat > FILE' < file` against `ssh node 'cat >
FILE' < file`. On Docker the bytes reach the command through the agent's
FIFOs (providers/docker/fifo_pipes.py), not the engine's exec stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import yaml

from bench import keystroke
from bench.cluster import Cluster, Node
from bench.stats import Series, row
from vendetta.v1 import coordinator_pb2 as pb

MB = 1_000_000
IMAGE = "vendetta/debian12:latest"
GOAL = 0.8  # issue 13: at least 0.8x scp to the node's own sshd
ECHO_GOAL_MS = 2.0  # issue 13: keystroke echo p50 within 2 ms of ssh to the node


def _node_scp(node: Node) -> list[str]:
    sshd = node.sshd
    return [
        "scp", "-q", "-i", str(sshd.client_key_path), "-P", str(sshd.port),
        "-o", f"UserKnownHostsFile={node.known_hosts()}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
    ]  # fmt: skip


async def _scp(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {err.decode().strip()}")
    return time.perf_counter() - t0


async def _cat_in(argv: list[str], blob: Path) -> float:
    """Seconds for ``argv`` (an ssh running `cat > FILE`) to take ``blob`` on its stdin."""
    t0 = time.perf_counter()
    with blob.open("rb") as f:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=f, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} ... cat: exit {proc.returncode}: {err.decode().strip()}")
    return time.perf_counter() - t0


async def _size_inside(cl: Cluster, ws: str, path: str) -> int:
    out = await asyncio.create_subprocess_exec(
        "ssh", "-F", str(cl.home / "ssh" / "config"), f"{ws}.vendetta", "stat", "-c", "%s", path,
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    got, _ = await out.communicate()
    return int(got.strip() or b"-1")


async def run(
    cl: Cluster, quick: bool, size_mb: int | None = None, rounds: int | None = None
) -> dict[str, Any]:
    ws = "bench-scp"
    size_mb = size_mb or 100
    rounds = rounds or (3 if quick else 6)
    node = cl.nodes["n1"]
    blob = Path(cl.home) / "scp-blob"
    remote = f"/tmp/vd-bench-scp-{os.getpid()}"
    try:
        with blob.open("wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(MB))
        config = yaml.safe_dump({"name": ws, "docker": {"image": IMAGE}})
        await cl.stub.CreateWorkspace(
            pb.CreateWorkspaceRequest(name=ws, node="n1", config_yaml=config)
        )
        await cl.stub.UpWorkspace(pb.WorkspaceRequest(name=ws), timeout=120)
        into_ws = ["scp", "-q", "-F", str(cl.home / "ssh" / "config"), str(blob),
                   f"{ws}.vendetta:/tmp/blob"]  # fmt: skip
        to_node = [*_node_scp(node), str(blob), f"{node.sshd.user}@{node.sshd.host}:{remote}"]
        v = Series(f"scp {size_mb} MB into {ws}.vendetta: MB/s", unit="MB/s")
        s = Series(f"scp {size_mb} MB to the node's sshd (OpenSSH): MB/s", unit="MB/s")
        hop_to_node = [*to_node[:1], *node.hop_options(), *to_node[1:]]
        j = Series(
            f"scp {size_mb} MB through one more SSH hop to the node (OpenSSH alone): MB/s",
            unit="MB/s",
        )
        # Warm-up, and proof that the copy through vendetta arrives whole.
        await _scp(into_ws)
        await _scp(to_node)
        await _scp(hop_to_node)
        got = await _size_inside(cl, ws, "/tmp/blob")
        if got != size_mb * MB:
            raise RuntimeError(f"scp into the workspace left {got} bytes, wanted {size_mb} MB")
        cat_ws = [
            "ssh",
            "-F",
            str(cl.home / "ssh" / "config"),
            f"{ws}.vendetta",
            "cat > /tmp/blob-cat",
        ]
        cat_node = [*node.ssh_argv(), f"cat > {remote}-cat"]  # fmt: skip
        cv = Series(f"ssh {ws}.vendetta 'cat > FILE', {size_mb} MB: MB/s", unit="MB/s")
        cn = Series(f"ssh to the node 'cat > FILE' (OpenSSH), {size_mb} MB: MB/s", unit="MB/s")
        await _cat_in(cat_ws, blob)
        for _ in range(rounds):
            for series, argv in ((v, into_ws), (s, to_node), (j, hop_to_node)):
                series.seconds.append(size_mb / await _scp(argv))
            cv.seconds.append(size_mb / await _cat_in(cat_ws, blob))
            cn.seconds.append(size_mb / await _cat_in(cat_node, blob))
        ke = Series(f"keystroke echo, ssh -tt {ws}.vendetta cat")
        kn = Series("keystroke echo, ssh -tt to the node cat (OpenSSH)")
        echo_ws = ["ssh", "-tt", "-F", str(cl.home / "ssh" / "config"), f"{ws}.vendetta", "cat"]
        echo_node = [*node.ssh_argv("-tt"), "cat"]
        keys = 30 if quick else 100
        await asyncio.to_thread(keystroke.measure, [(ke, echo_ws), (kn, echo_node)], keys)
        ratio = v.median / s.median
        added = (ke.median - kn.median) * 1e3
        return {
            "rows": [
                row(s),
                row(j, s),
                row(v, s, goal=f">= {GOAL}x", met=ratio >= GOAL, of_hop=v.median / j.median),
                row(cn),
                row(cv, cn),
                row(kn),
                row(ke, kn, goal=f"<= +{ECHO_GOAL_MS:g} ms", met=added <= ECHO_GOAL_MS),
            ]
        }
    finally:
        blob.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            rm = await asyncio.create_subprocess_exec(
                *node.ssh_argv(), "rm", "-f", remote, f"{remote}-cat",
                stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await rm.wait()
        with contextlib.suppress(Exception):
            await cl.stub.DestroyWorkspace(pb.WorkspaceRequest(name=ws, force=True))
