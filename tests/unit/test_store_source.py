"""A workspace's source in the store: kept across a restart, and state from before
sources existed still opens (the column is added, empty)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cli.workspace_source import project_folder
from coordinator.models import NodeRecord, WorkspaceRecord, WorkspaceSource
from coordinator.store import SqliteStore


async def test_the_source_is_kept(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    await store.add_node(NodeRecord(name="local", address="", transport="local"))
    src = WorkspaceSource(
        kind="git", origin="/p", branch="vendetta/a", path="/w/a", repo="/p", transport="live"
    )
    await store.add_workspace(WorkspaceRecord("a", "local", "docker", "img", source=src))
    await store.add_workspace(WorkspaceRecord("b", "local", "docker", "img"))
    await store.close()
    again = SqliteStore(tmp_path / "state.db")
    a = await again.get_workspace("a")
    b = await again.get_workspace("b")
    assert a is not None and a.source == src
    assert b is not None and b.source == WorkspaceSource()
    a.source.last_transfer_unix_nano = 42
    await again.update_workspace(a)
    got = await again.get_workspace("a")
    assert got is not None and got.source.last_transfer_unix_nano == 42
    await again.close()


async def test_state_from_before_sources_opens(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript(
        """
        CREATE TABLE workspaces (name TEXT PRIMARY KEY, node TEXT NOT NULL, provider TEXT
          NOT NULL, image TEXT NOT NULL, config_yaml TEXT NOT NULL, config_path TEXT NOT NULL,
          desired TEXT NOT NULL, observed TEXT NOT NULL, detail TEXT NOT NULL, environment_id
          TEXT NOT NULL, addresses TEXT NOT NULL, created INTEGER NOT NULL, updated INTEGER
          NOT NULL, setup_done INTEGER NOT NULL DEFAULT 0);
        INSERT INTO workspaces VALUES ('old', 'local', 'docker', 'img', '', '', 'stopped',
          'stopped', '', 'id', '[]', 1, 1, 1);
        """
    )
    db.close()
    store = SqliteStore(tmp_path / "state.db")
    old = await store.get_workspace("old")
    assert old is not None and old.source == WorkspaceSource() and old.setup_done
    await store.close()


def test_the_project_folder_holds_the_vendetta_folder(tmp_path: Path) -> None:
    assert project_folder(tmp_path / "p" / ".vendetta" / "config.yaml") == tmp_path / "p"
    assert project_folder(tmp_path / "elsewhere" / "my.yaml") == tmp_path / "elsewhere"
