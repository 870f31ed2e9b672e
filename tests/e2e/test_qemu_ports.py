"""A service port of a QEMU workspace on the user's machine, through the coordinator,
for a node reached over a real sshd: served by the guest, gone after down, back
after up (a new boot, with a node port picked again).
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_ports import fetch, free_port
from tests.support.cli import cli_env
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.qemu, pytest.mark.sshd]

SECTION = "qemu: {image: debian-12, cpu: 1, memory: 512M, disk: 2G}"


def test_service_port_of_a_vm_is_on_the_users_machine() -> None:
    port = free_port()
    with cli_env(prefix="vd-qports-") as e:
        e.nodes["n1"] = SshServer.start(e.home / "sshd", host="127.0.0.12")
        e.cli("server", "start")
        e.add_node("n1", e.nodes["n1"])
        cfg = e.home / "vmweb" / ".vendetta" / "config.yaml"
        cfg.parent.mkdir(parents=True)
        # The page is the guest kernel's command line: proof it is served from the VM.
        cfg.write_text(
            f"name: vmweb\nprovider: qemu\n{SECTION}\nservices:\n"
            f"  web:\n    command: >-\n      mkdir -p /www && cat /proc/cmdline > /www/index.html"
            f" && exec httpd -f -p {port} -h /www\n"
            f"    port: {port}\n    health_check: {{http: /, interval: 0.5}}\n"
        )
        e.cli("workspace", "create", "vmweb", "--remote", "n1", "--config", str(cfg))
        up = e.cli("workspace", "up", "vmweb")
        assert f"http://localhost:{port}" in up.stdout
        assert "root=/dev/vda" in fetch(port)  # the CLI has exited: the coordinator forwards

        (row,) = json.loads(e.cli("workspace", "ports", "vmweb", "--json").stdout)
        assert row["local_address"] == f"localhost:{port}"
        assert str(row["node_endpoint"]).startswith("127.0.0.1:")  # the node's loopback only

        e.cli("workspace", "down", "vmweb")
        with pytest.raises(OSError):
            fetch(port)
        e.cli("workspace", "up", "vmweb")
        assert "root=/dev/vda" in fetch(port)
        e.cli("workspace", "destroy", "vmweb")
