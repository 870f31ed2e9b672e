"""Blocking libvirt operations on vendetta's guests: run them in a thread, inside the
error seam (``errors.libvirt_errors``, which ``EngineClient.call`` puts around them).

A guest is a libvirt domain carrying our metadata (``domain.Meta``); it is found
by that metadata (agent + workspace), never by its name alone.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET

import libvirt

from common.errors import EngineUnavailableError
from providers.base import SOURCE_COPIED, EnvironmentStatus, EnvState
from providers.qemu import network
from providers.qemu.domain import NS_URI, Meta
from providers.qemu.errors import libvirt_errors, port_taken

# Starts whose picked node ports were taken before QEMU bound them are retried.
FORWARD_ATTEMPTS = 5

Guest = tuple[libvirt.virDomain, Meta]

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


# -- the connection ----------------------------------------------------------------


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    return None


def connect(uri: str) -> libvirt.virConnect:
    # libvirt prints every error to stderr unless a handler takes them; ours are
    # raised as exceptions and mapped, so take and drop them.
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)
    with libvirt_errors(uri, "connecting to libvirt"):
        conn = libvirt.open(uri)
    if conn is None:  # older bindings return None instead of raising
        raise EngineUnavailableError(f"cannot open libvirt at {uri}")
    return conn


def alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def close(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


# -- finding guests ----------------------------------------------------------------


def meta_of(dom: libvirt.virDomain) -> Meta | None:
    """Our metadata of ``dom``, or None if it is not a vendetta domain."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS_URI, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
            return None
        raise
    try:
        return Meta.from_xml(text)
    except (ET.ParseError, ValueError, TypeError):  # a foreign element in our namespace
        return None


def owned(conn: libvirt.virConnect, agent_id: str) -> list[Guest]:
    """Every guest of the agent ``agent_id``: never another agent's."""
    found = []
    for dom in conn.listAllDomains(0):
        meta = meta_of(dom)
        if meta is not None and meta.agent == agent_id:
            found.append((dom, meta))
    return found


def find(conn: libvirt.virConnect, agent_id: str, name: str, workspace: str) -> Guest | None:
    """The guest of ``workspace``, looked up as the domain ``name`` first."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        dom = None
    if dom is not None:
        meta = meta_of(dom)
        if meta is not None and meta.agent == agent_id and meta.workspace == workspace:
            return dom, meta
    for dom, meta in owned(conn, agent_id):  # renamed by hand? still ours
        if meta.workspace == workspace:
            return dom, meta
    return None


# -- state -------------------------------------------------------------------------


def state_of(state: int, reason: int) -> EnvState:
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


def _accel_of(root: ET.Element) -> str:
    """'KVM' or 'TCG emulation', from the domain's XML type."""
    kind = root.get("type", "")
    return "KVM" if kind == "kvm" else "TCG emulation" if kind == "qemu" else kind


def status(dom: libvirt.virDomain, meta: Meta, provider: str) -> EnvironmentStatus:
    state, reason = dom.state(0)
    env_state = state_of(state, reason)
    detail = f"libvirt state {_STATE_NAMES.get(state, str(state))}"
    ports: dict[int, str] = {}
    with contextlib.suppress(libvirt.libvirtError, ET.ParseError):
        root = ET.fromstring(dom.XMLDesc(0))  # the running definition when it runs
        detail += f", {_accel_of(root)}"
        if env_state is EnvState.RUNNING and meta.ports:
            ports = network.published(network.forwards_of(root))
    return EnvironmentStatus(
        workspace=meta.workspace,
        provider=provider,
        state=env_state,
        id=dom.UUIDString(),
        image=meta.image,
        # The guest's own address is not reachable from the node: published
        # ports are the only way in.
        addresses=(),
        detail=detail,
        ports=ports,
        source_mode=SOURCE_COPIED if meta.source_path else "",
        workdir=meta.workdir if meta.source_path else "",
        owner=meta.owner,
    )


def statuses(conn: libvirt.virConnect, agent_id: str, provider: str) -> list[EnvironmentStatus]:
    out = []
    for dom, meta in owned(conn, agent_id):
        try:
            out.append(status(dom, meta, provider))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # removed meanwhile
                raise
    return out


# -- power -------------------------------------------------------------------------


def boot(conn: libvirt.virConnect, dom: libvirt.virDomain, meta: Meta) -> libvirt.virDomain:
    """Start the stopped ``dom``, its published ports forwarded from free node ports;
    the domain as started (redefined when it publishes ports)."""
    for attempt in range(1, FORWARD_ATTEMPTS + 1):
        if meta.ports:
            dom = _with_new_forwards(conn, dom, meta)
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            if not meta.ports or attempt == FORWARD_ATTEMPTS:
                raise
            if not port_taken(exc):
                raise
            continue  # a picked node port was taken meanwhile: pick again
        break
    return dom


def _with_new_forwards(
    conn: libvirt.virConnect, dom: libvirt.virDomain, meta: Meta
) -> libvirt.virDomain:
    """Redefine the stopped ``dom`` with its NIC forwarding free node ports."""
    forwards = network.pick_forwards(meta.ports)
    xml = network.with_forwards(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), forwards)
    return conn.defineXML(xml)


def shutdown(dom: libvirt.virDomain, flags: int) -> None:
    """Ask the guest to shut down (``flags``: how); a stopped guest is left as it is."""
    try:
        dom.shutdownFlags(flags)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # not running
            raise


def power_off(dom: libvirt.virDomain) -> None:
    """Pull the plug; a stopped guest is left as it is."""
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
            raise


def remove(dom: libvirt.virDomain) -> None:
    """Power the guest off and undefine it; one removed meanwhile is not an error."""
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
