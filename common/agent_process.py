"""Start the node agent in the background if it is not answering, and stop it.

``ensure`` is what runs on a node: the coordinator calls it in-process for the
local node, and the SSH transport runs it as ``vendetta-agent ensure`` once per
connection. It is idempotent and says where the agent listens and how it runs:
there, a ``systemd --user`` unit where that outlives the SSH session
(``agent_unit``), else a detached process with a pid file. It lives here,
not in ``nodeagent``, because it only talks to the agent over its socket:
importing it must not load the agent's server or the providers.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import grpc.aio

from common import agent_unit
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
    runner: str = "detached"  # "systemd" (a user unit) or "detached" (a pid file)
    run_as: str = ""  # how it runs, and why, in words


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


async def ensure(
    agent_dir: Path, run_args: list[str], timeout: float = 30.0, *, unit: bool = False
) -> AgentStatus:
    """Start the agent of ``agent_dir`` unless this build's answers there; with ``unit``
    (on a node) as a user unit where that outlives the SSH session."""
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
        unit_pid = await agent_unit.main_pid(agent_dir)
        pid = unit_pid or await asyncio.to_thread(read_pid, agent_pid(agent_dir))
        return _status(agent_dir, info, pid, started=False, unit=unit_pid > 0)
    plan = agent_unit.Plan(False, "")
    if unit:
        facts = await agent_unit.facts()
        if facts.linger_enabled_now:
            await asyncio.to_thread(agent_unit.mark_linger, agent_dir)
        plan = agent_unit.decide(facts)
    if info is not None:
        # An agent from another build (vendetta was upgraded): replace it. Its
        # services keep running inside their environments; the new agent finds them.
        await stop(agent_dir)
    argv = [sys.executable, "-m", "nodeagent.main", "--dir", str(agent_dir), *run_args, "run"]

    def ready() -> Awaitable[nodeagent_pb2.InfoResponse | None]:
        return probe(sock, 1.0)

    if plan.unit:
        started, pid = await agent_unit.start(agent_dir, argv, ready, timeout)
    else:
        await agent_unit.remove(agent_dir)  # a unit of before must not start another agent
        started, pid = await start_detached(
            "node agent", argv, agent_log(agent_dir), ready, timeout
        )
    return _status(agent_dir, started, pid, started=True, unit=plan.unit, why=plan.why)


def _status(
    agent_dir: Path,
    info: nodeagent_pb2.InfoResponse,
    pid: int,
    *,
    started: bool,
    unit: bool,
    why: str = "",
) -> AgentStatus:
    return AgentStatus(
        socket=str(agent_socket(agent_dir)),
        version=info.version,
        agent_id=info.agent_id,
        pid=pid,
        started=started,
        runner="systemd" if unit else "detached",
        run_as=agent_unit.describe(agent_dir, unit, agent_pid(agent_dir), why),
    )


async def stop(agent_dir: Path, timeout: float = 15.0) -> bool:
    """Stop the agent of ``agent_dir`` (its unit, removed, or SIGTERM and wait);
    False if none was running."""
    by_unit = await agent_unit.remove(agent_dir)
    pid = await asyncio.to_thread(read_pid, agent_pid(agent_dir))
    return await terminate(pid, timeout) or by_unit
