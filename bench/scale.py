"""Scale (issue 7 item 5): one coordinator, N simulated nodes.

For each N: agent processes (bench.scale_host agents) serve N real
AgentServers over a trivial in-memory provider on N unix sockets; the real
Coordinator runs in a process of its own (bench.scale_host coordinator) with
the N nodes registered in its SQLite store, one workspace per node. Measured
against N, from outside that process:

- time until every node is READY after the coordinator starts;
- heartbeat handling: the coordinator's CPU (utime + stime from /proc) over an
  idle window while it heartbeats every node every 5 s, as % of one core and
  CPU ms per heartbeat;
- ListNodes and ListWorkspaces latency over its unix socket (p50/p99),
  interleaved, with the heartbeats going on;
- the coordinator's RSS.

Ratios are against the smallest N of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc.aio

from bench.stats import Series, interleaved, row
from common.paths import coordinator_socket
from coordinator.models import LOCAL_NODE
from coordinator.nodes import HEARTBEAT_INTERVAL
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import coordinator_pb2_grpc

AGENTS_PER_PROCESS = 250
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _spawn(argv: list[str], log: Path, timeout: float) -> tuple[Any, dict[str, Any]]:
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.scale_host",
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(
            f"{argv[0]} did not get ready within {timeout:.0f}s; see {log}"
        ) from None
    if not line:
        await proc.wait()
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}; see {log}")
    return proc, json.loads(line)


async def _stop(proc: Any) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _one(n: int, quick: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="vd-bs-", dir="/tmp"))
    names = [LOCAL_NODE] + [f"s{i:04d}" for i in range(n)]
    procs: list[Any] = []
    coord: Any = None
    channel: grpc.aio.Channel | None = None
    try:
        chunks = math.ceil(len(names) / AGENTS_PER_PROCESS)
        size = math.ceil(len(names) / chunks)
        t0 = time.perf_counter()
        started = await asyncio.gather(
            *(
                _spawn(["agents", str(root), *names[i : i + size]], root / "agents.log", 600)
                for i in range(0, len(names), size)
            )
        )
        procs = [p for p, _ in started]
        agents_s = time.perf_counter() - t0
        coord, info = await _spawn(
            ["coordinator", str(root / "home"), str(root), *names], root / "coord.log", 600
        )
        ready_s = float(info["ready_s"])
        channel = grpc.aio.insecure_channel(f"unix:{coordinator_socket(root / 'home')}")
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)

        sem = asyncio.Semaphore(16)

        async def create(node: str) -> None:
            async with sem:
                await stub.CreateWorkspace(
                    pb.CreateWorkspaceRequest(
                        name=f"w-{node}", node=node, config_yaml=f"name: w-{node}\n"
                    ),
                    timeout=120,
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(create(x) for x in names[1:]))
        create_s = time.perf_counter() - t0

        window = 6.0 if quick else 10.0
        cpu0, w0 = _cpu_seconds(coord.pid), time.perf_counter()
        await asyncio.sleep(window)
        cpu1, w1 = _cpu_seconds(coord.pid), time.perf_counter()
        heartbeats = len(names) * (w1 - w0) / HEARTBEAT_INTERVAL
        idle_cpu = (cpu1 - cpu0) / (w1 - w0)

        s_nodes = Series(f"ListNodes, {n} nodes")
        s_ws = Series(f"ListWorkspaces, {n} workspaces on {n} nodes")
        await interleaved(
            5,
            [
                (Series("warm-up"), lambda: stub.ListNodes(pb.ListNodesRequest())),
                (Series("warm-up"), lambda: stub.ListWorkspaces(pb.ListWorkspacesRequest())),
            ],
        )
        listed = await stub.ListNodes(pb.ListNodesRequest())
        listed_ws = await stub.ListWorkspaces(pb.ListWorkspacesRequest())
        if len(listed.nodes) != len(names) or len(listed_ws.workspaces) != n:
            raise RuntimeError(
                f"listed {len(listed.nodes)} nodes and {len(listed_ws.workspaces)} workspaces, "
                f"wanted {len(names)} and {n}"
            )
        rounds = 100 if quick else 200
        await interleaved(
            rounds,
            [
                (s_nodes, lambda: stub.ListNodes(pb.ListNodesRequest())),
                (s_ws, lambda: stub.ListWorkspaces(pb.ListWorkspacesRequest())),
            ],
        )
        return {
            "nodes": n,
            "agent_processes": len(procs),
            "agents_start_s": agents_s,
            "all_ready_s": ready_s,
            "create_workspaces_s": create_s,
            "idle_cpu_core_fraction": idle_cpu,
            "cpu_ms_per_heartbeat": (cpu1 - cpu0) / heartbeats * 1e3,
            "rss_mb": _rss_mb(coord.pid),
            "list_nodes": s_nodes,
            "list_workspaces": s_ws,
        }
    finally:
        if channel is not None:
            await channel.close(None)
        if coord is not None:
            await _stop(coord)
        await asyncio.gather(*(_stop(p) for p in procs))
        shutil.rmtree(root, ignore_errors=True)


async def run(quick: bool, sizes: list[int]) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    base_nodes: Series | None = None
    base_ws: Series | None = None
    for n in sizes:
        p = await _one(n, quick)
        s_nodes, s_ws = p.pop("list_nodes"), p.pop("list_workspaces")
        rows.append(row(s_nodes, base_nodes, nodes=n))
        rows.append(row(s_ws, base_ws, nodes=n))
        base_nodes = base_nodes or s_nodes
        base_ws = base_ws or s_ws
        p["list_nodes_ms"] = {k: v for k, v in s_nodes.summary().items() if k.endswith("_ms")}
        p["list_workspaces_ms"] = {k: v for k, v in s_ws.summary().items() if k.endswith("_ms")}
        points.append(p)
    return {"rows": rows, "points": points}
