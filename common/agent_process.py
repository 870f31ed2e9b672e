"""Start the node agent in the background if it is not answering, and stop it.

``ensure`` is what runs on a node: the coordinator calls it in-process for the
local node, and the SSH transport runs it as ``vendetta-agent ensure`` once per
connection. It is idempotent and says where the agent listens. It lives here,
not in ``nodeagent``, because it only talks to the agent over its socket:
importing it must not load the agent's server or the providers.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc.aio

from common.errors import FailedPreconditionError
from common.paths import agent_log, agent_pid, agent_socket, private_dir
from common.process import read_pid, start_detached, terminate
from common.version import build_id
from vendetta.v1 import nodeagent_pb2, nodeagent_pb2_grpc


@dataclass(frozen=True)
class AgentStatus:
    socket: str
    version: str
    agent_id: str
    pid: int
    started: bool  # this call started it


async def probe(sock: Path, timeout: float = 2.0) -> nodeagent_pb2.InfoResponse | None:
    """Info from the agent at ``sock``, or None if nothing answers there."""
    if not os.path.exists(sock):
        return None
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        stub = nodeagent_pb2_grpc.NodeAgentStub(channel)
        try:
            return await stub.Info(nodeagent_pb2.InfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None


async def ensure(agent_dir: Path, run_args: list[str], timeout: float = 30.0) -> AgentStatus:
    try:
        await asyncio.to_thread(private_dir, agent_dir)
    except OSError as exc:
        raise FailedPreconditionError(
            f"cannot create the agent's state folder {agent_dir}: {exc.strerror or exc} "
            f"({exc.filename or agent_dir}): make it writable for this user, or set "
            "XDG_STATE_HOME (or VENDETTA_AGENT_DIR) to a writable folder for its SSH "
            "sessions (e.g. in its ~/.bashrc)"
        ) from exc
    sock = agent_socket(agent_dir)
    info = await probe(sock)
    if info is not None and info.version == build_id():
        pid = await asyncio.to_thread(read_pid, agent_pid(agent_dir))
        return AgentStatus(str(sock), info.version, info.agent_id, pid, False)
    if info is not None:
        # An agent from another build (vendetta was upgraded): replace it. Its
        # services keep running inside their environments; the new agent finds them.
        await stop(agent_dir)
    argv = [sys.executable, "-m", "nodeagent.main", "--dir", str(agent_dir), *run_args, "run"]
    started, pid = await start_detached(
        "node agent", argv, agent_log(agent_dir), lambda: probe(sock, 1.0), timeout
    )
    return AgentStatus(str(sock), started.version, started.agent_id, pid, True)


async def stop(agent_dir: Path, timeout: float = 15.0) -> bool:
    """SIGTERM the agent of ``agent_dir`` and wait; False if none was running."""
    pid = await asyncio.to_thread(read_pid, agent_pid(agent_dir))
    return await terminate(pid, timeout)
