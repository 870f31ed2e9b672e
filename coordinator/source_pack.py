"""What of a source is sent to a node, as a tar streamed while it is made.

Only the source folder, and of it only what is not ignored: in a git repository what
`git ls-files -co --exclude-standard` lists (tracked and untracked files that no
.gitignore excludes), in a plain folder what no .gitignore excludes; .vendettaignore
(same syntax) excludes more in both. A size and a file-count limit stop an accidental
upload of a huge folder. A manifest (path -> size, mtime, hash) of what was sent lets
`push` send only what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import stat
import tarfile
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

import pathspec

from common.errors import FailedPreconditionError
from coordinator.source_git import git

IGNORE_FILES = (".gitignore", ".vendettaignore")
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Entry:
    rel: str  # relative, with '/'
    size: int
    mtime_ns: int
    link: str = ""  # a symlink's target


@dataclass
class Manifest:
    """What the node has of the source: rel -> (size, mtime_ns, sha256 or link target)."""

    files: dict[str, tuple[int, int, str]] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: list(v) for k, v in self.files.items()}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        return cls({k: (int(v[0]), int(v[1]), str(v[2])) for k, v in data.items()})


def _spec(folder: Path) -> pathspec.GitIgnoreSpec | None:
    lines: list[str] = []
    for name in IGNORE_FILES:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
            lines += (folder / name).read_text().splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines) if lines else None


def _ignored(specs: list[tuple[str, pathspec.GitIgnoreSpec]], rel: str, is_dir: bool) -> bool:
    """Whether ``rel`` is excluded by the ignore files of the folders above it (each
    one's patterns relative to its own folder, the nearest last, as git reads them)."""
    verdict = False
    for base, spec in specs:
        sub = rel[len(base) + 1 :] if base else rel
        result = spec.check_file(sub + "/" if is_dir else sub)
        if result.include is not None:
            verdict = bool(result.include)
    return verdict


def _walk_folder(root: Path, only_vendettaignore: bool = False) -> list[str]:
    """Relative paths of the files under ``root`` that the ignore files let through."""
    found: list[str] = []

    def visit(folder: Path, rel: str, specs: list[tuple[str, pathspec.GitIgnoreSpec]]) -> None:
        spec = _spec(folder)
        if spec is not None:
            specs = [*specs, (rel, spec)]
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            child = f"{rel}/{e.name}" if rel else e.name
            is_dir = e.is_dir(follow_symlinks=False)
            if e.name == ".git" or _ignored(specs, child, is_dir):
                continue
            if is_dir:
                visit(Path(e.path), child, specs)
            else:
                found.append(child)

    visit(root, "", [])
    return found


def not_ignored(root: Path, rel: str) -> bool:
    """Whether a file ``rel`` of a plain folder ``root`` is one a transfer takes (the
    ignore files of the folders on its way say, as for the listing)."""
    parts = rel.split("/")
    if ".git" in parts or ".." in parts:
        return False
    specs: list[tuple[str, pathspec.GitIgnoreSpec]] = []
    for i in range(len(parts)):
        base = "/".join(parts[:i])
        spec = _spec(root / base) if (root / base).is_dir() else None
        if spec is not None:
            specs.append((base, spec))
        if _ignored(specs, "/".join(parts[: i + 1]), i < len(parts) - 1):
            return False
    return True


def _vendettaignore(root: Path) -> pathspec.GitIgnoreSpec | None:
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return pathspec.GitIgnoreSpec.from_lines(
            (root / ".vendettaignore").read_text().splitlines()
        )
    return None


async def list_files(root: Path, kind: str) -> list[Entry]:
    """The files of a source that are sent, with their size and mtime."""
    if kind == "git":
        out = await git("ls-files", "-co", "--exclude-standard", "-z", cwd=root)
        rels = sorted(set(filter(None, out.split("\0"))))
        extra = await asyncio.to_thread(_vendettaignore, root)
        if extra is not None:
            rels = [r for r in rels if not extra.match_file(r)]
    else:
        rels = await asyncio.to_thread(_walk_folder, root)
    return await asyncio.to_thread(_stat_all, root, rels)


def _stat_all(root: Path, rels: Iterable[str]) -> list[Entry]:
    entries = []
    for rel in rels:
        try:
            st = os.lstat(root / rel)
        except FileNotFoundError:  # tracked, but deleted in the checkout
            continue
        if stat.S_ISLNK(st.st_mode):
            entries.append(Entry(rel, 0, st.st_mtime_ns, os.readlink(root / rel)))
        elif stat.S_ISREG(st.st_mode):
            entries.append(Entry(rel, st.st_size, st.st_mtime_ns))
        # anything else (a submodule's folder, a socket) is not sent
    return entries


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_limits(entries: list[Entry], root: Path, max_bytes: int, max_files: int) -> None:
    """Refuse a source over the limits, naming what is large in it."""
    total = sum(e.size for e in entries)
    if total <= max_bytes and len(entries) <= max_files:
        return
    by_top: dict[str, list[int]] = {}
    for e in entries:
        top = e.rel.split("/", 1)[0] + ("/" if "/" in e.rel else "")
        agg = by_top.setdefault(top, [0, 0])
        agg[0] += e.size
        agg[1] += 1
    key = 0 if total > max_bytes else 1
    largest = sorted(by_top.items(), key=lambda kv: -kv[1][key])[:5]
    named = ", ".join(f"{k} ({human(v[0])}, {v[1]} files)" for k, v in largest)
    raise FailedPreconditionError(
        f"the source {root} is {human(total)} in {len(entries)} files, over the limit of "
        f"{human(max_bytes)} and {max_files} files; largest: {named}. Add what need not "
        "be sent to .vendettaignore (or .gitignore), or raise source.max_size / "
        "source.max_files in the config"
    )


def delta(entries: list[Entry], sent: Manifest) -> tuple[list[Entry], list[str], list[Entry]]:
    """(changed or new, deleted, unchanged-looking) against what was sent. Changed-looking
    files whose content hashes the same are dropped later, as they are read."""
    now = {e.rel for e in entries}
    changed, same = [], []
    for e in entries:
        was = sent.files.get(e.rel)
        if was is None or was[0] != e.size or was[1] != e.mtime_ns or (e.link and was[2] != e.link):
            changed.append(e)
        else:
            same.append(e)
    deleted = sorted(set(sent.files) - now)
    return changed, deleted, same


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


@dataclass
class PackStats:
    files: int = 0
    bytes: int = 0  # of the tar, so far
    hashes: dict[str, tuple[int, int, str]] = field(default_factory=dict)


class _QueueWriter:
    """A file object for tarfile that hands its bytes to the event loop in chunks."""

    def __init__(self, q: queue.Queue[bytes | BaseException | None], stop: threading.Event):
        self.q, self.stop, self.buf = q, stop, bytearray()

    def write(self, data: bytes) -> int:
        if self.stop.is_set():
            raise OSError("the transfer was cancelled")
        self.buf += data
        if len(self.buf) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buf:
            while not self.stop.is_set():
                try:
                    self.q.put(bytes(self.buf), timeout=0.5)
                    break
                except queue.Full:
                    continue
            self.buf.clear()


def _add(tar: tarfile.TarFile, root: Path, e: Entry, prefix: str) -> str:
    """Add one entry; its hash (or link target)."""
    info = tarfile.TarInfo(prefix + e.rel)
    info.mtime = e.mtime_ns // 10**9
    if e.link:
        info.type, info.linkname = tarfile.SYMTYPE, e.link
        tar.addfile(info)
        return e.link
    path = root / e.rel
    st = os.lstat(path)
    # The size listed, which tar_size counted (a file that grew since is cut there).
    info.size, info.mode = e.size, stat.S_IMODE(st.st_mode) | 0o600
    h = hashlib.sha256()

    class Hashing:
        def read(self, n: int = -1) -> bytes:
            data = f.read(n)
            h.update(data)
            return data

    with path.open("rb") as f:
        try:
            tar.addfile(info, cast(IO[bytes], Hashing()))
        except OSError as exc:
            raise FailedPreconditionError(
                f"{path} changed while it was sent: run the command again"
            ) from exc
    return h.hexdigest()


def _blocks(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def tar_size(parts: list[tuple[Path, str, list[Entry]]]) -> int:
    """The exact size of the tar tar_stream makes of ``parts`` (GNU format: a header
    block per member, a long-name member before names over 100 bytes)."""
    total = 0
    for _root, prefix, entries in parts:
        for e in entries:
            for text in (prefix + e.rel, e.link):
                n = len(text.encode("utf-8", "surrogateescape"))
                if n > tarfile.LENGTH_NAME:
                    total += tarfile.BLOCKSIZE + _blocks(n + 1)
            total += tarfile.BLOCKSIZE + (0 if e.link else _blocks(e.size))
    total += 2 * tarfile.BLOCKSIZE
    return -(-total // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


async def tar_stream(
    parts: list[tuple[Path, str, list[Entry]]], stats: PackStats
) -> AsyncIterator[bytes]:
    """A tar of ``parts`` (root, prefix inside the tar, entries) in chunks, made in a
    thread as it is read; ``stats`` counts and records each file's hash."""
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=8)
    stop = threading.Event()

    def produce() -> None:
        try:
            w = _QueueWriter(q, stop)
            fileobj = cast(IO[bytes], w)
            with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.GNU_FORMAT) as tar:
                for root, prefix, entries in parts:
                    for e in entries:
                        digest = _add(tar, root, e, prefix)
                        stats.files += 1
                        if not prefix:
                            stats.hashes[e.rel] = (e.size, e.mtime_ns, digest)
            w.flush()
            q.put(None)
        except BaseException as exc:
            if not stop.is_set():
                q.put(exc)

    thread = threading.Thread(target=produce, name="source-tar", daemon=True)
    thread.start()
    try:
        while True:
            item = await asyncio.to_thread(q.get)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            stats.bytes += len(item)
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()


def walk_all(root: Path) -> list[Entry]:
    """Every file under ``root`` (for a repository's .git folder: nothing is ignored)."""
    rels = []
    for folder, _dirs, files in os.walk(root):
        base = Path(folder).relative_to(root)
        rels += [str(base / f) if str(base) != "." else f for f in files]
    return _stat_all(root, sorted(rels))


def extract(
    data: IO[bytes],
    dest: Path,
    keep: Callable[[str], str | None],
    headers: dict[str, str] | None = None,
) -> list[str]:
    """Extract regular files and links of a tar read from ``data`` into ``dest``;
    ``keep(name)`` maps a member's name to where it goes (None: skip). Names that
    would leave ``dest`` are refused. ``headers`` gets the tar's pax global headers."""
    written = []
    with tarfile.open(fileobj=data, mode="r|") as tar:
        for m in tar:
            rel = keep(m.name)
            if rel is None or not (m.isfile() or m.issym()):
                continue
            target = (dest / rel).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise FailedPreconditionError(f"the node sent a path outside the source: {m.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or (m.issym() and target.exists()):
                target.unlink()
            if m.issym():
                os.symlink(m.linkname, target)
            else:
                src = tar.extractfile(m)
                assert src is not None
                with target.open("wb") as f:
                    while block := src.read(CHUNK):
                        f.write(block)
                os.chmod(target, stat.S_IMODE(m.mode) | 0o600)
                os.utime(target, (m.mtime, m.mtime))
            written.append(rel)
        if headers is not None:
            headers.update(tar.pax_headers)
    return written
