"""Profiling aid (issue 16): `python -m bench.logs_drive SECONDS [WIDTH] [N] [SIDES]` sets
up the bench cluster and repeats throughput rounds (as bench/logs.py's) for SECONDS,
alternating the SIDES given (comma-separated: vendetta, ssh; default vendetta). Each
round prints its lines/s and the CPU seconds every process on the machine spent during
it (from /proc, sampled every 0.1 s, so short-lived ones such as `docker exec` count
too), and the pids to attach py-spy to come first."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import docker

from bench.cluster import bench_cluster
from bench.logs import IDLE_MAIN, _config, _ssh_round, _vendetta_round
from vendetta.v1 import coordinator_pb2 as pb

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_by_pid(root: str) -> dict[int, tuple[str, float]]:
    """Every process: (a short name, utime + stime seconds); a name starts with "*" when
    ``root`` (this run's directory) is in its command line or environment: this
    cluster's coordinator, agent and sshd, not another one on the machine."""
    found: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes()
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        argv = cmdline.split(b"\0")
        mine = "*" if root.encode() in cmdline or root.encode() in environ else ""
        fields = stat[stat.rindex(")") + 2 :].split()
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        # Python processes by what they run: the coordinator, the agent, this bench.
        words = [a.decode(errors="replace") for a in argv[1:4] if a]
        name = (
            comm
            if not comm.startswith("python") and "vendetta" not in comm
            else " ".join([comm, *(Path(w).name for w in words)])
        )
        if comm in ("dockerd", "containerd"):  # nested engines (node images) are others'
            name = f"{comm}[{entry.name}]"
        found[int(entry.name)] = (mine + name[:60], (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return found


class CpuWindow:
    """CPU seconds per process name over a window (a sampler thread; first and last
    sample of each pid, so a process that exits within the window still counts)."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.first: dict[int, tuple[str, float]] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self._sample()
        self._sample()  # the end of the window

    def _sample(self) -> None:
        for pid, seen in _cpu_by_pid(self.root).items():
            self.first.setdefault(pid, (seen[0], 0.0))
            self.last[pid] = seen

    def __enter__(self) -> CpuWindow:
        self.first = _cpu_by_pid(self.root)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def top(self, count: int = 8) -> list[tuple[str, float]]:
        by_name: dict[str, float] = collections.defaultdict(float)
        for pid, (name, cpu) in self.last.items():
            by_name[name] += cpu - self.first[pid][1]
        return sorted(by_name.items(), key=lambda x: -x[1])[:count]


async def main(seconds: float, width: int, n: int, sides: list[str]) -> None:
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
                side = sides[k % len(sides)]
                k += 1
                w0 = time.monotonic()
                with CpuWindow(root) as cpu:
                    if side == "ssh":
                        secs, _ = await _ssh_round(cl.nodes["n1"], container, k, script)
                    else:
                        secs, _ = await _vendetta_round(cl, ws, container, k, script)
                busy = ", ".join(f"{name} {s:.2f}" for name, s in cpu.top() if s >= 0.01)
                window = time.monotonic() - w0  # with attaching and SYNC, so more than secs
                print(
                    f"{side}: {n / secs:,.0f} lines/s in {secs:.2f} s; "
                    f"CPU s in the round's {window:.1f} s: {busy}",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            float(args[0]),
            int(args[1]) if len(args) > 1 else 64,
            int(args[2]) if len(args) > 2 else 100_000,
            (args[3] if len(args) > 3 else "vendetta").split(","),
        )
    )
