"""The CLI against docker's own CLI over ssh (issue 16), on the same node.

A user's command is a fresh process each time, so each sample is one whole
command: interpreter start, imports, connecting, the call, printing. Sides
alternate round by round (bench.stats.interleaved):

- `vendetta workspace list`, `workspace status W`, `node list` against the warm
  coordinator the cluster runs, versus `docker -H ssh://USER@NODE:PORT ps`
  (docker dials `ssh ... docker system dial-stdio` on the node each time).
- `vendetta workspace up W` of a stopped Docker workspace on the node versus
  `docker -H ssh://... start C` of a stopped container of the same image; both
  are stopped again between rounds, outside the timing.
- `vendetta --help` alone: what the interpreter and the CLI's imports cost.

Each command's CPU seconds (its own and its waited-for children's, e.g. the
ssh docker runs) are rows too: on a busy machine they vary less than wall time.

Docker's ssh transport runs `ssh` from PATH; a wrapper first in PATH adds the
node's key and pinned host key (BatchMode), as bench/logs.py's baseline does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shlex
import sys
from pathlib import Path
from typing import Any

import docker

from bench.cluster import IMAGE, Cluster, Node
from bench.stats import Series, interleaved, row
from vendetta.v1 import coordinator_pb2 as pb

VENDETTA = str(Path(sys.executable).parent / "vendetta")
IDLE = '["sh", "-c", "exec sleep 2147483647"]'


def _ssh_wrapper(node: Node, folder: Path) -> dict[str, str]:
    """An environment whose `ssh` reaches the node non-interactively, host key pinned."""
    folder.mkdir(parents=True, exist_ok=True)
    opts = node.ssh_argv()[1:-1]  # ssh's options, without the program and USER@HOST
    opts = [o for i, o in enumerate(opts) if o != "-p" and (i == 0 or opts[i - 1] != "-p")]
    wrapper = folder / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh {shlex.join(opts)} "$@"\n')
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


async def _run(argv: list[str], env: dict[str, str], cpu: Series | None = None) -> None:
    """Run a command to its end; with ``cpu``, record the CPU seconds it (and what it
    waited for, e.g. docker's ssh) used: less bent by a busy machine than wall time."""
    before = _children_cpu()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if cpu is not None:
        cpu.seconds.append(_children_cpu() - before)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: exit {proc.returncode}: {err.decode()[-500:]}")


async def run(cl: Cluster, quick: bool) -> dict[str, Any]:
    node = cl.nodes["n1"]
    s = node.sshd
    docker_env = _ssh_wrapper(node, cl.root / "cli-ssh")
    dock = ["docker", "-H", f"ssh://{s.user}@{s.host}:{s.port}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VENDETTA_")}
    env["VENDETTA_HOME"] = str(cl.home)
    env["COLUMNS"] = "150"
    ws = "bench-cli"
    config = f"name: {ws}\ndocker: {{image: '{IMAGE}', command: {IDLE}}}\n"
    client = docker.from_env()
    container: Any = None
    await cl.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=ws, node="n1", config_yaml=config))
    try:
        await cl.stub.UpWorkspace(pb.WorkspaceRequest(name=ws), timeout=300)
        container = await asyncio.to_thread(
            client.containers.create,
            IMAGE,
            ["sleep", "2147483647"],
            name=f"vd-bench-cli-{os.getpid()}",
            # Not the "vendetta.bench" label: another run's teardown removes those.
            labels={"vendetta.bench-cli": "1"},
        )

        cpu: dict[str, Series] = {}

        def cpu_of(name: str) -> Series:
            return cpu.setdefault(name, Series(f"CPU of the process: {name}"))

        def vd(name: str, *args: str) -> Any:
            return lambda: _run([VENDETTA, *args], env, cpu_of(name))

        rounds = 8 if quick else 25
        ps = Series("docker -H ssh://node ps")
        reads = [
            (Series("vendetta workspace list"), vd("list", "workspace", "list")),
            (Series("vendetta workspace status W"), vd("status", "workspace", "status", ws)),
            (Series("vendetta node list"), vd("node list", "node", "list")),
            (Series("vendetta --help (start + imports)"), vd("--help", "--help")),
            (ps, lambda: _run([*dock, "ps"], docker_env, cpu_of("ps"))),
        ]
        await interleaved(2, [(Series("warm-up"), f) for _, f in reads])
        cpu.clear()
        await interleaved(rounds, reads)

        # up of a stopped workspace vs start of a stopped container: stop both
        # (untimed) before each timed start.
        v_up = Series("vendetta workspace up W (stopped Docker workspace)")
        d_up = Series("docker -H ssh://node start C (stopped container)")

        async def vd_up() -> None:
            await cl.stub.DownWorkspace(pb.WorkspaceRequest(name=ws), timeout=300)
            await interleaved(1, [(v_up, vd("up", "workspace", "up", ws))])

        async def docker_start() -> None:
            await asyncio.to_thread(container.stop, timeout=0)
            start = [*dock, "start", container.id]
            await interleaved(1, [(d_up, lambda: _run(start, docker_env, cpu_of("start")))])

        for _ in range(4 if quick else 10):
            await vd_up()
            await docker_start()
        rows = [row(ps)]
        for series, _ in reads[:3]:
            rows.append(row(series, ps, goal="<= 0.4x", met=series.median <= 0.4 * ps.median))
        rows.append(row(reads[3][0], ps))
        rows.append(row(d_up))
        rows.append(row(v_up, d_up, goal="<= 0.8x", met=v_up.median <= 0.8 * d_up.median))
        rows.append(row(cpu["ps"]))
        for name in ("list", "status", "node list", "--help"):
            rows.append(row(cpu[name], cpu["ps"]))
        rows.append(row(cpu["start"]))
        rows.append(row(cpu["up"], cpu["start"]))
        return {"rows": rows}
    finally:
        if container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                await asyncio.to_thread(container.remove, force=True)
        client.close()
        await cl.stub.DestroyWorkspace(pb.WorkspaceRequest(name=ws, force=True))
