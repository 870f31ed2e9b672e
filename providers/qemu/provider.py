"""QemuProvider: each environment is one QEMU guest, a libvirt domain on the node.

The guest boots the image's kernel directly (``vmlinuz`` + ``initrd.img``) with
its root on a per-workspace qcow2 overlay of the image's ``rootfs.qcow2``
(``images``). Commands run through the QEMU guest agent (``agent``); output is
read from host files (serial console, and virtio-serial ports for
stdout/stderr: ``logs``). Interactive terminals run on a virtio console of the
guest (``terminal``). Domains are found by their vendetta metadata (agent +
workspace), never by name alone (``guests``). Published ports are QEMU
user-mode forwards from the node's loopback into an otherwise isolated guest,
on node ports picked at each start (``network``).

Arguments arrive checked (``providers.base``). Every libvirt call runs in a
thread through one ``EngineClient``, inside the one error seam (``errors``).
KVM is used when it actually works on this node (probed once, ``kvm``);
otherwise guests run under TCG emulation, slower but real.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import math
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import libvirt

from common.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    VendettaError,
)
from common.process import log_tail
from providers.base import (
    Capabilities,
    EnvironmentSpec,
    EnvironmentStatus,
    EnvState,
    ExecChunk,
    ImageInfo,
    LogRecord,
    Provider,
    Readiness,
    Terminal,
)
from providers.qemu import agent, guests, source
from providers.qemu.consoles import Consoles
from providers.qemu.domain import (
    Files,
    Meta,
    domain_xml,
    guest_argv,
    mux_socket,
    socket_path_problem,
    terminal_console,
)
from providers.qemu.errors import guest_running, libvirt_errors
from providers.qemu.images import (
    DEFAULT_IMAGE,
    DEFAULT_IMAGE_DIR,
    FORMATS,
    IMAGE_FILES,
    STATE_DIR_ENV,
    image_infos,
    image_paths,
    import_files,
    make_overlay,
)
from providers.qemu.kvm import probe_kvm
from providers.qemu.logs import cursors, read_all
from providers.qemu.mux import NoPython
from providers.qemu.pipes import Pipes
from providers.qemu.readiness import ReadinessCheck
from providers.qemu.terminal import DEFAULT_TERM
from providers.threaded import EngineClient

DEFAULT_URI = "qemu:///system"
# Root's guests; any other user's go in its own folders (default_state_dir).
DEFAULT_STATE_DIR = Path("/var/lib/vendetta/qemu")
DEFAULT_MEMORY = 512 * 1024 * 1024
MIN_MEMORY = 64 * 1024 * 1024
# Booting to the guest agent takes seconds under KVM, ~5-20 s under TCG.
AGENT_WAIT_SECONDS = 90.0
POLL_SECONDS = 0.2
# The workspace command runs with the guest's PID 1 output (see build-guest-image.sh).
COMMAND_WRAPPER = 'exec "$@" >/run/vendetta/stdout 2>/run/vendetta/stderr'

_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")


def default_state_dir() -> Path:
    """Where this agent keeps guests' disks, consoles and sockets: ``$VENDETTA_QEMU_STATE_DIR``,
    else root's ``/var/lib/vendetta/qemu``, else the user's own data folder
    (``$XDG_DATA_HOME/vendetta/qemu``, by default ``~/.local/share/vendetta/qemu``)."""
    if env := os.environ.get(STATE_DIR_ENV):
        return Path(env).expanduser()
    if os.geteuid() == 0:
        return DEFAULT_STATE_DIR
    return _user_data() / "vendetta" / "qemu"


def _user_data() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg) if xdg else Path.home() / ".local" / "share"


def default_image_dirs() -> tuple[Path, ...]:
    """Where this agent finds guest images, the first holding a name winning; it imports
    into the first. Root: ``/var/cache/vendetta/images``. Any other user: its own
    ``$XDG_DATA_HOME/vendetta/images`` (by default ``~/.local/share/vendetta/images``),
    then root's, which it may read but not write."""
    if os.geteuid() == 0:
        return (DEFAULT_IMAGE_DIR,)
    return (_user_data() / "vendetta" / "images", DEFAULT_IMAGE_DIR)


class QemuProvider(Provider):
    """Environments as QEMU guests managed by libvirt, driven with libvirt-python."""

    name: ClassVar[str] = "qemu"
    capabilities: ClassVar[Capabilities] = Capabilities(
        # The guest agent returns a command's output only when it has exited.
        long_exec_streams=False,
        # On the guest's virtio console, one terminal at a time per guest.
        terminal=True,
        # On a virtio-serial port of the guest, many at once (pipes.py).
        stdin=True,
    )
    image_formats: ClassVar[str] = FORMATS

    def __init__(
        self,
        agent_id: str,
        uri: str | None = None,
        image_dirs: Sequence[Path] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        """Nothing connects here: libvirt is opened on first use, in a thread."""
        super().__init__(agent_id)
        # As virsh does: an explicit URI, else LIBVIRT_DEFAULT_URI, else the system daemon.
        self.uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI
        self.image_dirs = tuple(map(Path, image_dirs or default_image_dirs()))
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self._libvirt = EngineClient(
            lambda: guests.connect(self.uri),
            lambda action: libvirt_errors(self.uri, action),
            alive=guests.alive,
            close=guests.close,
        )
        self._consoles = Consoles(self._libvirt)
        self._pipes = Pipes(self._libvirt, self.uri)
        self._readiness = ReadinessCheck(self._libvirt, self.uri, self.image_dirs, self.state_dir)

    # -- plumbing --------------------------------------------------------------

    def domain_name(self, workspace: str) -> str:
        return f"vd-{workspace}-{_UNSAFE.sub('-', self.agent_id[:8])}"

    def _files(self, domain: str, state_dir: Path | None = None) -> Files:
        return Files.for_domain(state_dir or self.state_dir, domain)

    def _find(self, conn: libvirt.virConnect, workspace: str) -> guests.Guest | None:
        """The guest of ``workspace`` of this agent. Blocking."""
        return guests.find(conn, self.agent_id, self.domain_name(workspace), workspace)

    def _require(self, conn: libvirt.virConnect, workspace: str) -> guests.Guest:
        found = self._find(conn, workspace)
        if found is None:
            raise self.missing(workspace)
        return found

    def _require_running(self, conn: libvirt.virConnect, workspace: str) -> guests.Guest:
        dom, meta = self._require(conn, workspace)
        if not dom.isActive():
            raise self.not_running(workspace)
        return dom, meta

    async def close(self) -> None:
        await self._pipes.close()
        await self._libvirt.close()

    # -- readiness -------------------------------------------------------------

    async def readiness(self) -> Readiness:
        return await self._readiness.check()

    # -- images ----------------------------------------------------------------

    async def _images(self) -> builtins.list[ImageInfo]:
        return await asyncio.to_thread(image_infos, self.image_dirs)

    async def _import_image(self, name: str, files: Mapping[str, Path]) -> builtins.list[ImageInfo]:
        await asyncio.to_thread(import_files, self.image_dirs, name, files)
        return [i for i in await self._images() if i.name == name]

    # -- lifecycle -------------------------------------------------------------

    async def _create(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        workspace = spec.workspace
        if spec.memory_bytes is not None and spec.memory_bytes < MIN_MEMORY:
            raise InvalidArgumentError(
                f"memory must be at least {MIN_MEMORY // 2**20} MiB for a guest, "
                f"got {spec.memory_bytes} bytes"
            )
        kernel, initrd, rootfs = image_paths(self.image_dirs, spec.image)
        name = self.domain_name(workspace)
        files = self._files(name)
        if problem := socket_path_problem(files):
            raise InvalidArgumentError(f"cannot create workspace {workspace!r}: {problem}")
        kvm, _ = await asyncio.to_thread(probe_kvm, kernel)
        meta = Meta(
            agent=self.agent_id,
            workspace=workspace,
            image=spec.image,
            state_dir=str(self.state_dir),
            command=tuple(spec.command) if spec.command is not None else None,
            env=dict(spec.env),
            ports=tuple(sorted(set(spec.ports))),
            source_path=spec.source_path,
            workdir=spec.source_workdir,
            user=spec.user,
            owner=spec.owner,
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
        await asyncio.to_thread(make_overlay, rootfs, files.overlay, spec.disk_bytes)

        def define(conn: libvirt.virConnect) -> None:
            conn.defineXML(xml)

        try:
            await self._libvirt.call(f"defining guest {name!r}", define)
        except AlreadyExistsError as exc:
            if await self._libvirt.call("looking it up", lambda c: self._find(c, workspace)):
                # Created meanwhile by a call that won the race: its files, not ours.
                raise self.already_exists(workspace, "created meanwhile") from exc
            await asyncio.to_thread(files.remove)
            raise AlreadyExistsError(
                f"cannot create workspace {workspace!r}: a libvirt domain named {name!r} "
                f"already exists and is not ours ({exc}); if it is a leftover, remove it "
                f"with `virsh -c {self.uri} undefine {name}`"
            ) from exc
        except asyncio.CancelledError:
            # The define goes on in its thread and may still make the domain: its disk
            # stays for it. A destroy of the workspace removes both, or the files alone.
            raise
        except BaseException:
            await asyncio.to_thread(files.remove)
            raise
        return await self._inspect(workspace)

    async def _start(self, workspace: str) -> EnvironmentStatus:
        def start(conn: libvirt.virConnect) -> tuple[libvirt.virDomain, Meta, bool]:
            dom, meta = self._require(conn, workspace)
            if dom.isActive():
                return dom, meta, False
            return guests.boot(conn, dom, meta), meta, True

        dom, meta, booted = await self._libvirt.call(f"starting workspace {workspace!r}", start)
        # What the last stop brought out is stale once the guest runs again.
        await asyncio.to_thread(self._at_stop(workspace).unlink, True)
        await self._wait_for_agent(workspace, dom, meta)
        if meta.source_path:
            # Once (the guest marks it): later starts keep what was changed inside.
            await self._libvirt.call(
                f"copying the source of {workspace!r} into the guest",
                lambda _c: source.copy_in(
                    dom, meta.source_path, meta.workdir, meta.user, self.state_dir
                ),
            )
        if booted and meta.command is not None:
            # In the workdir, as the user inside; the output files opened as root.
            command = guest_argv(meta.command, "", meta.user)
            argv = guest_argv(["/bin/sh", "-c", COMMAND_WRAPPER, "sh", *command], meta.workdir)
            await self._libvirt.call(
                f"starting the command of {workspace!r}",
                lambda _c: agent.exec_start(dom, argv, meta.env, capture=False),
            )
        return await self._inspect(workspace)

    async def _wait_for_agent(self, workspace: str, dom: libvirt.virDomain, meta: Meta) -> None:
        deadline = time.monotonic() + AGENT_WAIT_SECONDS
        while True:
            answered, active = await self._libvirt.call(
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

    async def _stop(self, workspace: str, timeout: float) -> EnvironmentStatus:
        action = f"stopping workspace {workspace!r}"
        dom, _ = await self._libvirt.call(action, lambda c: self._require(c, workspace))

        async def active() -> bool:
            return await self._libvirt.call(action, lambda _c: bool(dom.isActive()))

        if await active():
            await self._keep_copy_at_stop(workspace, action)
            # The guest agent shuts down cleanly; ACPI is the fallback for other guests.
            try:
                await self._libvirt.call(
                    action,
                    lambda _c: guests.shutdown(dom, libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT),
                )
            except VendettaError:  # no agent answering: press the power button
                with contextlib.suppress(VendettaError):
                    await self._libvirt.call(
                        action,
                        lambda _c: guests.shutdown(dom, libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN),
                    )
            deadline = time.monotonic() + timeout
            while await active():
                if time.monotonic() >= deadline:
                    await self._libvirt.call(action, lambda _c: guests.power_off(dom))
                    break
                await asyncio.sleep(POLL_SECONDS)
        return await self._inspect(workspace)

    async def _destroy(self, workspace: str) -> None:
        def remove(conn: libvirt.virConnect) -> str:
            found = self._find(conn, workspace)
            if found is None:
                # No guest, but maybe its files: a create or destroy cut short between
                # the disk and the domain (the agent killed, the call cancelled) left them.
                self._files(self.domain_name(workspace)).remove()
                return self.domain_name(workspace)
            dom, meta = found
            guests.remove(dom)
            # In the same thread: a cancelled call cannot leave the disk without its domain.
            self._files(dom.name(), Path(meta.state_dir)).remove()
            return str(dom.name())

        name = await self._libvirt.call(f"removing workspace {workspace!r}", remove)
        await self._pipes.forget(name)
        await asyncio.to_thread(self._at_stop(workspace).unlink, True)

    async def _inspect(self, workspace: str) -> EnvironmentStatus:
        def look(conn: libvirt.virConnect) -> EnvironmentStatus | None:
            found = self._find(conn, workspace)
            return guests.status(*found, self.name) if found else None

        status = await self._libvirt.call(f"inspecting workspace {workspace!r}", look)
        if status is None:
            return EnvironmentStatus(workspace=workspace, provider=self.name, state=EnvState.ABSENT)
        return status

    async def _list(self) -> builtins.list[EnvironmentStatus]:
        return await self._libvirt.call(
            "listing environments", lambda c: guests.statuses(c, self.agent_id, self.name)
        )

    # -- the source's copy -----------------------------------------------------

    async def _guest_active(self, workspace: str, action: str) -> bool:
        def active(conn: libvirt.virConnect) -> bool:
            found = self._find(conn, workspace)
            return found is not None and bool(found[0].isActive())

        return await self._libvirt.call(action, active)

    def _at_stop(self, workspace: str) -> Path:
        return self.state_dir / f"{workspace}.source-at-stop.tar"

    async def _keep_copy_at_stop(self, workspace: str, action: str) -> None:
        """A stopped guest's copy can be neither read nor changed: what it holds is
        brought out as the guest stops, so that pull and destroy's check read it then.
        A guest that stopped by itself has none, and those are refused as before."""
        with contextlib.suppress(VendettaError):  # no agent answering: stop anyway
            found = await self._copied_guest(workspace, action, "stop it again")
            if found is not None:
                dom, meta = found
                path = self._at_stop(workspace)
                await self._libvirt.call(
                    action, lambda _c: source.copy_out(dom, meta.workdir, path)
                )

    async def _copied_guest(self, workspace: str, action: str, then: str) -> guests.Guest | None:
        """The running guest of ``workspace`` if it holds its copy of a source. One that
        has run but is stopped is refused (its copy can neither take an upload, which
        its next start would not copy again, nor be read): start it, ``then`` ..."""

        def look(conn: libvirt.virConnect) -> guests.Guest | None:
            found = self._find(conn, workspace)
            if found is None or not found[1].source_path:
                return None
            dom, meta = found
            if not dom.isActive():
                if guests.status(dom, meta, self.name).state is EnvState.STOPPED:
                    raise FailedPreconditionError(
                        f"workspace {workspace} runs in a guest that holds a copy of its "
                        f"source and is stopped: start it (`vendetta workspace up "
                        f"{workspace}`), then {then}"
                    )
                return None  # never started: its first start copies the folder
            with guest_running(dom):
                return found if source.copied(dom) else None

        return await self._libvirt.call(action, look)

    async def _copy_source_in(
        self, workspace: str, tar: Path, replace: bool, deleted: Sequence[str]
    ) -> bool:
        action = f"copying an upload into the guest of {workspace!r}"
        found = await self._copied_guest(workspace, action, "send the changes again")
        if found is None:
            return False  # not running, or its first start copies the folder as it is now
        dom, meta = found
        await self._libvirt.call(
            action,
            lambda _c: source.apply_in(
                dom, tar, meta.workdir, meta.user, replace, builtins.list(deleted)
            ),
        )
        return True

    async def _copy_source_out(self, workspace: str, tar: Path) -> bool:
        action = f"copying the source out of the guest of {workspace!r}"
        kept = self._at_stop(workspace)
        if await asyncio.to_thread(kept.exists) and not await self._guest_active(workspace, action):
            await asyncio.to_thread(shutil.copyfile, kept, tar)
            return True
        found = await self._copied_guest(workspace, action, "ask again")
        if found is None:
            return False
        dom, meta = found
        await self._libvirt.call(action, lambda _c: source.copy_out(dom, meta.workdir, tar))
        return True

    # -- exec ------------------------------------------------------------------

    async def _exec(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str
    ) -> AsyncGenerator[ExecChunk, None]:
        """Run argv (no shell) in the guest via its agent; output, then the exit code.

        qemu-ga returns output only once the command exits, so it comes as one
        chunk per stream. Cancelling stops waiting; the guest process runs on.
        """
        action = f"running {argv[0]!r} in {workspace!r}"

        def begin(conn: libvirt.virConnect) -> tuple[libvirt.virDomain, int]:
            dom, meta = self._require_running(conn, workspace)
            merged = {**meta.env, **(env or {})}
            with guest_running(dom):
                # In the caller's folder, else the source's; as the user inside.
                wrapped = guest_argv(argv, workdir or meta.workdir, meta.user)
                return dom, agent.exec_start(dom, wrapped, merged, capture=True)

        def poll(_conn: libvirt.virConnect) -> tuple[bool, int, bytes, bytes]:
            with guest_running(dom):
                return agent.exec_status(dom, pid)

        dom, pid = await self._libvirt.call(action, begin)
        delay = 0.01
        while True:
            exited, code, out, err = await self._libvirt.call(action, poll)
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

    async def _attach(
        self,
        workspace: str,
        argv: Sequence[str],
        *,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None,
    ) -> Terminal:
        """``argv`` on the guest's terminal console, ``rows`` x ``cols`` (see ``terminal``)."""
        action = f"opening a terminal in {workspace!r}"

        def look(conn: libvirt.virConnect) -> tuple[libvirt.virDomain, Meta, str]:
            dom, meta = self._require_running(conn, workspace)
            return dom, meta, terminal_console(ET.fromstring(dom.XMLDesc(0)))

        dom, meta, path = await self._libvirt.call(action, look)
        environment = {"TERM": DEFAULT_TERM, **meta.env, **(env or {})}
        argv = guest_argv(argv, meta.workdir, meta.user)
        return await self._consoles.open(dom, path, workspace, argv, environment, rows, cols)

    async def _pipe(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None
    ) -> Terminal:
        """``argv`` with stdin on the guest's stream port (see ``mux``), in the workspace's
        folder, as its user; without input in a guest that has no python3."""
        action = f"running {argv[0]!r} in {workspace!r}"

        def look(conn: libvirt.virConnect) -> tuple[libvirt.virDomain, Meta, str]:
            dom, meta = self._require_running(conn, workspace)
            return dom, meta, mux_socket(ET.fromstring(dom.XMLDesc(0)))

        dom, meta, path = await self._libvirt.call(action, look)
        if not path:
            raise FailedPreconditionError(
                f"the guest of workspace {workspace!r} was made by an older vendetta, without "
                f"a stream port for commands with input: recreate it (`vendetta workspace "
                f"destroy {workspace}`, then `create`)"
            )
        wrapped = guest_argv(argv, meta.workdir, meta.user)
        try:
            return await self._pipes.open(dom, workspace, wrapped, {**meta.env, **(env or {})})
        except NoPython:
            # A guest image of the user's without python3: as before there was a port,
            # the command runs without input (the proxy's builtin SFTP copes).
            return await self._without_stdin(workspace, argv, env)

    # -- logs ------------------------------------------------------------------

    async def _logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int
    ) -> AsyncGenerator[LogRecord, None]:
        """Console, stdout and stderr of the guest; with ``follow``, until it stops."""
        action = f"reading logs of {workspace!r}"
        dom, meta = await self._libvirt.call(action, lambda c: self._require(c, workspace))
        files = self._files(dom.name(), Path(meta.state_dir))
        readers = cursors(files.console, files.stdout, files.stderr)
        for record in await asyncio.to_thread(read_all, readers, tail):
            if record.time_unix_nano >= since_unix_nano:
                yield record
        if not follow:
            return
        while True:
            active = await self._libvirt.call(action, lambda _c: bool(dom.isActive()))
            # Read after checking: what the guest wrote before it stopped is not lost.
            for record in await asyncio.to_thread(read_all, readers, None):
                yield record
            if not active:
                return
            await asyncio.sleep(POLL_SECONDS)


# The image catalogue's names, for callers that found them here (tests' engine check).
__all__ = ["DEFAULT_IMAGE", "DEFAULT_IMAGE_DIR", "IMAGE_FILES", "QemuProvider", "probe_kvm"]
