"""The QEMU provider's published ports as domain XML: forwards written, read back, replaced."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from pathlib import Path

from providers.qemu import network
from providers.qemu.domain import NS_URI, Files, Meta
from tests.support.qemu import domain_text


def _domain(ports: tuple[int, ...] = (3000, 5432)) -> str:
    return domain_text(Files.for_domain(Path("/s"), "vd-ws-a1"), ports)


def test_forwards_are_loopback_only_into_a_restricted_guest() -> None:
    args = network.commandline_args({3000: 41000, 5432: 41001}, 0x1F)
    assert args[0] == "-netdev" and args[2] == "-device"
    netdev = args[1].split(",")
    assert "restrict=on" in netdev  # the guest reaches neither the node nor the outside
    assert "hostfwd=tcp:127.0.0.1:41000-10.0.2.15:3000" in netdev
    assert "hostfwd=tcp:127.0.0.1:41001-10.0.2.15:5432" in netdev
    assert not [p for p in netdev if p.startswith("hostfwd=") and "127.0.0.1:" not in p]
    assert {"romfile=", "bus=pci.0", "addr=0x1f"} <= set(args[3].split(","))


def test_the_nic_takes_a_pci_slot_no_other_device_has() -> None:
    root = ET.fromstring(_domain())
    devices = root.find("devices")
    assert devices is not None
    assert network.free_pci_slot(root) == 0x1F
    for slot in (0x1F, 0x1E, 0x03):  # as libvirt writes assigned addresses
        ctrl = ET.SubElement(devices, "controller", type="usb")
        ET.SubElement(ctrl, "address", type="pci", domain="0x0000", bus="0x00", slot=f"{slot:#04x}")
    assert network.free_pci_slot(root) == 0x1D
    xml = network.with_forwards(ET.tostring(root, encoding="unicode"), {80: 41000})
    (device,) = [a.get("value") for a in ET.fromstring(xml).iter(f"{{{network.QEMU_NS}}}arg")][3:]
    assert device is not None and device.endswith(",addr=0x1d")


def test_forwards_written_into_the_domain_are_read_back() -> None:
    xml = network.with_forwards(_domain(), {3000: 41000, 5432: 41001})
    root = ET.fromstring(xml)
    assert network.forwards_of(root) == {3000: 41000, 5432: 41001}
    assert network.published(network.forwards_of(root)) == {
        3000: "127.0.0.1:41000",
        5432: "127.0.0.1:41001",
    }
    # our metadata survives the rewrite
    metadata = root.find("metadata")
    assert metadata is not None
    (meta_el,) = list(metadata)
    assert meta_el.tag == f"{{{NS_URI}}}env"
    assert Meta.from_xml(ET.tostring(meta_el, encoding="unicode")).ports == (3000, 5432)


def test_new_forwards_replace_the_old_and_keep_foreign_arguments() -> None:
    first = network.with_forwards(_domain(), {3000: 41000})
    # someone added an argument of their own to the domain
    root = ET.fromstring(first)
    cmd = root.find(f"{{{network.QEMU_NS}}}commandline")
    assert cmd is not None
    for value in ("-global", "kvm-pit.lost_tick_policy=discard"):
        ET.SubElement(cmd, f"{{{network.QEMU_NS}}}arg", value=value)
    second = network.with_forwards(ET.tostring(root, encoding="unicode"), {3000: 42000})
    root = ET.fromstring(second)
    assert network.forwards_of(root) == {3000: 42000}
    values = [a.get("value") for a in root.iter(f"{{{network.QEMU_NS}}}arg")]
    assert values.count("-netdev") == 1 and values.count("-device") == 1
    assert "kvm-pit.lost_tick_policy=discard" in values
    # no ports: no NIC of ours at all
    none = ET.fromstring(network.with_forwards(second, {}))
    assert network.forwards_of(none) == {}
    assert "-netdev" not in [a.get("value") for a in none.iter(f"{{{network.QEMU_NS}}}arg")]


def test_a_domain_without_ports_has_no_nic() -> None:
    root = ET.fromstring(_domain(ports=()))
    assert root.find("devices/interface") is None
    assert root.find(f"{{{network.QEMU_NS}}}commandline") is None
    assert network.forwards_of(root) == {}


def test_picked_node_ports_are_distinct_and_free() -> None:
    forwards = network.pick_forwards([80, 443, 80, 8080])
    assert sorted(forwards) == [80, 443, 8080]
    assert len(set(forwards.values())) == 3
    for node_port in forwards.values():
        with socket.socket() as s:
            s.bind(("127.0.0.1", node_port))  # still free: nothing was left holding it
