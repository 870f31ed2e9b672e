"""Published ports of a guest: QEMU user-mode networking, restricted, with host forwards.

A guest whose environment publishes ports gets one virtio NIC on a QEMU
user-mode (slirp) netdev with ``restrict=on``: the guest reaches nothing, not
the node and not beyond it. The only traffic is what comes in through a
forward: QEMU listens on ``127.0.0.1:NODE_PORT`` on the node (never on other
addresses) and connects each accepted connection to ``GUEST_ADDRESS:PORT`` in
the guest, which the guest image sets on ``eth0`` at boot (see
scripts/build-guest-image.sh). A guest without ports has no NIC at all.

libvirt 9.0 (Debian 12) has no XML for slirp forwards (``<portForward>``
needs the passt backend, which it rejects), so the netdev and its device are
passed to QEMU through libvirt's ``qemu:commandline``. Node ports are picked
free at each start and written into the persistent definition just before
the domain starts; the running domain's XML is then the record of which node
port leads to which guest port. QEMU owns the listeners: they outlive an
agent restart and go with the guest. No libvirt calls here.

Known limit: QEMU's user-mode stack listens with a backlog of one, so of
several connections opened at the same instant some wait for the client's
SYN retry (~1 s); under TCG emulation bursts of tens of connections can
stall for far longer (its own retries into a slow guest back off).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping

from common.loopback import LOOPBACK, free_ports

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)

# slirp's default network is 10.0.2.0/24 with the node at 10.0.2.2; .15 is the
# address its DHCP would hand out. The guest sets it statically (no DHCP wait).
GUEST_ADDRESS = "10.0.2.15"
NODE_ADDRESS = LOOPBACK
NETDEV_ID = "vdnet0"
_HOSTFWD = re.compile(
    r"^tcp:" + re.escape(NODE_ADDRESS) + r":(\d+)-" + re.escape(GUEST_ADDRESS) + r":(\d+)$"
)


def _q(tag: str) -> str:
    return f"{{{QEMU_NS}}}{tag}"


def commandline_args(forwards: Mapping[int, int], pci_slot: int) -> list[str]:
    """QEMU arguments for a restricted user-mode NIC forwarding node port -> guest port.

    ``forwards`` maps each guest port to its node port. ``romfile=``: no PXE
    ROM (the guest boots its kernel directly; Debian's QEMU may lack the ROM).
    The NIC's PCI slot is given: QEMU creates devices given in this syntax
    before those libvirt gives in JSON, so one placed by QEMU would take a
    slot libvirt has assigned to another device.
    """
    netdev = [f"user,id={NETDEV_ID},restrict=on,ipv6=off"]
    for guest, node in sorted(forwards.items()):
        netdev.append(f"hostfwd=tcp:{NODE_ADDRESS}:{node}-{GUEST_ADDRESS}:{guest}")
    device = f"virtio-net-pci,netdev={NETDEV_ID},romfile=,bus=pci.0,addr={pci_slot:#04x}"
    return ["-netdev", ",".join(netdev), "-device", device]


def free_pci_slot(root: ET.Element) -> int:
    """The highest slot of the root PCI bus that no device of the domain uses.

    libvirt writes every device's address into the definition when it is
    defined and fills slots from the bottom: the top one stays clear of them.
    """
    used = {
        int(address.get("slot", "0"), 0)
        for address in root.iter("address")
        if address.get("type") == "pci" and int(address.get("bus", "0"), 0) == 0
    }
    for slot in range(0x1F, 2, -1):
        if slot not in used:
            return slot
    raise ValueError("no free slot on the guest's PCI bus for its network card")


def _ours(args: list[str], i: int) -> bool:
    """Is args[i], args[i+1] one of our two option pairs?"""
    if i + 1 >= len(args):
        return False
    option, value = args[i], args[i + 1]
    if option == "-netdev":
        return value.startswith(f"user,id={NETDEV_ID},") or value == f"user,id={NETDEV_ID}"
    if option == "-device":
        return f"netdev={NETDEV_ID}," in value + ","
    return False


def _args_of(root: ET.Element) -> list[str]:
    return [
        arg.get("value", "")
        for cmd in root.findall(_q("commandline"))
        for arg in cmd.findall(_q("arg"))
    ]


def with_forwards(domain_xml: str, forwards: Mapping[int, int]) -> str:
    """``domain_xml`` with our NIC forwarding ``forwards`` (guest -> node port), and
    no other NIC of ours; other ``qemu:commandline`` arguments are kept."""
    root = ET.fromstring(domain_xml)
    args = _args_of(root)
    kept: list[str] = []
    i = 0
    while i < len(args):
        if _ours(args, i):
            i += 2
            continue
        kept.append(args[i])
        i += 1
    for cmd in root.findall(_q("commandline")):
        root.remove(cmd)
    if forwards:
        kept += commandline_args(forwards, free_pci_slot(root))
    if kept:
        cmd = ET.SubElement(root, _q("commandline"))
        for value in kept:
            ET.SubElement(cmd, _q("arg"), value=value)
    return ET.tostring(root, encoding="unicode")


def forwards_of(root: ET.Element) -> dict[int, int]:
    """guest port -> node port of our NIC, from a parsed domain XML."""
    args = _args_of(root)
    found: dict[int, int] = {}
    for i, option in enumerate(args):
        if option != "-netdev" or not _ours(args, i):
            continue
        for part in args[i + 1].split(","):
            key, _, value = part.partition("=")
            match = _HOSTFWD.match(value) if key == "hostfwd" else None
            if match:
                found[int(match.group(2))] = int(match.group(1))
    return found


def pick_node_ports(count: int) -> list[int]:
    """``count`` distinct ports free on the node's loopback right now. Blocking.

    QEMU binds them a moment later, and a port taken in between fails the start
    (see ``errors.port_taken``), which the caller retries with new ports.
    """
    return free_ports(count, host=NODE_ADDRESS)


def pick_forwards(ports: Iterable[int]) -> dict[int, int]:
    """guest port -> a free node port, for each of ``ports``."""
    wanted = sorted(set(ports))
    return dict(zip(wanted, pick_node_ports(len(wanted)), strict=True))


def published(forwards: Mapping[int, int]) -> dict[int, str]:
    """EnvironmentStatus.ports: guest port -> "127.0.0.1:NODE_PORT"."""
    return {guest: f"{NODE_ADDRESS}:{node}" for guest, node in sorted(forwards.items())}
