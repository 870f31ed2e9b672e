"""The benchmarks' cluster: real sshd nodes on loopback, a real coordinator daemon.

    async with bench_cluster(root, nodes=3) as cl:
        cl.stub.CreateWorkspace(...)   # coordinator over its unix socket
        cl.nodes["n1"].sshd            # the node's sshd (host, port, keys)

Everything is torn down on the way out, on errors too: workspaces destroyed
through vendetta, the coordinator and agents stopped, sshd stopped, and any
container left with one of our agents' labels removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import grpc.aio

from common.paths import coordinator_socket
from coordinator import daemon
from tests.support.sshd import SshServer
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import coordinator_pb2_grpc

AGENT = str(Path(sys.executable).parent / "vendetta-agent")
IMAGE = "vendetta/busybox:latest"
# The cipher vendetta's two SSH legs negotiate: the tunnel's ssh offers it first
# (coordinator/transports/openssh_tunnel.py) and ssh-proxy offers only AES-GCM.
HOP_CIPHER = "aes128-gcm@openssh.com"


def _agent_id(agent_dir: Path) -> str:
    try:
        return (agent_dir / "agent-id").read_text().strip()
    except FileNotFoundError:
        return ""


@dataclass
class Node:
    name: str
    sshd: SshServer
    agent_dir: Path

    def agent_id(self) -> str:
        return _agent_id(self.agent_dir)

    def known_hosts(self) -> Path:
        """A known_hosts file pinning this node's host key (for OpenSSH baselines)."""
        path = self.sshd.root / "known_hosts"
        if not path.exists():
            path.write_text(f"[{self.sshd.host}]:{self.sshd.port} {self.sshd.host_public_key()}\n")
        return path

    def ssh_argv(self, *extra: str) -> list[str]:
        """OpenSSH client to this node, host key pinned (never unchecked)."""
        return [
            "ssh",
            "-i",
            str(self.sshd.client_key_path),
            "-p",
            str(self.sshd.port),
            "-o",
            f"UserKnownHostsFile={self.known_hosts()}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            *extra,
            f"{self.sshd.user}@{self.sshd.host}",
        ]

    def hop_options(self) -> list[str]:
        """Options that route an OpenSSH client to this node through one more SSH
        connection to it (a ProxyCommand `ssh -W`), both legs on HOP_CIPHER: the
        topology of `NAME.vendetta` (the user's SSH inside the tunnel's) built from
        OpenSSH alone, with no Python process and no engine on the path."""
        inner = self.ssh_argv("-c", HOP_CIPHER, "-W", "%h:%p")
        return ["-c", HOP_CIPHER, "-o", f"ProxyCommand={shlex.join(inner)}"]


@dataclass
class Cluster:
    root: Path
    home: Path
    stub: coordinator_pb2_grpc.CoordinatorAsyncStub
    nodes: dict[str, Node] = field(default_factory=dict)

    def tunnel_socket(self, node: str) -> Path:
        return self.home / "tunnels" / f"{node}.sock"

    async def destroy_all(self) -> None:
        listed = await self.stub.ListWorkspaces(pb.ListWorkspacesRequest())
        await asyncio.gather(
            *(
                self.stub.DestroyWorkspace(pb.WorkspaceRequest(name=w.name, force=True))
                for w in listed.workspaces
            ),
            return_exceptions=True,
        )


@contextlib.asynccontextmanager
async def bench_cluster(root: Path, nodes: int = 1) -> AsyncIterator[Cluster]:
    home = root / "coord"
    servers: list[Node] = []
    channel: grpc.aio.Channel | None = None
    cluster: Cluster | None = None
    try:
        for i in range(nodes):
            name = f"n{i + 1}"
            sshd = await asyncio.to_thread(
                SshServer.start, root / f"sshd-{name}", f"127.0.0.{5 + i}"
            )
            servers.append(Node(name, sshd, root / f"agent-{name}"))
        await daemon.start(home, [])
        channel = grpc.aio.insecure_channel(f"unix:{coordinator_socket(home)}")
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        cluster = Cluster(root, home, stub)
        for node in servers:
            s = node.sshd
            scan = await stub.ScanHostKey(pb.ScanHostKeyRequest(address=s.host, port=s.port))
            await stub.AddNode(
                pb.AddNodeRequest(
                    name=node.name,
                    address=s.host,
                    port=s.port,
                    user=s.user,
                    identity_file=str(s.client_key_path),
                    host_key=scan.host_key,
                    agent_command=[AGENT, "--dir", str(node.agent_dir)],
                )
            )
            cluster.nodes[node.name] = node
        yield cluster
    finally:
        if cluster is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cluster.destroy_all(), 300)
        if channel is not None:
            await channel.close(None)
        with contextlib.suppress(Exception):
            await daemon.stop(home)
        # The nodes' agents, and the local one the coordinator started for itself.
        for agent_dir in [n.agent_dir for n in servers] + [home / "agent"]:
            await asyncio.to_thread(
                subprocess.run,
                [AGENT, "--dir", str(agent_dir), "stop"],
                capture_output=True,
                check=False,
                timeout=60,
            )
        for node in servers:
            node.sshd.stop()
        try:
            await asyncio.to_thread(
                _remove_leftovers, [n.agent_id() for n in servers] + [_agent_id(home / "agent")]
            )
        except Exception as exc:  # a slow engine must not cost the run its results
            print(f"warning: leftover containers not removed: {exc!r}", file=sys.stderr)


def _remove_leftovers(agent_ids: list[str]) -> None:
    """Containers our agents (or the docker-py baselines) left behind, if any."""
    client = docker.from_env()
    try:
        for c in client.containers.list(all=True, filters={"label": "vendetta.bench"}):
            c.remove(force=True)
        for c in client.containers.list(all=True, filters={"label": "vendetta.managed=true"}):
            if c.labels.get("vendetta.agent") in agent_ids:
                c.remove(force=True)
    finally:
        client.close()
