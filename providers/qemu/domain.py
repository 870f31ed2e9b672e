"""Libvirt domain XML for a vendetta guest, and the metadata that marks it as ours.

A domain carries a ``<metadata>`` element in :data:`NS_URI` naming the agent,
the workspace and what the provider needs again later (image, command, env,
the files it owns), so an agent finds its own guests after a restart and
never touches another agent's.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.paths import MAX_SOCKET_PATH

NS_URI = "https://vendetta.dev/xmlns/libvirt/qemu/1"
NS_PREFIX = "vendetta"
ET.register_namespace(NS_PREFIX, NS_URI)

# Guest-side device names (see scripts/build-guest-image.sh).
AGENT_CHANNEL = "org.qemu.guest_agent.0"
STDOUT_CHANNEL = "org.vendetta.stdout"
STDERR_CHANNEL = "org.vendetta.stderr"
# Commands with stdin (mux.py); the guest's end is guest_mux.PORT.
MUX_CHANNEL = "org.vendetta.mux"
# The virtio console interactive terminals run on (the guest's /dev/hvc0, see
# terminal.py), found again in a domain's XML by its alias.
TERMINAL_ALIAS = "ua-vendetta-terminal"


@dataclass(frozen=True)
class Files:
    """Host files one guest owns: all of them go away with the environment."""

    overlay: Path
    console: Path
    stdout: Path
    stderr: Path
    agent_socket: Path
    mux_socket: Path

    @classmethod
    def for_domain(cls, state_dir: Path, domain: str) -> Files:
        return cls(
            overlay=state_dir / f"{domain}.qcow2",
            console=state_dir / f"{domain}.console.log",
            stdout=state_dir / f"{domain}.stdout.log",
            stderr=state_dir / f"{domain}.stderr.log",
            agent_socket=state_dir / f"{domain}.agent.sock",
            # Short: a unix socket path has at most 107 bytes (see socket_path_problem).
            mux_socket=state_dir / f"{domain}.mux",
        )

    def all(self) -> tuple[Path, ...]:
        return (
            self.overlay,
            self.console,
            self.stdout,
            self.stderr,
            self.agent_socket,
            self.mux_socket,
        )

    def remove(self) -> None:
        """Remove every file of the guest that exists, rotated logs too. Blocking."""
        for path in self.all():
            path.unlink(missing_ok=True)
            # virtlogd rotates file outputs to NAME.0, NAME.1, ...
            for rotated in path.parent.glob(path.name + ".*"):
                if rotated.name[len(path.name) + 1 :].isdigit():
                    rotated.unlink(missing_ok=True)


@dataclass(frozen=True)
class Meta:
    """What we store in the domain's metadata element."""

    agent: str
    workspace: str
    image: str
    state_dir: str
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # Guest ports to publish on the node's loopback (see network.py).
    ports: tuple[int, ...] = ()
    # The workspace's source: the node's folder, copied to ``workdir`` in the guest at
    # its first start (source.py); commands start there, as ``user`` ("": root).
    source_path: str = ""
    workdir: str = ""
    user: str = ""
    # The coordinator that made it (orphans tell another coordinator's guest by it).
    owner: str = ""

    def to_xml(self) -> str:
        def q(tag: str) -> str:
            return f"{{{NS_URI}}}{tag}"

        root = ET.Element(q("env"))
        for key in ("agent", "workspace", "image", "state_dir"):
            ET.SubElement(root, q(key)).text = str(getattr(self, key))
        if self.command is not None:
            ET.SubElement(root, q("command")).text = json.dumps(list(self.command))
        ET.SubElement(root, q("environment")).text = json.dumps(dict(self.env))
        if self.ports:
            ET.SubElement(root, q("ports")).text = json.dumps(list(self.ports))
        for key in ("source_path", "workdir", "user", "owner"):
            if getattr(self, key):
                ET.SubElement(root, q(key)).text = str(getattr(self, key))
        return ET.tostring(root, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> Meta:
        root = ET.fromstring(text)
        # libvirt hands the element back with its namespace on every child.
        values = {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in root}
        command = values.get("command")
        return cls(
            agent=values.get("agent", ""),
            workspace=values.get("workspace", ""),
            image=values.get("image", ""),
            state_dir=values.get("state_dir", ""),
            command=tuple(json.loads(command)) if command else None,
            env=json.loads(values.get("environment") or "{}"),
            ports=tuple(int(p) for p in json.loads(values.get("ports") or "[]")),
            source_path=values.get("source_path", ""),
            workdir=values.get("workdir", ""),
            user=values.get("user", ""),
            owner=values.get("owner", ""),
        )


def socket_path_problem(files: Files) -> str:
    """Why QEMU could not bind a guest's sockets (a path is too long), or ''."""
    for path in (files.agent_socket, files.mux_socket):
        length = len(str(path).encode())
        if length > MAX_SOCKET_PATH:
            return (
                f"the socket path {path} is {length} bytes, more than a unix socket allows "
                f"({MAX_SOCKET_PATH}): use a shorter workspace name or state directory"
            )
    return ""


def terminal_console(root: ET.Element) -> str:
    """The alias of a domain's terminal console ('' for a guest without one, or with the
    unix-socket console of before, which libvirt cannot open for us)."""
    for console in root.iterfind("devices/console"):
        alias = console.find("alias")
        name = alias.get("name") if alias is not None else None
        if console.get("type") == "pty" and name == TERMINAL_ALIAS:
            return TERMINAL_ALIAS
    return ""


def mux_socket(root: ET.Element) -> str:
    """The node-side socket of a domain's stream port ('' for a guest made without one)."""
    for channel in root.iterfind("devices/channel"):
        target = channel.find("target")
        source = channel.find("source")
        ours = target is not None and target.get("name") == MUX_CHANNEL
        if ours and channel.get("type") == "unix" and source is not None:
            return source.get("path", "")
    return ""


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")
    )


def domain_xml(
    *,
    name: str,
    virt_type: str,
    vcpus: int,
    memory_kib: int,
    kernel: Path,
    initrd: Path,
    files: Files,
    meta: Meta,
) -> str:
    """A persistent domain: direct kernel boot, root on the overlay, no NIC.

    Besides the serial console (a log file), a virtio console on a pty carries
    interactive terminals (terminal.py), and a virtio-serial port on a unix
    socket commands with stdin (mux.py); both are reached through libvirt
    (channel.py), which an agent run as a user in the libvirt group may use.

    The NIC of a guest with published ports is added at each start, with the
    node ports of that start (network.with_forwards).

    Under ``kvm`` the host CPU is passed through; under ``qemu`` (TCG) QEMU's
    default model is emulated. ACPI is on so the guest can be shut down.
    """
    cpu = "<cpu mode='host-passthrough'/>" if virt_type == "kvm" else ""
    metadata = meta.to_xml()

    def file_channel(path: Path, target: str) -> str:
        return (
            f"<channel type='file'><source path='{_escape(str(path))}' append='on'/>"
            f"<target type='virtio' name='{target}'/></channel>"
        )

    return f"""<domain type='{virt_type}'>
  <name>{_escape(name)}</name>
  <metadata>{metadata}</metadata>
  <memory unit='KiB'>{memory_kib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{_escape(str(kernel))}</kernel>
    <initrd>{_escape(str(initrd))}</initrd>
    <cmdline>root=/dev/vda rw console=ttyS0 quiet loglevel=4 panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  {cpu}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{_escape(str(files.overlay))}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{_escape(str(files.console))}' append='on'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{_escape(str(files.console))}' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <console type='pty'>
      <target type='virtio'/>
      <alias name='{TERMINAL_ALIAS}'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='{_escape(str(files.agent_socket))}'/>
      <target type='virtio' name='{AGENT_CHANNEL}'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='{_escape(str(files.mux_socket))}'/>
      <target type='virtio' name='{MUX_CHANNEL}'/>
    </channel>
    {file_channel(files.stdout, STDOUT_CHANNEL)}
    {file_channel(files.stderr, STDERR_CHANNEL)}
    <memballoon model='none'/>
  </devices>
</domain>
"""


ROOT_USERS = frozenset({"", "root", "0", "0:0", "root:root"})


def guest_argv(argv: Sequence[str], workdir: str, user: str = "") -> list[str]:
    """argv as run by the guest agent (as root): in ``workdir`` if given, as ``user`` if
    not root, never through a shell parse. A name goes through ``su`` (busybox's and
    util-linux's alike); a uid (or uid:gid) through util-linux's ``setpriv``."""
    argv = list(argv)
    if user not in ROOT_USERS:
        name, _, group = user.partition(":")
        if name.isdigit():
            ids = ["--reuid", name, "--regid", group or name, "--clear-groups"]
            argv = ["setpriv", *ids, *argv]
        else:
            # "--": su takes nothing after it as its own option (argv's "-u" stays argv's).
            argv = ["su", "-s", "/bin/sh", "-c", 'exec "$@"', "--", name, "sh", *argv]
    if not workdir:
        return argv
    return ["/bin/sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", workdir, *argv]
