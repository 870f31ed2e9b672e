"""Coordinator state behind one interface; SQLite (WAL) by default.

The interface is what a PostgreSQL store for several coordinators would
implement later. SQLite calls are short but blocking: they run in a thread,
serialised by a lock, so the event loop never waits on the disk.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from common.errors import AlreadyExistsError
from coordinator.models import (
    Desired,
    NodeRecord,
    WorkspaceRecord,
    WorkspaceSource,
    WorkspaceState,
)
from coordinator.tokens import TokenRecord, astuple

T = TypeVar("T")


class Store(abc.ABC):
    # Moves on after every workspace write has landed: caches of workspace lists are
    # keyed on it (read it before reading the list, so a race can only miss).
    workspaces_version: int = 0

    @abc.abstractmethod
    async def add_node(self, node: NodeRecord) -> None: ...
    @abc.abstractmethod
    async def get_node(self, name: str) -> NodeRecord | None: ...
    @abc.abstractmethod
    async def list_nodes(self) -> list[NodeRecord]: ...
    @abc.abstractmethod
    async def delete_node(self, name: str) -> None: ...

    @abc.abstractmethod
    async def set_host_key(self, name: str, host_key: str, fingerprint: str) -> None: ...

    @abc.abstractmethod
    async def add_workspace(self, ws: WorkspaceRecord) -> None: ...
    @abc.abstractmethod
    async def update_workspace(self, ws: WorkspaceRecord) -> None: ...
    @abc.abstractmethod
    async def get_workspace(self, name: str) -> WorkspaceRecord | None: ...
    @abc.abstractmethod
    async def list_workspaces(self, node: str = "") -> list[WorkspaceRecord]: ...
    @abc.abstractmethod
    async def delete_workspace(self, name: str) -> None: ...

    @abc.abstractmethod
    async def count_workspaces(self) -> dict[str, int]:
        """Workspaces per node (nodes without any are absent)."""

    @abc.abstractmethod
    async def get_ports(self, workspace: str) -> dict[str, int]: ...
    @abc.abstractmethod
    async def set_port(self, workspace: str, service: str, port: int) -> None: ...
    @abc.abstractmethod
    async def delete_ports(self, workspace: str) -> None: ...

    @abc.abstractmethod
    async def get_request(self, request_id: str) -> tuple[str, bytes] | None: ...
    @abc.abstractmethod
    async def put_request(self, request_id: str, method: str, response: bytes) -> None: ...

    # bearer tokens (coordinator/tokens.py): rows keyed by the token's public id
    @abc.abstractmethod
    async def add_token(self, token: TokenRecord) -> None: ...
    @abc.abstractmethod
    async def get_token(self, token_id: str) -> TokenRecord | None: ...
    @abc.abstractmethod
    async def list_tokens(self) -> list[TokenRecord]: ...
    @abc.abstractmethod
    async def revoke_token(self, token_id: str, when_unix_nano: int) -> None: ...

    async def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    transport TEXT NOT NULL,
    user TEXT NOT NULL,
    port INTEGER NOT NULL,
    host_key TEXT NOT NULL,
    host_key_fingerprint TEXT NOT NULL,
    identity_file TEXT NOT NULL,
    agent_command TEXT NOT NULL,
    created INTEGER NOT NULL,
    grace REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS workspaces (
    name TEXT PRIMARY KEY,
    node TEXT NOT NULL REFERENCES nodes(name),
    provider TEXT NOT NULL,
    image TEXT NOT NULL,
    config_yaml TEXT NOT NULL,
    config_path TEXT NOT NULL,
    desired TEXT NOT NULL,
    observed TEXT NOT NULL,
    detail TEXT NOT NULL,
    environment_id TEXT NOT NULL,
    addresses TEXT NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    setup_done INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT '',
    built_yaml TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS ports (
    workspace TEXT NOT NULL,
    service TEXT NOT NULL,
    port INTEGER NOT NULL,
    PRIMARY KEY (workspace, service)
);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    response BLOB NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    secret_hash TEXT NOT NULL,
    scopes TEXT NOT NULL,
    workspaces TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    revoked INTEGER NOT NULL,
    created_by TEXT NOT NULL
);
"""

# Requests older than this are forgotten: retries come within seconds.
_REQUEST_TTL_NS = 24 * 3600 * 10**9


class SqliteStore(Store):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(workspaces)")}
            if "setup_done" not in columns:  # state from before hooks existed
                self._db.execute(
                    "ALTER TABLE workspaces ADD COLUMN setup_done INTEGER NOT NULL DEFAULT 0"
                )
            if "source" not in columns:  # state from before workspaces had a source
                self._db.execute(
                    "ALTER TABLE workspaces ADD COLUMN source TEXT NOT NULL DEFAULT ''"
                )
            if "built_yaml" not in columns:  # state from before rebuild
                self._db.execute(
                    "ALTER TABLE workspaces ADD COLUMN built_yaml TEXT NOT NULL DEFAULT ''"
                )
            node_columns = {r[1] for r in self._db.execute("PRAGMA table_info(nodes)")}
            if "grace" not in node_columns:  # state from before per-node grace periods
                self._db.execute("ALTER TABLE nodes ADD COLUMN grace REAL NOT NULL DEFAULT 0")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn(self._db)

        return await asyncio.to_thread(locked)

    async def _write_workspaces(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        def write(db: sqlite3.Connection) -> None:
            fn(db)
            # Under the lock, after the write: a reader that saw this version reads after
            # it. In the thread, so a caller cancelled meanwhile still moves it on.
            self.workspaces_version += 1

        await self._run(write)

    # nodes
    async def add_node(self, node: NodeRecord) -> None:
        def op(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO nodes (name, address, transport, user, port, host_key, "
                    "host_key_fingerprint, identity_file, agent_command, created, grace) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        node.name,
                        node.address,
                        node.transport,
                        node.user,
                        node.port,
                        node.host_key,
                        node.host_key_fingerprint,
                        node.identity_file,
                        json.dumps(node.agent_command),
                        node.created_unix_nano,
                        node.grace_seconds,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExistsError(f"node {node.name!r} already exists") from exc

        await self._run(op)

    async def get_node(self, name: str) -> NodeRecord | None:
        rows = await self._run(
            lambda db: db.execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchall()
        )
        return _node(rows[0]) if rows else None

    async def list_nodes(self) -> list[NodeRecord]:
        rows = await self._run(
            lambda db: db.execute("SELECT * FROM nodes ORDER BY name").fetchall()
        )
        return [_node(r) for r in rows]

    async def set_host_key(self, name: str, host_key: str, fingerprint: str) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE nodes SET host_key=?, host_key_fingerprint=? WHERE name=?",
                (host_key, fingerprint, name),
            )
        )

    async def delete_node(self, name: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM nodes WHERE name=?", (name,)))

    # workspaces
    async def add_workspace(self, ws: WorkspaceRecord) -> None:
        def op(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO workspaces (name, node, provider, image, config_yaml, "
                    "config_path, desired, observed, detail, environment_id, addresses, created, "
                    "updated, setup_done, source, built_yaml) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    _ws_row(ws),
                )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExistsError(f"workspace {ws.name!r} already exists") from exc

        await self._write_workspaces(op)

    async def update_workspace(self, ws: WorkspaceRecord) -> None:
        ws.updated_unix_nano = time.time_ns()
        row = _ws_row(ws)
        await self._write_workspaces(
            lambda db: db.execute(
                "UPDATE workspaces SET node=?, provider=?, image=?, config_yaml=?, config_path=?, "
                "desired=?, observed=?, detail=?, environment_id=?, addresses=?, created=?, "
                "updated=?, setup_done=?, source=?, built_yaml=? WHERE name=?",
                (*row[1:], row[0]),
            )
        )

    async def get_workspace(self, name: str) -> WorkspaceRecord | None:
        rows = await self._run(
            lambda db: db.execute("SELECT * FROM workspaces WHERE name=?", (name,)).fetchall()
        )
        return _ws(rows[0]) if rows else None

    async def list_workspaces(self, node: str = "") -> list[WorkspaceRecord]:
        def op(db: sqlite3.Connection) -> list[Any]:
            if node:
                q = "SELECT * FROM workspaces WHERE node=? ORDER BY name"
                return db.execute(q, (node,)).fetchall()
            return db.execute("SELECT * FROM workspaces ORDER BY name").fetchall()

        return [_ws(r) for r in await self._run(op)]

    async def count_workspaces(self) -> dict[str, int]:
        rows = await self._run(
            lambda db: db.execute("SELECT node, COUNT(*) FROM workspaces GROUP BY node").fetchall()
        )
        return {str(node): int(n) for node, n in rows}

    async def delete_workspace(self, name: str) -> None:
        await self._write_workspaces(
            lambda db: db.execute("DELETE FROM workspaces WHERE name=?", (name,))
        )

    # ports chosen on the user's machine, reused on the next up
    async def get_ports(self, workspace: str) -> dict[str, int]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT service, port FROM ports WHERE workspace=?", (workspace,)
            ).fetchall()
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def set_port(self, workspace: str, service: str, port: int) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO ports VALUES (?,?,?)", (workspace, service, port)
            )
        )

    async def delete_ports(self, workspace: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM ports WHERE workspace=?", (workspace,)))

    # request ids
    async def get_request(self, request_id: str) -> tuple[str, bytes] | None:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT method, response FROM requests WHERE id=?", (request_id,)
            ).fetchall()
        )
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    async def put_request(self, request_id: str, method: str, response: bytes) -> None:
        now = time.time_ns()

        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM requests WHERE created < ?", (now - _REQUEST_TTL_NS,))
            db.execute(
                "INSERT OR REPLACE INTO requests VALUES (?,?,?,?)",
                (request_id, method, response, now),
            )

        await self._run(op)

    # tokens
    async def add_token(self, token: TokenRecord) -> None:
        def op(db: sqlite3.Connection) -> None:
            try:
                row = [json.dumps(v) if isinstance(v, list) else v for v in astuple(token)]
                db.execute("INSERT INTO tokens VALUES (?,?,?,?,?,?,?,?,?)", row)
            except sqlite3.IntegrityError as exc:
                raise AlreadyExistsError(f"a token named {token.name!r} exists") from exc

        await self._run(op)

    async def get_token(self, token_id: str) -> TokenRecord | None:
        rows = await self._run(
            lambda db: db.execute("SELECT * FROM tokens WHERE id=?", (token_id,)).fetchall()
        )
        return _token(rows[0]) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._run(
            lambda db: db.execute("SELECT * FROM tokens ORDER BY created").fetchall()
        )
        return [_token(r) for r in rows]

    async def revoke_token(self, token_id: str, when_unix_nano: int) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE tokens SET revoked=? WHERE id=?", (when_unix_nano, token_id)
            )
        )

    async def close(self) -> None:
        await self._run(lambda db: db.close())


def _token(r: sqlite3.Row) -> TokenRecord:
    # The table's columns are TokenRecord's fields, in order; lists are JSON.
    values = list(r)
    values[3:5] = json.loads(r["scopes"]), json.loads(r["workspaces"])
    return TokenRecord(*values)


def _node(r: sqlite3.Row) -> NodeRecord:
    return NodeRecord(
        name=r["name"],
        address=r["address"],
        transport=r["transport"],
        user=r["user"],
        port=r["port"],
        host_key=r["host_key"],
        host_key_fingerprint=r["host_key_fingerprint"],
        identity_file=r["identity_file"],
        agent_command=json.loads(r["agent_command"]),
        created_unix_nano=r["created"],
        grace_seconds=r["grace"],
    )


def _ws_row(ws: WorkspaceRecord) -> tuple[Any, ...]:
    return (
        ws.name,
        ws.node,
        ws.provider,
        ws.image,
        ws.config_yaml,
        ws.config_path,
        ws.desired.value,
        ws.observed.value,
        ws.detail,
        ws.environment_id,
        json.dumps(ws.addresses),
        ws.created_unix_nano,
        ws.updated_unix_nano,
        int(ws.setup_done),
        json.dumps(dataclasses.asdict(ws.source)) if ws.source.kind else "",
        ws.built_yaml,
    )


def _ws(r: sqlite3.Row) -> WorkspaceRecord:
    return WorkspaceRecord(
        name=r["name"],
        node=r["node"],
        provider=r["provider"],
        image=r["image"],
        config_yaml=r["config_yaml"],
        config_path=r["config_path"],
        desired=Desired(r["desired"]),
        observed=WorkspaceState(r["observed"]),
        detail=r["detail"],
        environment_id=r["environment_id"],
        addresses=json.loads(r["addresses"]),
        created_unix_nano=r["created"],
        updated_unix_nano=r["updated"],
        setup_done=bool(r["setup_done"]),
        source=_source(r["source"]),
        built_yaml=r["built_yaml"],
    )


def _source(text: str) -> WorkspaceSource:
    if not text:
        return WorkspaceSource()
    known = {f.name for f in dataclasses.fields(WorkspaceSource)}
    return WorkspaceSource(**{k: v for k, v in json.loads(text).items() if k in known})
