"""Control-plane overhead (issue 7 item 1), per provider.

`workspace up`/`down` through coordinator -> SSH tunnel -> agent -> engine,
versus the same lifecycle done directly with the engine's SDK on the same
image, round by round (SDK up, SDK down, vendetta up, vendetta down: each side
alone on the machine):

- docker: docker-py start + inspect / stop + inspect of a container of the
  same image and idle command;
- lxd: pylxd start(wait) + sync / graceful stop(wait) + sync of a twin
  instance (created by vendetta, never started by it); graceful (init's
  SIGPWR, as `workspace down` does), not pylxd's default forced stop;
- qemu: libvirt create + wait for the guest agent / guest-agent shutdown +
  wait until off, on a twin domain (same image, same definition).

LXD and QEMU are measured only if their engines answer; QEMU boots take
seconds, so few rounds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import docker

from bench.cluster import IMAGE, Cluster
from bench.stats import Series, row
from providers.docker.provider import IDLE_COMMAND
from vendetta.v1 import coordinator_pb2 as pb

Step = Callable[[], Awaitable[object]]


@dataclass
class Sdk:
    """The baseline side: start and stop of the same kind of environment."""

    name_up: str
    name_down: str
    up: Step
    down: Step
    close: Step


async def _measure(
    cl: Cluster, provider: str, ws: str, sdk: Sdk, rounds: int
) -> list[dict[str, Any]]:
    c = cl.stub
    v_up = Series(f"{provider}: workspace up (coordinator, tunnel, agent)")
    v_down = Series(f"{provider}: workspace down (coordinator, tunnel, agent)")
    d_up, d_down = Series(f"{provider}: {sdk.name_up}"), Series(f"{provider}: {sdk.name_down}")

    async def timed(series: Series, step: Step) -> None:
        t0 = time.perf_counter()
        await step()
        series.seconds.append(time.perf_counter() - t0)

    for _ in range(rounds):
        await timed(d_up, sdk.up)
        await timed(d_down, sdk.down)
        await timed(v_up, lambda: c.UpWorkspace(pb.WorkspaceRequest(name=ws), timeout=300))
        await timed(v_down, lambda: c.DownWorkspace(pb.WorkspaceRequest(name=ws), timeout=300))
    return [row(d_up), row(v_up, d_up), row(d_down), row(v_down, d_down)]


# --------------------------------------------------------------------------- docker


async def _docker(cl: Cluster, rounds: int) -> list[dict[str, Any]]:
    client = docker.from_env()
    ws = "bench-life-docker"
    config = f"name: {ws}\ndocker: {{image: '{IMAGE}'}}\n"
    await cl.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=ws, node="n1", config_yaml=config))
    container = await asyncio.to_thread(
        client.containers.create, IMAGE, list(IDLE_COMMAND), labels={"vendetta.bench": "life"}
    )

    async def up() -> None:
        await asyncio.to_thread(container.start)
        await asyncio.to_thread(container.reload)

    async def down() -> None:
        await asyncio.to_thread(container.stop, timeout=10)
        await asyncio.to_thread(container.reload)

    async def close() -> None:
        await asyncio.to_thread(container.remove, force=True)
        client.close()

    sdk = Sdk("docker-py start + inspect", "docker-py stop + inspect", up, down, close)
    try:
        return await _measure(cl, "docker", ws, sdk, rounds)
    finally:
        await sdk.close()
        await cl.stub.DestroyWorkspace(pb.WorkspaceRequest(name=ws, force=True))


# --------------------------------------------------------------------------- lxd


def _lxd_client() -> Any:
    import pylxd

    client = pylxd.Client()
    client.instances.all()  # answers, or raises
    return client


async def _lxd(cl: Cluster, rounds: int) -> list[dict[str, Any]]:
    client = await asyncio.wait_for(asyncio.to_thread(_lxd_client), 20)
    ws, twin = "bench-life-lxd", "bench-life-lxd-sdk"
    for name in (ws, twin):
        config = f"name: {name}\nprovider: lxd\nlxd: {{image: 'vendetta/busybox'}}\n"
        await cl.stub.CreateWorkspace(
            pb.CreateWorkspaceRequest(name=name, node="n1", config_yaml=config), timeout=300
        )
    try:
        prefix = f"vd-{twin}-"
        instances = await asyncio.to_thread(client.instances.all)
        inst = next(i for i in instances if i.name.startswith(prefix))

        async def up() -> None:
            await asyncio.to_thread(inst.start, wait=True)
            await asyncio.to_thread(inst.sync)

        async def down() -> None:
            # Graceful, as `workspace down` is: pylxd forces (SIGKILL) by default.
            await asyncio.to_thread(inst.stop, timeout=10, force=False, wait=True)
            await asyncio.to_thread(inst.sync)

        async def close() -> None:
            pass

        sdk = Sdk("pylxd start(wait) + sync", "pylxd graceful stop(wait) + sync", up, down, close)
        return await _measure(cl, "lxd", ws, sdk, rounds)
    finally:
        for name in (ws, twin):
            await cl.stub.DestroyWorkspace(pb.WorkspaceRequest(name=name, force=True), timeout=300)


# --------------------------------------------------------------------------- qemu


def _libvirt_conn() -> Any:
    import libvirt

    # As the provider does: errors are raised, not printed (the baseline's guest-agent
    # pings fail while the guest boots, each one a line on stderr otherwise).
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("qemu:///system")
    conn.listAllDomains(0)
    return conn


async def _qemu(cl: Cluster, rounds: int) -> list[dict[str, Any]]:
    import libvirt
    import libvirt_qemu

    from providers.qemu.provider import POLL_SECONDS

    conn = await asyncio.wait_for(asyncio.to_thread(_libvirt_conn), 20)
    ws, twin = "bench-life-qemu", "bench-life-qemu-sdk"
    for name in (ws, twin):
        config = f"name: {name}\nprovider: qemu\nqemu: {{image: debian-12, cpu: 1, memory: 1G}}\n"
        await cl.stub.CreateWorkspace(
            pb.CreateWorkspaceRequest(name=name, node="n1", config_yaml=config), timeout=300
        )
    try:
        prefix = f"vd-{twin}-"
        domains = await asyncio.to_thread(conn.listAllDomains, 0)
        dom = next(d for d in domains if d.name().startswith(prefix))
        ping = json.dumps({"execute": "guest-ping"})

        def boot() -> None:
            dom.create()
            deadline = time.monotonic() + 120
            while True:
                try:
                    libvirt_qemu.qemuAgentCommand(dom, ping, 1, 0)
                    break
                except libvirt.libvirtError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(POLL_SECONDS)
            dom.info()

        def shutdown() -> None:
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
            deadline = time.monotonic() + 60
            while dom.isActive():
                if time.monotonic() > deadline:
                    dom.destroy()
                time.sleep(POLL_SECONDS)
            dom.info()

        async def up() -> None:
            await asyncio.to_thread(boot)

        async def down() -> None:
            await asyncio.to_thread(shutdown)

        async def close() -> None:
            await asyncio.to_thread(conn.close)

        sdk = Sdk(
            "libvirt create + guest-agent ping",
            "libvirt guest-agent shutdown + wait off",
            up,
            down,
            close,
        )
        try:
            return await _measure(cl, "qemu", ws, sdk, rounds)
        finally:
            await sdk.close()
    finally:
        for name in (ws, twin):
            await cl.stub.DestroyWorkspace(pb.WorkspaceRequest(name=name, force=True), timeout=300)


async def run(cl: Cluster, quick: bool, providers: list[str]) -> dict[str, Any]:
    """Rows per provider; a provider whose engine does not answer is listed as skipped."""
    plans: dict[str, tuple[Callable[[Cluster, int], Awaitable[list[dict[str, Any]]]], int]] = {
        "docker": (_docker, 4 if quick else 20),
        "lxd": (_lxd, 2 if quick else 8),
        "qemu": (_qemu, 1 if quick else 3),
    }
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name in providers:
        fn, rounds = plans[name]
        try:
            rows.extend(await fn(cl, rounds))
        except Exception as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"[:400]
    return {"rows": rows, "skipped": skipped}
