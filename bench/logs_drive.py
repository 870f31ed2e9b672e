"""Profiling aid (issue 16): `python -m bench.logs_drive SECONDS [WIDTH] [N]` sets up the
bench cluster and repeats `workspace logs -f` throughput rounds (as bench/logs.py's) for
SECONDS, printing each round's lines/s and the pids to attach py-spy to."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import docker

from bench.cluster import bench_cluster
from bench.logs import IDLE_MAIN, _config, _vendetta_round
from vendetta.v1 import coordinator_pb2 as pb


async def main(seconds: float, width: int, n: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="vd-bench-", dir="/tmp"))
    try:
        async with bench_cluster(root) as cl:
            ws = "bench-logs-drive"
            await cl.stub.CreateWorkspace(
                pb.CreateWorkspaceRequest(name=ws, node="n1", config_yaml=_config(ws, IDLE_MAIN))
            )
            await cl.stub.UpWorkspace(pb.WorkspaceRequest(name=ws))
            got = await cl.stub.GetWorkspace(pb.GetWorkspaceRequest(name=ws))
            client = docker.from_env()
            container = client.containers.get(got.environment_id)
            print(f"READY bench={os.getpid()} root={root}", flush=True)
            script = f"yes {'x' * (width - 1)} | head -n {n}"
            end, k = time.monotonic() + seconds, 0
            while time.monotonic() < end:
                k += 1
                secs, nb = await _vendetta_round(cl, ws, container, k, script)
                print(f"{n / secs:,.0f} lines/s ({nb} bytes)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            float(args[0]),
            int(args[1]) if len(args) > 1 else 64,
            int(args[2]) if len(args) > 2 else 100_000,
        )
    )
