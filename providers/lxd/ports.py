"""Published ports of LXD environments: proxy devices on the node's loopback.

Each port of ``EnvironmentSpec.ports`` becomes a device of the instance named
``vd-port-<port>`` (so it is recognisably ours), of type ``proxy``: LXD's
forkproxy listens on ``tcp:127.0.0.1:<node port>`` on the host
(``bind: host``, loopback only, never another address) and connects each
connection to ``tcp:127.0.0.1:<port>`` inside the container's network
namespace, so it needs no network interface in the container.

The node port is picked free by the agent when the environment is created,
and again at each start for any that another process has taken meanwhile
(LXD refuses to start an instance whose proxy cannot listen). The devices
are the record: status reads the node ports back from them. The agent and
LXD share the host, so "free" is checked by binding here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from common.loopback import LOOPBACK, free_ports, is_free

DEVICE_PREFIX = "vd-port-"


def device_name(port: int) -> str:
    return f"{DEVICE_PREFIX}{port}"


def proxy_device(port: int, node_port: int) -> dict[str, str]:
    """The device that publishes ``port`` inside on ``127.0.0.1:node_port`` of the node."""
    return {
        "type": "proxy",
        "listen": f"tcp:{LOOPBACK}:{node_port}",
        "connect": f"tcp:{LOOPBACK}:{port}",
        "bind": "host",
    }


def _tcp_port(address: object) -> int | None:
    """The port of ``tcp:HOST:PORT``, else None."""
    if not isinstance(address, str) or not address.startswith("tcp:"):
        return None
    _, _, port = address.rpartition(":")
    return int(port) if port.isdigit() else None


def ours(devices: Mapping[str, Any]) -> dict[int, int]:
    """Inside port -> node port, for each of our proxy devices in ``devices``."""
    found: dict[int, int] = {}
    for name, device in devices.items():
        if not name.startswith(DEVICE_PREFIX) or (device or {}).get("type") != "proxy":
            continue
        inside, node = _tcp_port(device.get("connect")), _tcp_port(device.get("listen"))
        if inside is not None and node is not None:
            found[inside] = node
    return found


def published(devices: Mapping[str, Any]) -> dict[int, str]:
    """Inside port -> ``127.0.0.1:PORT`` on the node, as ``EnvironmentStatus.ports`` has it."""
    return {inside: f"{LOOPBACK}:{node}" for inside, node in sorted(ours(devices).items())}


def devices_for(ports: Iterable[int], avoid: Collection[int] = ()) -> dict[str, dict[str, str]]:
    """Proxy devices for ``ports``, each on a free node port (none in ``avoid``)."""
    wanted = sorted(set(ports))
    return {
        device_name(p): proxy_device(p, node)
        for p, node in zip(wanted, free_ports(len(wanted), avoid), strict=True)
    }


def repicked(devices: Mapping[str, Any], *, everything: bool = False) -> dict[str, dict[str, str]]:
    """New devices for our ports whose node port is taken now (all of them with ``everything``)."""
    current = ours(devices)
    stale = [p for p, node in sorted(current.items()) if everything or not is_free(node)]
    if not stale:
        return {}
    # Our other node ports are free only because the instance is stopped: not those.
    return devices_for(stale, avoid=set(current.values()))


def is_listen_failure(text: str) -> bool:
    """Whether LXD's error for a start is one of our proxies failing to listen."""
    lowered = text.lower()
    if DEVICE_PREFIX in text or ("proxy" in lowered and "address already in use" in lowered):
        return True
    # The same taken port can surface as forkproxy's listener dying before it hands
    # LXD the socket ("Failed to receive fd from listener process", seen under load).
    # Our published ports are the only proxy devices: any of them failing to start is
    # tried again with fresh ports, START_ATTEMPTS times at most.
    return "error occurred when starting proxy device" in lowered


def is_spawn_failure(text: str) -> bool:
    """Whether LXD's error for a start is LXC's spawn aborting (``lxd forkstart ...:
    exit status 1``). Seen now and then under load with nothing wrong in the
    instance ("Sync wait failure", "container state ABORTING" in its lxc.log);
    a proxy device's start hook failing ends the same way."""
    return "forkstart" in text.lower()
