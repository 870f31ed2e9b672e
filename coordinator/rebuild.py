"""A changed config takes effect: `up` re-reads it from the workspace's source and says
what changed; what needs a new environment is applied by `rebuild`, which recreates
the environment and keeps its source (/workspace and its branch).

Which file: the one it was created with, for a folder or a git checkout's worktree
(the project's config, where you edit it; create read that file, not the worktree's
copy, which lacks uncommitted edits), else the copy at the same place in the
worktree or folder; a clone's .vendetta/config.yaml. A workspace without a source
keeps the config it was created with: a path sent by a client elsewhere must not make
the coordinator read its own machine's files (a source folder or worktree only ever
comes from a client on this machine; over the network only URLs are taken).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import ProjectConfig, parse_config
from common.config_read import read_config_text
from common.errors import (
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
    VendettaError,
)
from coordinator import services, source_git
from coordinator.agent_client import NodeLostError
from coordinator.models import Desired, WorkspaceRecord, WorkspaceState

if TYPE_CHECKING:
    from coordinator.workspaces import WorkspaceService

DEFAULT_CONFIG = Path(".vendetta") / "config.yaml"
# Taken as they are at `up`; every other key needs a new environment.
_AT_UP = ("services", "hooks", "source", "name")
_SECTIONS = ("docker", "lxd", "qemu")


def config_file(ws: WorkspaceRecord) -> Path | None:
    """The file `up` re-reads the workspace's config from (None: it keeps its own)."""
    src = ws.source
    if not src.kind or not src.path:
        return None
    if src.kind == "git" and not src.repo:  # a clone of a URL
        candidate = Path(src.path) / DEFAULT_CONFIG
        return candidate if candidate.is_file() else None
    if not ws.config_path:
        return None
    given = Path(ws.config_path)
    if given.is_file():
        return given
    base = Path(src.origin if src.kind == "folder" else src.repo)
    if not given.is_relative_to(base):
        return None
    candidate = Path(src.path) / given.relative_to(base)  # the project moved: its copy
    return candidate if candidate.is_file() else None


def _parse(text: str, where: str) -> ProjectConfig | None:
    return parse_config(text, where) if text.strip() else None


def _dump(cfg: ProjectConfig | None) -> dict[str, Any]:
    """Its keys; no config is the defaults."""
    return (cfg or ProjectConfig(name="none")).model_dump(mode="json")


def _short(value: object) -> str:
    text = "-" if value in (None, "", [], {}) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def at_up(old: ProjectConfig | None, new: ProjectConfig | None) -> list[str]:
    """What changed that `up` applies (services by name, hooks, limits)."""
    a, b = _dump(old), _dump(new)
    said: list[str] = []
    olds, news = a.get("services") or {}, b.get("services") or {}
    for verb, names in (
        ("added", [n for n in news if n not in olds]),
        ("removed", [n for n in olds if n not in news]),
        ("changed", [n for n in news if n in olds and news[n] != olds[n]]),
    ):
        if names:
            said.append(f"services {verb}: {', '.join(names)}")
    said += [key for key in _AT_UP if key != "services" and a.get(key) != b.get(key)]
    return said


def needs_rebuild(old: ProjectConfig | None, new: ProjectConfig | None, provider: str) -> list[str]:
    """What changed that only a new environment applies, as `key old -> new`."""
    a, b = _dump(old), _dump(new)
    said: list[str] = []
    new_provider = new.provider if new is not None else provider
    if old is not None and new is not None and old.provider != new.provider:
        said.append(f"provider {old.provider} -> {new.provider}")
    else:
        new_provider = provider
    section_a, section_b = a.get(new_provider) or {}, b.get(new_provider) or {}
    for key in sorted(set(section_a) | set(section_b)):
        if section_a.get(key) != section_b.get(key):
            said.append(
                f"{new_provider}.{key} {_short(section_a.get(key))} -> {_short(section_b.get(key))}"
            )
    for key in ("workdir", "user", "remote"):
        if a.get(key) != b.get(key):
            said.append(f"{key} {_short(a.get(key))} -> {_short(b.get(key))}")
    ports_a, ports_b = services.ports(old), services.ports(new)
    if ports_a != ports_b:
        said.append(f"ports to publish {_short(ports_a)} -> {_short(ports_b)}")
    return said


def built_config(ws: WorkspaceRecord) -> ProjectConfig | None:
    """The config the workspace's environment was made from."""
    return _parse(ws.built_yaml or ws.config_yaml, ws.config_path or "config")


async def refresh(svc: WorkspaceService, ws: WorkspaceRecord) -> bool:
    """Take the config in the workspace's source into its record (the caller holds its
    lock) and say what changed; True when its environment needs a rebuild for it.
    A config that does not parse changes nothing and says what to fix."""
    path = config_file(ws)
    if path is None:
        return bool(ws.built_yaml)
    again = f"then run `vendetta workspace up {ws.name}` again (nothing was changed)"
    try:
        text = await asyncio.to_thread(read_config_text, path)
        new = _parse(text, str(path))
    except VendettaError as exc:
        raise FailedPreconditionError(f"{exc}; fix {path}, {again}") from exc
    if text == ws.config_yaml:
        return bool(ws.built_yaml)
    old = _parse(ws.config_yaml, ws.config_path or "config")
    built = built_config(ws)
    now = at_up(old, new)
    later = needs_rebuild(built, new, ws.provider)
    if (old and old.hooks and old.hooks.setup) != (new and new.hooks and new.hooks.setup):
        ws.setup_done = False  # a changed setup hook runs again
    ws.built_yaml = (ws.built_yaml or ws.config_yaml) if later else ""
    ws.config_yaml = text
    message = f"config changed in {path}"
    if now:
        message += f": {'; '.join(now)} (applied now)"
    await svc.save(ws, message)
    if later:
        svc.publish(ws, rebuild_hint(ws.name, later))
    return bool(later)


def rebuild_hint(name: str, later: list[str]) -> str:
    return (
        f"config changes that need a new environment: {'; '.join(later)}: run "
        f"`vendetta workspace rebuild {name}` to apply them (/workspace and its branch stay)"
    )


def _same_kind(exc: VendettaError, message: str) -> VendettaError:
    try:
        return type(exc)(message)
    except TypeError:  # a kind with its own arguments
        return FailedPreconditionError(message)


def explained(name: str, exc: VendettaError) -> VendettaError:
    """A failed `up`'s error, saying that `up` (or `rebuild`) applies a fix."""
    if isinstance(exc, UnavailableError | NotFoundError) or f"workspace up {name}" in str(exc):
        return exc
    return _same_kind(
        exc,
        f"{exc}; once fixed, `vendetta workspace up {name}` applies it (`vendetta workspace "
        f"rebuild {name}` for the image, provider, resources, ports, workdir or user)",
    )


async def rebuild(svc: WorkspaceService, name: str, force: bool = False) -> WorkspaceRecord:
    """Recreate the workspace's environment with its current config, keeping its source;
    started again (setup hook, services) when it was meant to run."""
    async with svc.lock(name), svc._outcome_unknown(name, "rebuild"):
        ws = await svc.get(name)
        if ws.source.mode == "copied" and not force:
            raise FailedPreconditionError(
                f"workspace {name!r} runs on {ws.provider}, which copied its source in: a "
                "rebuild copies it in again from here, and what changed inside is lost. Copy "
                f"it out first (`vendetta workspace connect {name} -- tar -C "
                f"{ws.source.workdir or '/workspace'} -c . | tar -x`), then rebuild with --force"
            )
        await refresh(svc, ws)
        cfg = _parse(ws.config_yaml, ws.config_path or "config")
        built = built_config(ws)
        provider = ws.provider
        if built is not None and cfg is not None and built.provider != cfg.provider:
            provider = cfg.provider
        if cfg is not None and built is not None and cfg.remote != built.remote:
            svc.publish(
                ws,
                f"the config names another node: a rebuild stays on node {ws.node}; to move, "
                f"`vendetta workspace destroy {name}` and `create` it again",
            )
        client = await svc.nodes.get(ws.node).client()
        spec = services.environment_spec(name, provider, cfg)
        spec.owner = svc.owner  # labelled as this coordinator's, as at create
        spec.workdir = cfg.workdir if cfg else "/workspace"
        spec.user = (cfg.user or "") if cfg else ""
        src = ws.source
        if src.kind:  # where it is on the node stays: a local folder, the node's copy
            spec.source_path = src.node_path
            if src.transport == "live":
                spec.git_dir = await source_git.git_dir(src)
        running = ws.desired == Desired.RUNNING
        svc.relays.detach(name)
        ws.observed, ws.detail = WorkspaceState.STOPPING, ""
        await svc.save(ws, f"rebuilding: removing the environment on node {ws.node}")
        await client.destroy(name, ws.provider)
        ws.observed, ws.environment_id, ws.addresses = WorkspaceState.ERROR, "", []
        ws.detail = f"rebuild under way: no environment; `vendetta workspace rebuild {name}`"
        await svc.save(ws, f"rebuilding: creating a {provider} environment ({spec.image})")
        try:
            env = await client.create(spec)
        except NodeLostError:
            raise
        except VendettaError as exc:
            ws.detail = (
                f"rebuild failed: {exc}; its source is kept: fix the config and run "
                f"`vendetta workspace rebuild {name}` again"
            )
            await svc.save(ws, ws.detail)
            raise _same_kind(exc, ws.detail) from exc
        ws.provider, ws.image = provider, spec.image
        ws.environment_id, ws.addresses = env.id, list(env.addresses)
        ws.observed, ws.detail = WorkspaceState.STOPPED, ""
        ws.desired = Desired.STOPPED
        ws.built_yaml, ws.setup_done = "", False  # a new environment: its setup hook again
        if src.kind:
            src.mode, src.workdir = env.source_mode, env.workdir or spec.workdir
        await svc.save(ws, "rebuilt: a new environment with the current config")
    return await svc.up(name) if running else ws
