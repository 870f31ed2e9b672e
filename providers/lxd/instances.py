"""LXD instances as the provider sees them: the config keys that make one ours,
finding them, reading their status, and changing their state.

Everything here is blocking, on a pylxd client: the provider runs it in a
thread (``providers.threaded.EngineClient``). Errors that decide what to do
next (another operation runs, already stopped, a port that could not listen)
are told apart by type, as :mod:`providers.lxd.errors` translates them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import pylxd.exceptions

from common.errors import NotRunningError, VendettaError
from providers.base import (
    LABEL_AGENT,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_WORKSPACE,
    EnvironmentSpec,
    EnvironmentStatus,
    EnvState,
)
from providers.lxd import ports
from providers.lxd.errors import BusyError, ListenError, SpawnError, lxd_errors
from providers.lxd.source import KEY_SOURCE_MODE, KEY_WORKDIR

log = logging.getLogger("vendetta.agent")

# The base labels as LXD config keys (LXD only allows user.* for free-form keys).
KEY_MANAGED = f"user.{LABEL_MANAGED}"
KEY_AGENT = f"user.{LABEL_AGENT}"
KEY_WORKSPACE = f"user.{LABEL_WORKSPACE}"
KEY_COMMAND = "user.vendetta.command"
KEY_OWNER = f"user.{LABEL_OWNER}"

MAX_NAME = 63  # LXD instance names are hostnames
# How long to retry an operation LXD refuses because another one runs on the instance.
BUSY_WAIT = 30.0
# Starts tried when a published port's node port is taken between our check and LXD's listen.
START_ATTEMPTS = 3
# Seconds between starts after LXC's spawn aborted: let whatever crowded it pass.
SPAWN_RETRY_PAUSE = 1.0

_UNSAFE = re.compile(r"[^a-z0-9-]")


def instance_name(workspace: str, agent_id: str) -> str:
    """``vd-{workspace}-{agent_id[:8]}``, shortened (with a hash) to fit 63 characters."""
    suffix = _UNSAFE.sub("-", agent_id[:8].lower()).strip("-") or "agent"
    name = f"vd-{workspace}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(workspace.encode()).hexdigest()[:8]
    room = MAX_NAME - len(f"vd--{digest}-{suffix}")
    return f"vd-{workspace[:room].rstrip('-')}-{digest}-{suffix}"


def limits(spec: EnvironmentSpec) -> dict[str, str]:
    """LXD's config keys for the spec's CPU and memory limits."""
    config: dict[str, str] = {}
    if spec.cpus is not None:
        config["limits.cpu"] = str(math.ceil(spec.cpus))
        if spec.cpus != math.ceil(spec.cpus):
            # A fraction of CPU time: the quota per 100 ms period, across all CPUs.
            config["limits.cpu.allowance"] = f"{round(spec.cpus * 100)}ms/100ms"
    if spec.memory_bytes is not None:
        config["limits.memory"] = f"{spec.memory_bytes}B"
    return config


# -- finding and describing --------------------------------------------------------


def _owned(info: Mapping[str, Any], agent_id: str, workspace: str | None) -> bool:
    config = info.get("config") or {}
    return (
        config.get(KEY_MANAGED) == "true"
        and config.get(KEY_AGENT) == agent_id
        and (workspace is None or config.get(KEY_WORKSPACE) == workspace)
    )


def owned(client: Any, agent_id: str, workspace: str | None) -> list[dict[str, Any]]:
    """The agent's instances (for one workspace, or all), newest first, without live state."""
    response = client.api.instances.get(params={"recursion": 1})
    infos = [i for i in response.json()["metadata"] if _owned(i, agent_id, workspace)]
    infos.sort(key=lambda i: str(i.get("created_at", "")), reverse=True)
    return infos


def with_state(client: Any, infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``infos`` with their live state (``state``: addresses), less any gone meanwhile."""
    found = []
    for info in infos:
        try:
            state = client.api.instances[info["name"]].state.get().json()["metadata"]
        except pylxd.exceptions.NotFound:
            continue  # vanished between list and state
        found.append({**info, "state": state})
    return found


def find(client: Any, agent_id: str, workspace: str) -> dict[str, Any] | None:
    """The workspace's newest instance (config, status, and live state), or None."""
    for info in owned(client, agent_id, workspace):
        found = with_state(client, [info])
        if found:
            return found[0]
    return None


def _state_of(status: str, config: Mapping[str, Any]) -> EnvState:
    if status == "Running":
        return EnvState.RUNNING
    if status == "Stopped":
        # LXD records the power state once an instance has run.
        return EnvState.STOPPED if "volatile.last_state.power" in config else EnvState.CREATED
    if status in ("Frozen", "Error", "Aborting", "Stopping"):
        return EnvState.STOPPED
    return EnvState.UNKNOWN


def _addresses(state: Mapping[str, Any] | None) -> tuple[str, ...]:
    found: list[str] = []
    for name, iface in ((state or {}).get("network") or {}).items():
        if name == "lo":
            continue
        for address in (iface or {}).get("addresses") or ():
            if address.get("scope") == "global" and address.get("address") not in found:
                found.append(str(address["address"]))
    return tuple(found)


def status_of(provider: str, workspace: str, info: Mapping[str, Any]) -> EnvironmentStatus:
    """The status of the instance ``info`` (as :func:`find` gives it)."""
    config = info.get("config") or {}
    status = str(info.get("status") or "")
    detail = f"lxd status {status or 'unknown'}"
    if KEY_COMMAND in config:
        detail += ", command supervised by the agent"
    return EnvironmentStatus(
        workspace=workspace,
        provider=provider,
        state=_state_of(status, config),
        id=str(info.get("name", "")),
        image=str(config.get("image.description") or config.get("volatile.base_image", "")),
        addresses=_addresses(info.get("state")),
        detail=detail,
        # Proxy devices listen only while the instance runs.
        ports=ports.published(info.get("devices") or {}) if status == "Running" else {},
        source_mode=str(config.get(KEY_SOURCE_MODE) or ""),
        workdir=str(config.get(KEY_WORKDIR) or ""),
        owner=str(config.get(KEY_OWNER) or ""),
    )


# -- changing state ----------------------------------------------------------------


def wait(client: Any, response: Any) -> None:
    """Wait for the background operation of ``response``; raises if it failed."""
    client.operations.wait_for_operation(response.json()["operation"])


def wait_maybe(client: Any, response: Any) -> None:
    """Wait for ``response``'s operation if LXD answered with one (PATCH may be sync)."""
    body = response.json()
    if body.get("type") == "async" and body.get("operation"):
        client.operations.wait_for_operation(body["operation"])


def state_change(
    client: Any,
    where: str,
    action: str,
    name: str,
    request: Callable[[Any], Any],
    *,
    stopped_is_done: bool = False,
) -> None:
    """Make ``request(instance node)`` and wait for it, retrying while LXD is busy.

    An instance runs one state operation at a time: a forced stop or a delete
    right after a graceful stop gave up is refused (``BusyError``) until LXD has
    finished with that one. ``stopped_is_done``: LXD saying the instance is not
    running (a stop that raced with it stopping by itself) is success.
    """
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            with lxd_errors(where, action):
                wait(client, request(client.api.instances[name]))
            return
        except NotRunningError:
            if stopped_is_done:
                return
            raise
        except BusyError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def force_stop(client: Any, where: str, action: str, name: str) -> None:
    state_change(
        client,
        where,
        action,
        name,
        lambda node: node.state.put(json={"action": "stop", "force": True}),
        stopped_is_done=True,
    )


def stop(client: Any, where: str, action: str, name: str, seconds: int, running: bool) -> None:
    """Init's halt signal (SIGPWR) if ``running`` and ``seconds``; forced once they passed."""
    if seconds > 0 and running:
        try:
            state_change(
                client,
                where,
                action,
                name,
                lambda node: node.state.put(json={"action": "stop", "timeout": seconds}),
            )
            return
        except VendettaError:
            current = client.api.instances[name].state.get().json()["metadata"]
            if current.get("status") == "Stopped":
                return
    force_stop(client, where, action, name)


def start_publishing(client: Any, where: str, action: str, name: str) -> None:
    """Start the stopped instance ``name``, its published ports on free node ports.

    A node port taken since it was chosen (by anything on the node) is
    replaced first; if one is taken between that check and LXD's listen,
    the start fails, and is tried again with fresh ports for all.
    """
    node = client.api.instances[name]
    for attempt in range(1, START_ATTEMPTS + 1):
        devices = node.get().json()["metadata"].get("devices") or {}
        moved = ports.repicked(devices, everything=attempt > 1)
        if moved:
            # PATCH merges: the devices named here are replaced, the others kept.
            wait_maybe(client, node.patch(json={"devices": moved}))
        try:
            with lxd_errors(where, action):
                wait(client, node.state.put(json={"action": "start"}))
            return
        except ListenError:
            if attempt == START_ATTEMPTS:
                raise
        except SpawnError as exc:
            # LXC's spawn aborts now and then under load; a proxy device's start hook
            # failing ends the same way, so the next try has fresh ports too.
            if attempt == START_ATTEMPTS:
                raise SpawnError(f"{exc}; LXC's log: `lxc info --show-log {name}`") from exc
            log.warning("%s: %s; trying again (%d of %d)", name, exc, attempt + 1, START_ATTEMPTS)
            time.sleep(SPAWN_RETRY_PAUSE)
