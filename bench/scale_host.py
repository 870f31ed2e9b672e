"""Processes for the scale benchmark (run by bench.scale, not by hand).

    python -m bench.scale_host agents DIR NAME...      # one AgentServer per NAME
    python -m bench.scale_host coordinator HOME DIR NAME...

`agents` serves one real AgentServer (the real gRPC servicer, over a trivial
in-memory provider) per node name on DIR/NAME/agent.sock, all in this one
process. `coordinator` runs the real Coordinator with those names registered
in its SQLite store as SSH nodes, reaching each agent's unix socket through
a transport that opens a gRPC channel to it (no SSH: the scale under test is
the coordinator's). Both print one JSON line once ready, then serve until
SIGTERM/SIGINT and stop cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path

from coordinator.models import LOCAL_NODE, NodeRecord, NodeState
from coordinator.server import Coordinator
from coordinator.transports import Transport
from nodeagent.providers import ProviderSet
from nodeagent.server import AgentServer
from tests.support.fakes import FakeProvider, FakeTransport


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def agents(root: Path, names: list[str]) -> None:
    servers: list[AgentServer] = []
    t0 = time.perf_counter()
    try:
        for name in names:
            provider = FakeProvider(f"agent-{name}")
            server = AgentServer(root / name, providers=ProviderSet({"docker": provider}))
            await server.start()
            servers.append(server)
        print(json.dumps({"ready_s": time.perf_counter() - t0, "agents": len(servers)}), flush=True)
        await _until_signal()
    finally:
        await asyncio.gather(*(s.stop(grace=0.5) for s in servers), return_exceptions=True)


async def coordinator(home: Path, root: Path, names: list[str]) -> None:
    def factory(record: NodeRecord) -> Transport:
        return FakeTransport(root / record.name / "agent.sock", record.name)

    coord = Coordinator(home, transport_factory=factory)
    try:
        for name in names:
            if name != LOCAL_NODE and await coord.store.get_node(name) is None:
                await coord.store.add_node(
                    NodeRecord(name=name, address=f"{name}.bench", transport="ssh", user="bench")
                )
        t0 = time.perf_counter()
        await coord.start()
        while True:
            states = [c.state for c in coord.nodes.all()]
            ready = sum(s == NodeState.READY for s in states)
            if ready >= len(names):
                break
            if time.perf_counter() - t0 > 300:
                raise RuntimeError(f"only {ready} of {len(names)} nodes READY after 300 s")
            await asyncio.sleep(0.05)
        print(
            json.dumps({"ready_s": time.perf_counter() - t0, "nodes": len(states)}),
            flush=True,
        )
        await _until_signal()
    finally:
        await coord.stop(grace=0.5)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    kind, *args = sys.argv[1:]
    if kind == "agents":
        asyncio.run(agents(Path(args[0]), args[1:]))
    elif kind == "coordinator":
        asyncio.run(coordinator(Path(args[0]), Path(args[1]), args[2:]))
    else:
        raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
