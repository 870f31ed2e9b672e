"""Concurrency (issue 7 item 6): 50 workspaces brought up at once across 3 nodes.

Each workspace is `create` + `up` through the coordinator (3 sshd nodes, each
with its own agent, all Docker), all 50 started together; the baseline is 50
containers of the same image created and started concurrently in 50 threads
with docker-py. Measured: total wall time, and each workspace's (container's)
own latency from the common start. Rounds alternate the two sides; teardown
is not timed.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker

from bench.cluster import IMAGE, Cluster
from bench.stats import Series, row
from providers.docker.provider import IDLE_COMMAND
from vendetta.v1 import coordinator_pb2 as pb

COUNT = 50


async def _vendetta_round(cl: Cluster, rnd: int, per: Series, count: int) -> float:
    names = [f"bench-conc-{rnd}-{i:02d}" for i in range(count)]
    nodes = sorted(cl.nodes)
    t0 = time.perf_counter()

    async def one(i: int, name: str) -> None:
        config = f"name: {name}\ndocker: {{image: '{IMAGE}'}}\n"
        await cl.stub.CreateWorkspace(
            pb.CreateWorkspaceRequest(name=name, node=nodes[i % len(nodes)], config_yaml=config),
            timeout=600,
        )
        await cl.stub.UpWorkspace(pb.WorkspaceRequest(name=name), timeout=600)
        per.seconds.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))
        return time.perf_counter() - t0
    finally:
        await asyncio.gather(
            *(
                cl.stub.DestroyWorkspace(pb.WorkspaceRequest(name=n, force=True), timeout=600)
                for n in names
            ),
            return_exceptions=True,
        )


def _docker_round(client: Any, rnd: int, per: Series, count: int) -> float:
    containers: list[Any] = []
    t0 = time.perf_counter()

    def one(i: int) -> None:
        c = client.containers.create(
            IMAGE,
            list(IDLE_COMMAND),
            name=f"vd-bench-conc-{rnd}-{i:02d}",
            labels={"vendetta.bench": "concurrency"},
        )
        containers.append(c)
        c.start()
        c.reload()
        per.seconds.append(time.perf_counter() - t0)

    try:
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(one, range(count)))
        return time.perf_counter() - t0
    finally:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda c: c.remove(force=True), containers))


async def run(cl: Cluster, quick: bool, count: int = COUNT) -> dict[str, Any]:
    rounds = 1 if quick else 2
    client = docker.from_env(max_pool_size=count + 10)
    v_total = Series(f"{count} workspaces create+up at once, {len(cl.nodes)} nodes: total")
    d_total = Series(f"{count} containers docker-py create+start at once: total")
    v_per = Series(f"{count} workspaces at once: per-workspace latency")
    d_per = Series(f"{count} containers at once: per-container latency")
    try:
        for rnd in range(rounds):
            d_total.seconds.append(
                await asyncio.to_thread(_docker_round, client, rnd, d_per, count)
            )
            v_total.seconds.append(await _vendetta_round(cl, rnd, v_per, count))
    finally:
        client.close()
    return {"rows": [row(d_total), row(v_total, d_total), row(d_per), row(v_per, d_per)]}
