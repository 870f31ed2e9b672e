"""What the engines hold for one agent, seen from outside vendetta: Docker containers,
LXD instances, QEMU guests (libvirt domains) and the guests' files on the node. For
tests that check that no environment is left over, doubled, or running when it should
not be. Each environment is found by the labels/config keys/metadata vendetta puts on
it (the agent's id), as the providers find their own.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Env:
    provider: str
    running: bool
    name: str  # the engine's name for it (container, instance, domain)


@dataclass
class Held:
    """The environments of one agent by workspace, and guest files no domain owns."""

    by_workspace: dict[str, list[Env]] = field(default_factory=dict)
    stray_files: list[str] = field(default_factory=list)

    def add(self, workspace: str, env: Env) -> None:
        self.by_workspace.setdefault(workspace, []).append(env)

    def summary(self) -> dict[str, list[str]]:
        out = {
            ws: [f"{e.provider}:{'running' if e.running else 'stopped'}" for e in envs]
            for ws, envs in self.by_workspace.items()
        }
        if self.stray_files:
            out["(guest files without a domain)"] = self.stray_files
        return out


# One client per engine for the whole test run: a test polls these many times a second.
@functools.cache
def _docker() -> Any:
    import docker

    return docker.from_env()


@functools.cache
def _lxd() -> Any:
    import pylxd

    return pylxd.Client()


def docker_envs(agent: str, held: Held) -> None:
    # The low-level list: docker-py's high-level one inspects each container, and one
    # removed meanwhile (the reconciler finishing a destroy) raised NotFound.
    listed = _docker().api.containers(all=True, filters={"label": f"vendetta.agent={agent}"})
    for c in listed:
        workspace = (c.get("Labels") or {}).get("vendetta.workspace", "")
        name = (c.get("Names") or ["?"])[0].lstrip("/")
        held.add(workspace, Env("docker", c.get("State") == "running", name))


def _lxd_owned(agent: str) -> list[dict[str, object]]:
    listed = _lxd().api.instances.get(params={"recursion": 1}).json()["metadata"]
    return [
        i
        for i in listed
        if (i.get("config") or {}).get("user.vendetta.managed") == "true"
        and (i.get("config") or {}).get("user.vendetta.agent") == agent
    ]


def lxd_envs(agent: str, held: Held) -> None:
    for info in _lxd_owned(agent):
        config: dict[str, str] = info.get("config") or {}  # type: ignore[assignment]
        workspace = config.get("user.vendetta.workspace", "")
        held.add(workspace, Env("lxd", info.get("status") == "Running", str(info["name"])))


def qemu_state_dir() -> Path:
    from providers.qemu.provider import default_state_dir

    return default_state_dir()  # the agent's too: it runs as this user, in this env


def _guest_prefix(agent: str) -> str:
    from providers.qemu import provider

    return provider.QemuProvider(agent).domain_name("").removeprefix("vd-")  # "-" + id[:8]


def qemu_envs(agent: str, held: Held) -> None:
    """The agent's guests, and the files in the state dir of a guest of this agent
    (``vd-{workspace}-{agent[:8]}.*``, see domain.Files) whose domain does not exist."""
    import libvirt

    from providers.qemu import guests

    conn = guests.connect("qemu:///system")
    domains = set()
    try:
        for dom, meta in guests.owned(conn, agent):
            with contextlib.suppress(libvirt.libvirtError):  # removed meanwhile
                held.add(meta.workspace, Env("qemu", bool(dom.isActive()), dom.name()))
                domains.add(dom.name())
    finally:
        guests.close(conn)
    suffix = _guest_prefix(agent)
    for path in sorted(qemu_state_dir().glob(f"vd-*{suffix}.*")):
        if path.name.split(".", 1)[0] not in domains:
            held.stray_files.append(path.name)
    for name in domains:
        if not (qemu_state_dir() / f"{name}.qcow2").is_file():
            held.stray_files.append(f"(no disk for domain {name})")


LISTERS = {"docker": docker_envs, "lxd": lxd_envs, "qemu": qemu_envs}


def held_by(agent: str, providers: Iterable[str]) -> Held:
    held = Held()
    for provider in providers:
        LISTERS[provider](agent, held)
    return held


def remove_leftovers(agent: str, providers: Iterable[str]) -> None:
    """Remove what a failed test left of ``agent`` on LXD and QEMU (cli_env removes
    Docker's): best effort, for the tests that follow."""
    providers = set(providers)
    if "lxd" in providers:
        with contextlib.suppress(Exception):
            for info in _lxd_owned(agent):
                subprocess.run(
                    ["lxc", "delete", "--force", str(info["name"])],
                    capture_output=True,
                    check=False,
                )
    if "qemu" in providers:
        with contextlib.suppress(Exception):
            held = Held()
            qemu_envs(agent, held)
            for envs in held.by_workspace.values():
                for env in envs:
                    for verb in ("destroy", "undefine"):
                        subprocess.run(
                            ["virsh", "-c", "qemu:///system", verb, env.name],
                            capture_output=True,
                            check=False,
                        )
            for path in qemu_state_dir().glob(f"vd-*{_guest_prefix(agent)}.*"):
                path.unlink(missing_ok=True)
