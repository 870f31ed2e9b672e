"""An agent's containers: found by their labels, read into ``EnvironmentStatus``.

Containers are found only by their labels (managed + agent + workspace), never
by name, so an agent finds its own after a restart and two agents sharing one
dockerd never see each other's. The functions taking ``api`` (docker-py's
APIClient) block: call them through the provider's ``EngineClient``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import docker.errors

from providers.base import (
    LABEL_AGENT,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_SOURCE_MODE,
    LABEL_WORKDIR,
    LABEL_WORKSPACE,
    SOURCE_MOUNTED,
    EnvironmentStatus,
    EnvState,
)

# Docker container states that have a process to stop.
ACTIVE_STATES = frozenset({"running", "paused", "restarting"})

Info = dict[str, Any]  # what `docker inspect` says of a container


def labels(agent_id: str, workspace: str, workdir: str = "", owner: str = "") -> dict[str, str]:
    found = {LABEL_MANAGED: "true", LABEL_AGENT: agent_id, LABEL_WORKSPACE: workspace}
    if owner:
        found[LABEL_OWNER] = owner
    if workdir:  # the source is bind-mounted there
        found |= {LABEL_WORKDIR: workdir, LABEL_SOURCE_MODE: SOURCE_MOUNTED}
    return found


def _filters(agent_id: str, workspace: str | None) -> dict[str, list[str]]:
    wanted = [f"{LABEL_MANAGED}=true", f"{LABEL_AGENT}={agent_id}"]
    if workspace is not None:
        wanted.append(f"{LABEL_WORKSPACE}={workspace}")
    return {"label": wanted}


def container_ids(api: Any, agent_id: str, workspace: str | None) -> list[str]:
    """Ids of the agent's containers (of one workspace, or all), newest first."""
    summaries = api.containers(all=True, filters=_filters(agent_id, workspace))
    summaries.sort(key=lambda s: s.get("Created", 0), reverse=True)
    return [str(s["Id"]) for s in summaries]


def find(api: Any, agent_id: str, workspace: str) -> Info | None:
    """``docker inspect`` of the workspace's container, or None."""
    for _ in range(3):  # a container may vanish between list and inspect
        ids = container_ids(api, agent_id, workspace)
        if not ids:
            return None
        try:
            info: Info = api.inspect_container(ids[0])
        except docker.errors.NotFound:
            continue
        return info
    return None


def inspect_all(api: Any, agent_id: str) -> list[Info]:
    """``docker inspect`` of each of the agent's containers, newest first."""
    infos: list[Info] = []
    for container_id in container_ids(api, agent_id, None):
        try:
            infos.append(api.inspect_container(container_id))
        except docker.errors.NotFound:
            continue  # removed meanwhile
    return infos


def container_id(info: Mapping[str, Any]) -> str:
    return str(info["Id"])


def docker_status(info: Mapping[str, Any]) -> str:
    """Docker's own word for the container's state: running, exited, paused..."""
    return str((info.get("State") or {}).get("Status") or "")


def workspace_of(info: Mapping[str, Any]) -> str:
    return str(((info.get("Config") or {}).get("Labels") or {}).get(LABEL_WORKSPACE, ""))


def status_of(provider: str, workspace: str, info: Mapping[str, Any]) -> EnvironmentStatus:
    state = info.get("State") or {}
    return EnvironmentStatus(
        workspace=workspace,
        provider=provider,
        state=_state_of(docker_status(info)),
        id=str(info.get("Id", "")),
        image=str((info.get("Config") or {}).get("Image") or info.get("Image") or ""),
        addresses=_addresses(info),
        detail=_detail(state),
        ports=_ports(info),
        source_mode=_label(info, LABEL_SOURCE_MODE),
        workdir=_label(info, LABEL_WORKDIR),
        owner=_label(info, LABEL_OWNER),
    )


def _label(info: Mapping[str, Any], key: str) -> str:
    return str(((info.get("Config") or {}).get("Labels") or {}).get(key, ""))


def _state_of(status: str) -> EnvState:
    if status == "running":
        return EnvState.RUNNING
    if status == "created":
        return EnvState.CREATED
    if not status:
        return EnvState.UNKNOWN
    return EnvState.STOPPED  # exited, dead, paused, restarting, removing


def _addresses(info: Mapping[str, Any]) -> tuple[str, ...]:
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    found: list[str] = []
    for network in networks.values():
        for key in ("IPAddress", "GlobalIPv6Address"):
            address = (network or {}).get(key)
            if address and address not in found:
                found.append(str(address))
    return tuple(found)


def _ports(info: Mapping[str, Any]) -> dict[int, str]:
    bound = (info.get("NetworkSettings") or {}).get("Ports") or {}
    found: dict[int, str] = {}
    for key, bindings in bound.items():
        port, _, proto = str(key).partition("/")
        for b in bindings or ():
            if proto == "tcp" and b.get("HostPort"):
                found[int(port)] = f"{b.get('HostIp') or '127.0.0.1'}:{b['HostPort']}"
                break
    return found


def _detail(state: Mapping[str, Any]) -> str:
    status = str(state.get("Status") or "unknown")
    parts = [f"docker status {status}"]
    if status in ("exited", "dead"):
        parts.append(f"exit code {state.get('ExitCode')}")
    if state.get("OOMKilled"):
        parts.append("killed: out of memory")
    if state.get("Error"):
        parts.append(f"error: {state['Error']}")
    return ", ".join(parts)
