"""A workspace's supervised services on disk: what a restarted agent resumes.

One JSON file per workspace, ``{"format": 2, "provider": ..., "services": [...]}``
with each service as the fields of :class:`ServiceDef`. It is always replaced
whole: written to a temporary file in the same folder, synced, then renamed
over the old one, so a reader (or an agent that crashed mid-write) finds the
old state or the new, never a mix. The file work runs in a thread, one
operation at a time per file, in the order they were asked.

Agents before format 2 saved each service as a hex-encoded ``ServiceSpec``
message. Reading that needs the generated code, which this package does not
import: the caller passes a decoder (``nodeagent.convert``), and the next save
writes the file in format 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.services.spec import Health, ServiceDef

FORMAT = 2
TEMP_SUFFIX = ".tmp"

# A service as saved by agents before format 2 (a serialized ServiceSpec).
LegacyDecoder = Callable[[bytes], ServiceDef]


@dataclass(frozen=True)
class SavedState:
    provider: str
    services: tuple[ServiceDef, ...]


def _health_dict(h: Health) -> dict[str, Any]:
    return {
        "http": h.http,
        "tcp": h.tcp,
        "command": list(h.command),
        "interval": h.interval,
        "timeout": h.timeout,
        "retries": h.retries,
        "start_period": h.start_period,
    }


def _service_dict(s: ServiceDef) -> dict[str, Any]:
    return {
        "name": s.name,
        "argv": list(s.argv),
        "port": s.port,
        "depends_on": list(s.depends_on),
        "health": None if s.health is None else _health_dict(s.health),
        "env": dict(s.env),
        "restart": s.restart,
    }


def _health(d: dict[str, Any]) -> Health:
    return Health(
        http=str(d["http"]),
        tcp=int(d["tcp"]),
        command=tuple(str(a) for a in d["command"]),
        interval=float(d["interval"]),
        timeout=float(d["timeout"]),
        retries=int(d["retries"]),
        start_period=float(d["start_period"]),
    )


def _service(d: dict[str, Any]) -> ServiceDef:
    return ServiceDef(
        name=str(d["name"]),
        argv=tuple(str(a) for a in d["argv"]),
        port=int(d["port"]),
        depends_on=tuple(str(n) for n in d["depends_on"]),
        health=None if d["health"] is None else _health(d["health"]),
        env={str(k): str(v) for k, v in d["env"].items()},
        restart=str(d["restart"]),
    )


def encode(state: SavedState) -> bytes:
    data = {
        "format": FORMAT,
        "provider": state.provider,
        "services": [_service_dict(s) for s in state.services],
    }
    return json.dumps(data).encode()


def decode(raw: bytes, legacy: LegacyDecoder | None = None) -> SavedState:
    """The saved state, in this format or the one before (ValueError, KeyError or
    TypeError when it is neither)."""
    data = json.loads(raw)
    if data.get("format") == FORMAT:
        services = tuple(_service(d) for d in data["services"])
    elif "format" not in data:  # hex-encoded ServiceSpec messages
        if legacy is None:
            raise ValueError("state saved by an earlier agent, and no decoder for it")
        services = tuple(legacy(bytes.fromhex(h)) for h in data["services"])
    else:
        raise ValueError(f"state saved in unknown format {data['format']!r}")
    return SavedState(str(data["provider"]), services)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power loss
    finally:
        os.close(folder)


def remove_temporaries(folder: Path, before: float) -> None:
    """Temporary files made before time ``before``: left by an agent that died
    mid-write (never renamed: not state). Later ones may be writes under way."""
    for leftover in folder.glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            if leftover.stat().st_mtime < before:
                leftover.unlink()


class StateFile:
    """One workspace's state file. Writes and removal run in a thread, in the order
    they were asked, and never two at once (even when a caller was cancelled while
    its thread still ran)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._order = asyncio.Lock()
        self._io = threading.Lock()

    def _write(self, data: bytes) -> None:
        with self._io:
            write_atomic(self.path, data)

    def _remove(self) -> None:
        with self._io:
            self.path.unlink(missing_ok=True)

    def _read(self) -> bytes:
        with self._io:
            return self.path.read_bytes()

    async def write(self, state: SavedState) -> None:
        data = encode(state)  # now, on the loop: the state as it is at the call
        async with self._order:
            await asyncio.to_thread(self._write, data)

    async def remove(self) -> None:
        async with self._order:
            await asyncio.to_thread(self._remove)

    async def read(self, legacy: LegacyDecoder | None = None) -> SavedState:
        async with self._order:
            raw = await asyncio.to_thread(self._read)
        return decode(raw, legacy)
