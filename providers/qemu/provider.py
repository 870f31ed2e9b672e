"""QemuProvider: each environment is one QEMU guest, a libvirt domain on the node.

The guest boots the image's kernel directly (``vmlinuz`` + ``initrd.img``) with
its root on a per-workspace qcow2 overlay of the image's ``rootfs.qcow2``.
Commands run through the QEMU guest agent; output is read from host files
(serial console, and virtio-serial ports for stdout/stderr). Interactive
terminals run on a virtio console of the guest (``terminal``). Domains are found
by their vendetta metadata (agent + workspace), never by name alone. Published
ports are QEMU user-mode forwards from the node's loopback into an otherwise
isolated guest, on node ports picked at each start (``network``).

Every libvirt call runs in a thread (``asyncio.to_thread``) through the one
error seam in ``errors``. KVM is used when it actually works on this node
(probed once); otherwise guests run under TCG emulation, slower but real.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

import libvirt

from common.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    EngineUnavailableError,
    FailedPreconditionError,
    ImageNotFoundError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    VendettaError,
)
from common.names import validate_name
from common.process import log_tail
from providers.base import (
    Capabilities,
    EnvironmentSpec,
    EnvironmentStatus,
    EnvState,
    ExecChunk,
    LogRecord,
    Provider,
    Readiness,
    Terminal,
    check_env,
)
from providers.qemu import agent, network
from providers.qemu.domain import (
    NS_URI,
    Files,
    Meta,
    domain_xml,
    guest_argv,
    socket_path_problem,
    terminal_socket,
)
from providers.qemu.errors import IMAGE_HINT, libvirt_errors
from providers.qemu.logs import cursors, read_all
from providers.qemu.terminal import (
    DEFAULT_TERM,
    QemuTerminal,
    busy,
    hang_up,
    missing_console,
    open_session,
)

T = TypeVar("T")

DEFAULT_URI = "qemu:///system"
DEFAULT_IMAGE_DIR = Path("/var/cache/vendetta/images")
DEFAULT_STATE_DIR = Path("/var/lib/vendetta/qemu")
DEFAULT_IMAGE = "debian-12"
DEFAULT_MEMORY = 512 * 1024 * 1024
MIN_MEMORY = 64 * 1024 * 1024
IMAGE_FILES = ("vmlinuz", "initrd.img", "rootfs.qcow2")
# Booting to the guest agent takes seconds under KVM, ~5-20 s under TCG.
AGENT_WAIT_SECONDS = 90.0
POLL_SECONDS = 0.2
# Starts whose picked node ports were taken before QEMU bound them are retried.
FORWARD_ATTEMPTS = 5
# The workspace command runs with the guest's PID 1 output (see build-guest-image.sh).
COMMAND_WRAPPER = 'exec "$@" >/run/vendetta/stdout 2>/run/vendetta/stderr'

_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")

_kvm_lock = threading.Lock()
_kvm_probe: tuple[bool, str] | None = None


def probe_kvm() -> tuple[bool, str]:
    """(usable, why): does a KVM vCPU actually run here? Probed once per process.

    /dev/kvm can exist and still fail at the first vCPU run (e.g. nested
    virtualisation without the MSRs QEMU needs), so start a bare QEMU with
    KVM and the host CPU for a moment: alive after a second means it works.
    """
    global _kvm_probe
    with _kvm_lock:
        if _kvm_probe is not None:
            return _kvm_probe
        if not os.path.exists("/dev/kvm"):
            _kvm_probe = (False, "/dev/kvm does not exist")
        elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
            _kvm_probe = (False, "/dev/kvm is not accessible (chgrp kvm /dev/kvm; chmod 660)")
        else:
            _kvm_probe = _run_kvm_probe()
        return _kvm_probe


def _run_kvm_probe() -> tuple[bool, str]:
    qemu = _find_qemu()
    if not qemu:
        return False, "qemu-system-x86_64 not found"
    argv = [qemu, "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-nodefaults"]
    argv += ["-no-user-config", "-display", "none", "-monitor", "none", "-serial", "none"]
    argv += ["-m", "32"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _, err = proc.communicate(timeout=1.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return True, "KVM works"
    reason = err.decode("utf-8", "replace").strip().splitlines()
    return False, f"KVM does not run guests here ({reason[-1] if reason else proc.returncode})"


def _find_qemu() -> str:
    for path in ("/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm"):
        if os.access(path, os.X_OK):
            return path
    return ""


def _state_of(state: int, reason: int) -> EnvState:
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return EnvState.RUNNING
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return (
            EnvState.CREATED if reason == libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN else EnvState.STOPPED
        )
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return EnvState.STOPPED
    if state in (libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_CRASHED):
        return EnvState.STOPPED
    return EnvState.UNKNOWN


_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    return None


def _accel_of(root: ET.Element) -> str:
    """'KVM' or 'TCG emulation', from the domain's XML type."""
    kind = root.get("type", "")
    return "KVM" if kind == "kvm" else "TCG emulation" if kind == "qemu" else kind


def _check_ports(ports: Sequence[int]) -> tuple[int, ...]:
    for port in ports:
        if not 1 <= port <= 65535:
            raise InvalidArgumentError(f"port {port} is not a TCP port (1-65535)")
    return tuple(sorted(set(ports)))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class QemuProvider(Provider):
    """Environments as QEMU guests managed by libvirt, driven with libvirt-python."""

    name: ClassVar[str] = "qemu"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exec=True,
        follow_logs=True,
        resource_limits=True,
        virtual_machine=True,
        # The guest agent returns a command's output only when it has exited.
        long_exec_streams=False,
        # On the guest's virtio console, one terminal at a time per guest.
        terminal=True,
    )

    def __init__(
        self,
        agent_id: str,
        uri: str | None = None,
        image_dir: Path = DEFAULT_IMAGE_DIR,
        state_dir: Path | None = None,
    ) -> None:
        """Nothing connects here: libvirt is opened on first use, in a thread."""
        if not agent_id:
            raise InvalidArgumentError("agent id must not be empty")
        super().__init__(agent_id)
        # As virsh does: an explicit URI, else LIBVIRT_DEFAULT_URI, else the system daemon.
        self.uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI
        self.image_dir = Path(image_dir)
        self.state_dir = Path(state_dir) if state_dir is not None else DEFAULT_STATE_DIR
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()
        # Domains whose terminal console is in use by a terminal of ours.
        self._terminals: set[str] = set()

    # -- plumbing --------------------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        """The libvirt connection, (re)opened when needed. Blocking."""
        with self._conn_lock:
            conn = self._conn
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except libvirt.libvirtError:
                    pass
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
                self._conn = None
            # libvirt prints every error to stderr unless a handler takes them; ours
            # are raised as exceptions and mapped, so take and drop them.
            libvirt.registerErrorHandler(_ignore_libvirt_error, None)
            with libvirt_errors(self.uri, "connecting to libvirt"):
                conn = libvirt.open(self.uri)
            if conn is None:  # older bindings return None instead of raising
                raise EngineUnavailableError(f"cannot open libvirt at {self.uri}")
            self._conn = conn
            return conn

    async def _run(self, action: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        """Run ``fn(conn)`` in a thread; libvirt errors come out as common.errors."""

        def call() -> T:
            conn = self._connection()
            with libvirt_errors(self.uri, action):
                return fn(conn)

        return await asyncio.to_thread(call)

    def domain_name(self, workspace: str) -> str:
        return f"vd-{workspace}-{_UNSAFE.sub('-', self.agent_id[:8])}"

    def _files(self, domain: str, state_dir: Path | None = None) -> Files:
        return Files.for_domain(state_dir or self.state_dir, domain)

    def _meta(self, dom: libvirt.virDomain) -> Meta | None:
        """Our metadata of ``dom``, or None if it is not a vendetta domain. Blocking."""
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS_URI, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (
                libvirt.VIR_ERR_NO_DOMAIN_METADATA,
                libvirt.VIR_ERR_NO_DOMAIN,
            ):
                return None
            raise
        try:
            return Meta.from_xml(text)
        except (ET.ParseError, ValueError, TypeError):  # a foreign element in our namespace
            return None

    def _own(self, conn: libvirt.virConnect) -> builtins.list[tuple[libvirt.virDomain, Meta]]:
        found = []
        for dom in conn.listAllDomains(0):
            meta = self._meta(dom)
            if meta is not None and meta.agent == self.agent_id:
                found.append((dom, meta))
        return found

    def _find_sync(
        self, conn: libvirt.virConnect, workspace: str
    ) -> tuple[libvirt.virDomain, Meta] | None:
        try:
            dom = conn.lookupByName(self.domain_name(workspace))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            dom = None
        if dom is not None:
            meta = self._meta(dom)
            if meta is not None and meta.agent == self.agent_id and meta.workspace == workspace:
                return dom, meta
        for dom, meta in self._own(conn):  # renamed by hand? still ours
            if meta.workspace == workspace:
                return dom, meta
        return None

    def _require_sync(
        self, conn: libvirt.virConnect, workspace: str
    ) -> tuple[libvirt.virDomain, Meta]:
        found = self._find_sync(conn, workspace)
        if found is None:
            raise self.missing(workspace)
        return found

    def _status_sync(self, dom: libvirt.virDomain, meta: Meta) -> EnvironmentStatus:
        state, reason = dom.state(0)
        env_state = _state_of(state, reason)
        detail = f"libvirt state {_STATE_NAMES.get(state, str(state))}"
        ports: dict[int, str] = {}
        with contextlib.suppress(libvirt.libvirtError, ET.ParseError):
            root = ET.fromstring(dom.XMLDesc(0))  # the running definition when it runs
            detail += f", {_accel_of(root)}"
            if env_state is EnvState.RUNNING and meta.ports:
                ports = network.published(network.forwards_of(root))
        return EnvironmentStatus(
            workspace=meta.workspace,
            provider=self.name,
            state=env_state,
            id=dom.UUIDString(),
            image=meta.image,
            # The guest's own address is not reachable from the node: published
            # ports are the only way in.
            addresses=(),
            detail=detail,
            ports=ports,
        )

    @staticmethod
    def _not_running(workspace: str) -> str:
        return f"workspace {workspace} is not running: run `vendetta workspace up {workspace}`"

    def _image_paths(self, image: str) -> tuple[Path, Path, Path]:
        if not _IMAGE_NAME.fullmatch(image) or ".." in image:
            raise InvalidArgumentError(
                f"invalid guest image name {image!r}: a directory name under {self.image_dir} "
                f"(e.g. {DEFAULT_IMAGE!r})"
            )
        base = self.image_dir / image
        kernel, initrd, rootfs = (base / f for f in IMAGE_FILES)
        missing = [p.name for p in (kernel, initrd, rootfs) if not p.is_file()]
        if missing:
            have = ", ".join(self._images()) or "none"
            raise ImageNotFoundError(
                f"guest image {image!r} not found on this node ({base} lacks "
                f"{', '.join(missing)}); images on this node: {have}. {IMAGE_HINT}"
            )
        return kernel, initrd, rootfs

    # -- readiness -------------------------------------------------------------

    def _images(self) -> builtins.list[str]:
        try:
            entries = sorted(self.image_dir.iterdir())
        except OSError:
            return []
        return [e.name for e in entries if all((e / f).is_file() for f in IMAGE_FILES)]

    async def readiness(self) -> Readiness:
        try:
            version = await self._run("checking libvirt", lambda conn: conn.getLibVersion())
            hv = await self._run("checking libvirt", lambda conn: conn.getVersion())
        except VendettaError as exc:
            return Readiness(ready=False, detail=exc.message)
        kvm, why = await asyncio.to_thread(probe_kvm)
        images = await asyncio.to_thread(self._images)

        def dotted(v: int) -> str:
            return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"

        accel = "KVM" if kvm else f"running under emulation (TCG), slower: {why}"
        detail = f"libvirt {dotted(version)}, QEMU {dotted(hv)} at {self.uri}; {accel}"
        if not images:
            return Readiness(
                ready=False,
                detail=f"{detail}; no guest image in {self.image_dir}: {IMAGE_HINT}",
                version=dotted(version),
            )
        return Readiness(
            ready=True,
            detail=f"{detail}; images: {', '.join(images)}",
            version=dotted(version),
            images=tuple(images),
        )

    # -- lifecycle -------------------------------------------------------------

    async def create(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        workspace = validate_name("workspace", spec.workspace)
        image = spec.image or DEFAULT_IMAGE
        if spec.cpus is not None and spec.cpus <= 0:
            raise InvalidArgumentError(f"cpus must be positive, got {spec.cpus}")
        if spec.memory_bytes is not None and spec.memory_bytes < MIN_MEMORY:
            raise InvalidArgumentError(
                f"memory must be at least {MIN_MEMORY // 2**20} MiB for a guest, "
                f"got {spec.memory_bytes} bytes"
            )
        if spec.disk_bytes is not None and spec.disk_bytes <= 0:
            raise InvalidArgumentError(f"disk must be positive, got {spec.disk_bytes} bytes")
        if spec.command is not None and not spec.command:
            raise InvalidArgumentError("command must not be empty (leave it unset to idle)")
        check_env(spec.env)
        ports = _check_ports(spec.ports)
        kernel, initrd, rootfs = self._image_paths(image)

        existing = await self._run(
            f"looking up workspace {workspace!r}", lambda c: self._find_sync(c, workspace)
        )
        if existing is not None:
            raise AlreadyExistsError(
                f"workspace {workspace!r} already has a QEMU environment on this node: start it "
                f"with `vendetta workspace up {workspace}` or remove it with "
                f"`vendetta workspace destroy {workspace}`"
            )
        name = self.domain_name(workspace)
        files = self._files(name)
        if problem := socket_path_problem(files):
            raise InvalidArgumentError(f"cannot create workspace {workspace!r}: {problem}")
        kvm, _ = await asyncio.to_thread(probe_kvm)
        meta = Meta(
            agent=self.agent_id,
            workspace=workspace,
            image=image,
            state_dir=str(self.state_dir),
            command=tuple(spec.command) if spec.command is not None else None,
            env=dict(spec.env),
            ports=ports,
        )
        xml = domain_xml(
            name=name,
            virt_type="kvm" if kvm else "qemu",
            vcpus=max(1, math.ceil(spec.cpus or 1)),
            memory_kib=(spec.memory_bytes or DEFAULT_MEMORY) // 1024,
            kernel=kernel,
            initrd=initrd,
            files=files,
            meta=meta,
        )
        await asyncio.to_thread(self._make_overlay, rootfs, files, spec.disk_bytes)

        def define(conn: libvirt.virConnect) -> None:
            conn.defineXML(xml)

        try:
            await self._run(f"defining guest {name!r}", define)
        except BaseException as exc:
            await asyncio.to_thread(self._remove_files, files)
            if isinstance(exc, AlreadyExistsError):
                raise AlreadyExistsError(
                    f"cannot create workspace {workspace!r}: a libvirt domain named {name!r} "
                    f"already exists and is not ours ({exc}); if it is a leftover, remove it "
                    f"with `virsh -c {self.uri} undefine {name}`"
                ) from exc
            raise
        return await self.inspect(workspace)

    def _make_overlay(self, rootfs: Path, files: Files, disk_bytes: int | None) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)  # QEMU runs as its own user and must reach the files
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(rootfs), "-F", "qcow2"]
        argv.append(str(files.overlay))
        if disk_bytes:
            info = subprocess.run(
                ["qemu-img", "info", "--output=json", str(rootfs)],
                capture_output=True,
                text=True,
                check=False,
            )
            base_size = 0
            if info.returncode == 0:
                base_size = int(json.loads(info.stdout).get("virtual-size", 0))
            argv.append(str(max(disk_bytes, base_size)))
        try:
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError as exc:
            raise EngineUnavailableError(
                "qemu-img not found: install qemu-utils (bash scripts/engine-qemu.sh)"
            ) from exc
        if result.returncode != 0:
            raise InternalError(f"creating the disk overlay failed: {result.stderr.strip()}")

    @staticmethod
    def _remove_files(files: Files) -> None:
        for path in files.all():
            _remove(path)
            # virtlogd rotates file outputs to NAME.0, NAME.1, ...
            for rotated in path.parent.glob(path.name + ".*"):
                if rotated.name[len(path.name) + 1 :].isdigit():
                    _remove(rotated)

    async def start(self, workspace: str) -> EnvironmentStatus:
        validate_name("workspace", workspace)
        action = f"starting workspace {workspace!r}"

        def boot(conn: libvirt.virConnect) -> tuple[libvirt.virDomain, Meta, bool]:
            dom, meta = self._require_sync(conn, workspace)
            if dom.isActive():
                return dom, meta, False
            for attempt in range(1, FORWARD_ATTEMPTS + 1):
                if meta.ports:
                    dom = self._with_new_forwards(conn, dom, meta)
                try:
                    dom.create()
                except libvirt.libvirtError as exc:
                    if not meta.ports or attempt == FORWARD_ATTEMPTS:
                        raise
                    if not network.is_conflict(exc.get_error_message() or str(exc)):
                        raise
                    continue  # a picked node port was taken meanwhile: pick again
                break
            return dom, meta, True

        dom, meta, booted = await self._run(action, boot)
        await self._wait_for_agent(workspace, dom, meta)
        if booted and meta.command is not None:
            argv = ["/bin/sh", "-c", COMMAND_WRAPPER, "sh", *meta.command]
            await self._run(
                f"starting the command of {workspace!r}",
                lambda _c: agent.exec_start(dom, argv, meta.env, capture=False),
            )
        return await self.inspect(workspace)

    @staticmethod
    def _with_new_forwards(
        conn: libvirt.virConnect, dom: libvirt.virDomain, meta: Meta
    ) -> libvirt.virDomain:
        """Redefine the stopped ``dom`` with its NIC forwarding free node ports. Blocking."""
        forwards = network.pick_forwards(meta.ports)
        xml = network.with_forwards(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), forwards)
        return conn.defineXML(xml)

    async def _wait_for_agent(self, workspace: str, dom: libvirt.virDomain, meta: Meta) -> None:
        deadline = time.monotonic() + AGENT_WAIT_SECONDS
        while True:
            answered, active = await self._run(
                f"waiting for the guest agent of {workspace!r}",
                lambda _c: (agent.ping(dom), bool(dom.isActive())),
            )
            if answered:
                return
            if not active:
                raise FailedPreconditionError(
                    f"the guest of workspace {workspace!r} stopped while booting; "
                    f"console:\n{await self._console_tail(meta)}"
                )
            if time.monotonic() > deadline:
                raise DeadlineExceededError(
                    f"the guest agent of workspace {workspace!r} did not answer within "
                    f"{AGENT_WAIT_SECONDS:.0f}s; console:\n{await self._console_tail(meta)}"
                )
            await asyncio.sleep(POLL_SECONDS)

    async def _console_tail(self, meta: Meta) -> str:
        path = self._files(self.domain_name(meta.workspace), Path(meta.state_dir)).console
        return await asyncio.to_thread(log_tail, path)

    async def stop(self, workspace: str, timeout: float = 10.0) -> EnvironmentStatus:
        validate_name("workspace", workspace)
        action = f"stopping workspace {workspace!r}"
        dom, _ = await self._run(action, lambda c: self._require_sync(c, workspace))

        def ask(flags: int) -> None:
            try:
                dom.shutdownFlags(flags)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # not running
                    raise

        if await self._run(action, lambda _c: bool(dom.isActive())):
            # The guest agent shuts down cleanly; ACPI is the fallback for other guests.
            try:
                await self._run(action, lambda _c: ask(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT))
            except VendettaError:  # no agent answering: press the power button
                with contextlib.suppress(VendettaError):
                    await self._run(
                        action, lambda _c: ask(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                    )
            deadline = time.monotonic() + max(0.0, timeout)
            while await self._run(action, lambda _c: bool(dom.isActive())):
                if time.monotonic() >= deadline:

                    def force(_c: libvirt.virConnect) -> None:
                        try:
                            dom.destroy()
                        except libvirt.libvirtError as exc:
                            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                                raise

                    await self._run(action, force)
                    break
                await asyncio.sleep(POLL_SECONDS)
        return await self.inspect(workspace)

    async def destroy(self, workspace: str) -> None:
        validate_name("workspace", workspace)

        def remove(conn: libvirt.virConnect) -> Files | None:
            found = self._find_sync(conn, workspace)
            if found is None:
                return None
            dom, meta = found
            files = self._files(dom.name(), Path(meta.state_dir))
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (
                    libvirt.VIR_ERR_OPERATION_INVALID,
                    libvirt.VIR_ERR_NO_DOMAIN,
                ):
                    raise
            try:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
            return files

        files = await self._run(f"removing workspace {workspace!r}", remove)
        if files is not None:
            await asyncio.to_thread(self._remove_files, files)

    async def inspect(self, workspace: str) -> EnvironmentStatus:
        validate_name("workspace", workspace)

        def look(conn: libvirt.virConnect) -> EnvironmentStatus | None:
            found = self._find_sync(conn, workspace)
            return self._status_sync(*found) if found else None

        status = await self._run(f"inspecting workspace {workspace!r}", look)
        if status is None:
            return EnvironmentStatus(workspace=workspace, provider=self.name, state=EnvState.ABSENT)
        return status

    async def list(self) -> builtins.list[EnvironmentStatus]:
        def all_status(conn: libvirt.virConnect) -> builtins.list[EnvironmentStatus]:
            out = []
            for dom, meta in self._own(conn):
                try:
                    out.append(self._status_sync(dom, meta))
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return sorted(out, key=lambda s: s.workspace)

        return await self._run("listing environments", all_status)

    async def close(self) -> None:
        def close_conn() -> None:
            with self._conn_lock:
                conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

        await asyncio.to_thread(close_conn)

    # -- exec ------------------------------------------------------------------

    async def exec(
        self,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str = "",
    ) -> AsyncGenerator[ExecChunk, None]:
        """Run argv (no shell) in the guest via its agent; output, then the exit code.

        qemu-ga returns output only once the command exits, so it comes as one
        chunk per stream. Cancelling stops waiting; the guest process runs on.
        """
        validate_name("workspace", workspace)
        if not argv:
            raise InvalidArgumentError("exec needs a command: argv is empty")
        check_env(env or {})
        action = f"running {argv[0]!r} in {workspace!r}"

        def begin(conn: libvirt.virConnect) -> tuple[libvirt.virDomain, int]:
            dom, meta = self._require_sync(conn, workspace)
            if not dom.isActive():
                raise FailedPreconditionError(self._not_running(workspace))
            merged = {**meta.env, **(env or {})}
            try:
                pid = agent.exec_start(dom, guest_argv(argv, workdir), merged, capture=True)
            except libvirt.libvirtError as exc:
                if "failed to execute" in str(exc).lower() or "no such file" in str(exc).lower():
                    raise NotFoundError(f"{action}: {exc.get_error_message()}") from exc
                raise
            return dom, pid

        dom, pid = await self._run(action, begin)
        delay = 0.01
        while True:
            exited, code, out, err = await self._run(action, lambda _c: agent.exec_status(dom, pid))
            if exited:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        if out:
            yield ExecChunk(stdout=out)
        if err:
            yield ExecChunk(stderr=err)
        yield ExecChunk(exit_code=code)

    # -- terminals -------------------------------------------------------------

    async def attach(
        self,
        workspace: str,
        argv: Sequence[str],
        *,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None = None,
    ) -> Terminal:
        """``argv`` on the guest's terminal console, ``rows`` x ``cols`` (see ``terminal``)."""
        validate_name("workspace", workspace)
        if not argv:
            raise InvalidArgumentError("a terminal needs a command: argv is empty")
        check_env(env or {})
        action = f"opening a terminal in {workspace!r}"

        def look(conn: libvirt.virConnect) -> tuple[libvirt.virDomain, Meta, str]:
            dom, meta = self._require_sync(conn, workspace)
            if not dom.isActive():
                raise FailedPreconditionError(self._not_running(workspace))
            return dom, meta, terminal_socket(ET.fromstring(dom.XMLDesc(0)))

        dom, meta, path = await self._run(action, look)
        if not path:
            raise missing_console(workspace)
        name = dom.name()
        if name in self._terminals:
            raise busy(workspace)
        self._terminals.add(name)
        environment = {"TERM": DEFAULT_TERM, **meta.env, **(env or {})}

        def opened() -> tuple[socket.socket, int, bytes]:
            with libvirt_errors(self.uri, action):
                return open_session(dom, path, workspace, argv, environment, rows, cols)

        opening = asyncio.ensure_future(asyncio.to_thread(opened))
        try:
            sock, pid, first = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Cancelled while the guest was starting it: end the session once it is open,
            # so no shell is left running with nobody attached.
            def abandon(task: asyncio.Future[tuple[socket.socket, int, bytes]]) -> None:
                if not task.cancelled() and task.exception() is None:
                    sock, _, _ = task.result()
                    sock.close()
                    threading.Thread(target=hang_up, args=(dom,), daemon=True).start()
                self._terminals.discard(name)

            opening.add_done_callback(abandon)
            raise
        except BaseException:
            self._terminals.discard(name)
            raise
        return QemuTerminal(
            dom,
            sock,
            pid,
            first,
            uri=self.uri,
            workspace=workspace,
            release=lambda: self._terminals.discard(name),
        )

    # -- logs ------------------------------------------------------------------

    async def logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int = 0
    ) -> AsyncGenerator[LogRecord, None]:
        """Console, stdout and stderr of the guest; with ``follow``, until it stops."""
        validate_name("workspace", workspace)
        if tail is not None and tail < 0:
            raise InvalidArgumentError(f"tail must be 0 or more, got {tail}")
        if since_unix_nano < 0:
            raise InvalidArgumentError(f"since must be 0 or more, got {since_unix_nano}")
        action = f"reading logs of {workspace!r}"
        dom, meta = await self._run(action, lambda c: self._require_sync(c, workspace))
        files = self._files(dom.name(), Path(meta.state_dir))
        readers = cursors(files.console, files.stdout, files.stderr)
        for record in await asyncio.to_thread(read_all, readers, tail):
            if record.time_unix_nano >= since_unix_nano:
                yield record
        if not follow:
            return
        while True:
            active = await self._run(action, lambda _c: bool(dom.isActive()))
            # Read after checking: what the guest wrote before it stopped is not lost.
            for record in await asyncio.to_thread(read_all, readers, None):
                yield record
            if not active:
                return
            await asyncio.sleep(POLL_SECONDS)


__all__ = ["QemuProvider", "probe_kvm"]
