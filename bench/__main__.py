"""`python -m bench [--quick]`: control-plane overhead and RPC latency.

Every figure is measured against a baseline in the same run, interleaved
round by round, so the ratios hold on a noisy machine. Results are printed as
a table and written as JSON under bench-results/.

Measured now (issue 7 items 1 and 2):
  - workspace up/down through coordinator -> SSH tunnel -> agent -> Docker,
    versus the same start/stop done directly with docker-py;
  - a unary call to the agent through the SSH tunnel, versus the same call on
    the agent's own socket, versus a plain gRPC echo on loopback, and a
    coordinator read (GetWorkspace) through its unix socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import grpc
import grpc.aio
from rich.console import Console
from rich.table import Table

from bench.stats import Series, interleaved
from common.paths import coordinator_socket
from coordinator import daemon
from providers.docker.provider import IDLE_COMMAND
from tests.support.sshd import SshServer
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import coordinator_pb2_grpc, nodeagent_pb2, nodeagent_pb2_grpc

IMAGE = "vendetta/busybox:latest"
AGENT = str(Path(sys.executable).parent / "vendetta-agent")
console = Console(width=None if sys.stdout.isatty() else 130)


def _echo_server() -> grpc.aio.Server:
    async def ping(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Ping": grpc.unary_unary_rpc_method_handler(ping)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    return server


async def run(quick: bool) -> dict[str, Any]:
    rpc_rounds = 300 if quick else 3000
    life_rounds = 4 if quick else 20
    root = Path(tempfile.mkdtemp(prefix="vd-bench-", dir="/tmp"))
    home = root / "coord"
    sshd = SshServer.start(root / "sshd", host="127.0.0.5")
    dclient = docker.from_env()
    baseline = None
    results: dict[str, Any] = {"rpc": [], "lifecycle": []}
    try:
        await daemon.start(home, [])
        async with grpc.aio.insecure_channel(f"unix:{coordinator_socket(home)}") as cch:
            c = coordinator_pb2_grpc.CoordinatorStub(cch)
            scan = await c.ScanHostKey(pb.ScanHostKeyRequest(address=sshd.host, port=sshd.port))
            await c.AddNode(
                pb.AddNodeRequest(
                    name="n1",
                    address=sshd.host,
                    port=sshd.port,
                    user=sshd.user,
                    identity_file=str(sshd.client_key_path),
                    host_key=scan.host_key,
                    agent_command=[AGENT, "--dir", str(root / "agent")],
                )
            )
            config = f"name: bench\ndocker: {{image: '{IMAGE}'}}\n"
            await c.CreateWorkspace(
                pb.CreateWorkspaceRequest(name="bench", node="n1", config_yaml=config)
            )

            # --- RPC latency -------------------------------------------------
            echo = _echo_server()
            port = echo.add_insecure_port("127.0.0.1:0")
            await echo.start()
            tunnel = grpc.aio.insecure_channel(f"unix:{home / 'tunnels' / 'n1.sock'}")
            direct = grpc.aio.insecure_channel(f"unix:{root / 'agent' / 'agent.sock'}")
            loop_ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            ping = loop_ch.unary_unary("/bench.Echo/Ping", None, None)
            via_tunnel = nodeagent_pb2_grpc.NodeAgentStub(tunnel)
            via_socket = nodeagent_pb2_grpc.NodeAgentStub(direct)
            hb = nodeagent_pb2.HeartbeatRequest()
            get = pb.GetWorkspaceRequest(name="bench")
            s_echo, s_direct, s_tunnel, s_coord = (
                Series("plain gRPC echo, loopback TCP"),
                Series("agent Heartbeat, agent's unix socket"),
                Series("agent Heartbeat, through the SSH tunnel"),
                Series("coordinator GetWorkspace, unix socket"),
            )
            cases = [
                (s_echo, lambda: ping(b"x")),
                (s_direct, lambda: via_socket.Heartbeat(hb)),
                (s_tunnel, lambda: via_tunnel.Heartbeat(hb)),
                (s_coord, lambda: c.GetWorkspace(get)),
            ]
            await interleaved(50, [(Series("warm-up"), f) for _, f in cases])
            await interleaved(rpc_rounds, cases)  # type: ignore[arg-type]
            for s, base in (
                (s_echo, None),
                (s_direct, s_echo),
                (s_tunnel, s_direct),
                (s_coord, s_echo),
            ):
                row = s.summary()
                if base is not None:
                    row["baseline"] = base.name
                    row["ratio"] = s.median / base.median
                    row["added_ms"] = (s.median - base.median) * 1e3
                results["rpc"].append(row)
            for ch in (tunnel, direct, loop_ch):
                await ch.close(None)
            await echo.stop(None)

            # --- lifecycle: up/down vs docker-py start/stop ------------------
            baseline = await asyncio.to_thread(
                dclient.containers.create,
                IMAGE,
                list(IDLE_COMMAND),
                labels={"vendetta.bench": "baseline"},
            )
            assert baseline is not None
            container = baseline

            async def sdk_start() -> None:
                await asyncio.to_thread(container.start)
                await asyncio.to_thread(container.reload)

            async def sdk_stop() -> None:
                await asyncio.to_thread(container.stop, timeout=10)
                await asyncio.to_thread(container.reload)

            v_up, v_down = (
                Series("workspace up (coordinator, tunnel, agent)"),
                Series("workspace down (coordinator, tunnel, agent)"),
            )
            d_up, d_down = Series("docker-py start + inspect"), Series("docker-py stop + inspect")
            for _ in range(life_rounds):
                await interleaved(1, [(d_up, sdk_start)])
                await interleaved(
                    1, [(v_up, lambda: c.UpWorkspace(pb.WorkspaceRequest(name="bench")))]
                )
                await interleaved(1, [(d_down, sdk_stop)])
                await interleaved(
                    1, [(v_down, lambda: c.DownWorkspace(pb.WorkspaceRequest(name="bench")))]
                )
            for s, base in ((d_up, None), (v_up, d_up), (d_down, None), (v_down, d_down)):
                row = s.summary()
                if base is not None:
                    row["baseline"] = base.name
                    row["ratio"] = s.median / base.median
                    row["added_ms"] = (s.median - base.median) * 1e3
                results["lifecycle"].append(row)
            await c.DestroyWorkspace(pb.WorkspaceRequest(name="bench"))
    finally:
        if baseline is not None:
            await asyncio.to_thread(baseline.remove, force=True)
        await daemon.stop(home)
        await asyncio.to_thread(
            subprocess.run,
            [AGENT, "--dir", str(root / "agent"), "stop"],
            capture_output=True,
            check=False,
        )
        sshd.stop()
        dclient.close()
        shutil.rmtree(root, ignore_errors=True)
    return results


def show(results: dict[str, Any]) -> None:
    for section, title in (
        ("rpc", "RPC latency"),
        ("lifecycle", "Control-plane overhead (docker)"),
    ):
        table = Table(title=title)
        for col in ("measure", "n", "median ms", "p95 ms", "p99 ms", "vs baseline", "added ms"):
            table.add_column(col, justify="left" if col == "measure" else "right")
        for r in results[section]:
            table.add_row(
                r["name"],
                str(r["n"]),
                f"{r['median_ms']:.3f}",
                f"{r['p95_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['ratio']:.2f}x" if "ratio" in r else "baseline",
                f"{r['added_ms']:+.3f}" if "added_ms" in r else "",
            )
        console.print(table)


def main() -> None:
    p = argparse.ArgumentParser(prog="make bench")
    p.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args()
    started = time.time()
    results = asyncio.run(run(args.quick))
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    results["quick"] = args.quick
    results["seconds"] = time.time() - started
    show(results)
    args.out.mkdir(exist_ok=True)
    path = args.out / time.strftime("bench-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(results, indent=2))
    console.print(f"raw results: {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
