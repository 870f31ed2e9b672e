"""What `up` takes from a changed config and what waits for `rebuild`, and which file
it re-reads (coordinator/rebuild.py)."""

from __future__ import annotations

from pathlib import Path

from common.config import parse_config
from coordinator.models import WorkspaceRecord, WorkspaceSource
from coordinator.rebuild import at_up, config_file, needs_rebuild


def test_services_and_hooks_apply_at_up_the_environment_waits_for_rebuild() -> None:
    old = parse_config(
        "name: p\ndocker: {image: a}\nservices: {x: {command: run, port: 80}, y: {command: y}}",
        "c",
    )
    new = parse_config(
        "name: p\ndocker: {image: b}\nworkdir: /src\nhooks: {setup: s}\n"
        "services: {x: {command: run2, port: 80}, z: {command: z, port: 81}}",
        "c",
    )
    assert at_up(old, new) == [
        "services added: z",
        "services removed: y",
        "services changed: x",
        "hooks",
    ]
    assert needs_rebuild(old, new, "docker") == [
        "docker.image a -> b",
        "workdir /workspace -> /src",
        "ports to publish [80] -> [80, 81]",
    ]
    # Another provider's section is not this workspace's business; its own provider is.
    lxd = parse_config("name: p\ndocker: {image: a}\nlxd: {image: other}", "c")
    assert needs_rebuild(old.model_copy(update={"services": {}}), lxd, "docker") == []
    moved = parse_config("name: p\nprovider: lxd\nlxd: {image: l}", "c")
    assert needs_rebuild(None, moved, "docker") == []
    base = parse_config("name: p\ndocker: {image: a}", "c")
    assert needs_rebuild(base, moved, "docker")[0] == "provider docker -> lxd"
    assert at_up(base, base) == [] and needs_rebuild(base, base, "docker") == []


def test_the_config_is_reread_from_where_it_came(tmp_path: Path) -> None:
    repo, worktree = tmp_path / "repo", tmp_path / "wt"
    for d in (repo, worktree):
        (d / ".vendetta").mkdir(parents=True)
    given = repo / ".vendetta" / "config.yaml"
    given.write_text("name: p\n")
    (worktree / ".vendetta" / "config.yaml").write_text("name: p\n")
    ws = WorkspaceRecord(name="w", node="local", provider="docker", image="i")
    ws.config_path = str(given)
    assert config_file(ws) is None  # no source: the config it was created with
    ws.source = WorkspaceSource(kind="git", origin=str(repo), repo=str(repo), path=str(worktree))
    assert config_file(ws) == given  # the project's, where it is edited
    given.unlink()
    assert config_file(ws) == worktree / ".vendetta" / "config.yaml"  # gone: the copy
    ws.source = WorkspaceSource(kind="folder", origin=str(repo), path=str(repo))
    assert config_file(ws) is None
    given.write_text("name: p\n")
    assert config_file(ws) == given
    clone = tmp_path / "clone"
    ws.source = WorkspaceSource(kind="git", origin="https://x/y.git", path=str(clone))
    assert config_file(ws) is None  # a clone without one: never the path a client sent
    (clone / ".vendetta").mkdir(parents=True)
    (clone / ".vendetta" / "config.yaml").write_text("name: p\n")
    assert config_file(ws) == clone / ".vendetta" / "config.yaml"
