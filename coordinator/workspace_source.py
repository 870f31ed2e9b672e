"""A workspace's source through its life: made at create (a worktree, a clone, or the
folder as it is), live on the local node (the node shares this disk: the folder is
mounted as it is) or shipped to a remote one, pushed and pulled, and removed at destroy
unless that would lose work.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from common.config import ProjectConfig, SourceSection
from common.errors import FailedPreconditionError, VendettaError
from coordinator import source_git, source_pull, source_transfer
from coordinator.agent_client import AgentClient
from coordinator.models import Transfer, WorkspaceRecord, WorkspaceSource
from vendetta.v1 import nodeagent_pb2

log = logging.getLogger("vendetta.sources")

Publish = Callable[[WorkspaceRecord, str, Transfer | None], None]


class WorkspaceSources:
    def __init__(self, home: Path, publish: Publish) -> None:
        self.home = home
        self.publish = publish

    @staticmethod
    def limits(cfg: ProjectConfig | None) -> SourceSection:
        return cfg.source if cfg else SourceSection()

    async def prepare(
        self,
        ws: WorkspaceRecord,
        cfg: ProjectConfig | None,
        live: bool,
        client: AgentClient,
        spec: nodeagent_pb2.EnvironmentSpec,
        source: str,
        branch: str,
        with_changes: bool,
    ) -> None:
        """Make the source and put it where the node mounts it; fills ``spec`` and
        ``ws.source``. On failure nothing of it is left, here or on the node."""
        spec.workdir = cfg.workdir if cfg else "/workspace"
        spec.user = (cfg.user or "") if cfg else ""
        src = await source_git.resolve(self.home, ws.name, source, branch, with_changes)
        if not src.kind:
            return
        src.workdir = spec.workdir
        ws.source = src
        if src.kind == "git":
            what = f"branch {src.branch} in {src.path}"
            self.publish(ws, f"source: {src.origin}, {what}", None)
        try:
            if live:
                src.transport, src.node_path = "live", src.path
                # A worktree's .git points into its repository: that goes in too.
                spec.git_dir = await source_git.git_dir(src)
            else:
                limits = self.limits(cfg)
                self.publish(ws, f"sending the source to node {ws.node}", None)
                path, done = await source_transfer.ship(
                    self.home,
                    ws.name,
                    src,
                    client,
                    limits.max_bytes,
                    limits.max_files,
                    lambda t: self.publish(ws, "", t),
                )
                src.transport, src.node_path = "shipped", path
                src.last_transfer_unix_nano = time.time_ns()
                self.publish(ws, done.summary, done)
        except BaseException:
            await self.discard(ws, client)
            raise
        spec.source_path = src.node_path

    async def discard(self, ws: WorkspaceRecord, client: AgentClient | None) -> None:
        """Undo prepare (a create that failed): the node's copy, the worktree or clone."""
        src = ws.source
        if not src.kind:
            return
        if src.transport == "shipped" and client is not None:
            with contextlib.suppress(Exception):
                await client.delete_source(ws.name)
        with contextlib.suppress(Exception):
            await source_git.remove(src)
        source_transfer.forget(self.home, ws.name)

    async def check_destroy(self, ws: WorkspaceRecord, client: AgentClient | None) -> None:
        """Refuse to destroy a workspace whose work exists nowhere else."""
        src = ws.source
        shipped = src.transport == "shipped" and client is not None
        if src.kind != "git":
            if shipped and client is not None:
                await self._check_node_files(ws, client)
            return
        how = (
            f"keep it with `vendetta workspace pull {ws.name}`, or drop it with "
            f"`vendetta workspace destroy {ws.name} --force`"
        )
        if shipped and client is not None:
            try:
                n = await source_pull.unpulled(self.home, ws.name, src, client)
            except VendettaError as exc:
                raise FailedPreconditionError(
                    f"cannot tell whether workspace {ws.name!r} holds commits not pulled yet "
                    f"({exc}); {how}"
                ) from exc
            if n:
                raise FailedPreconditionError(
                    f"workspace {ws.name!r} holds {n} commit(s) on branch {src.branch} that "
                    f"are not pulled: {how}"
                )
            await self._check_node_files(ws, client)  # uncommitted there
        lost = await source_git.unkept(src)
        if lost:
            raise FailedPreconditionError(
                f"workspace {ws.name!r}: {lost}; or drop it with "
                f"`vendetta workspace destroy {ws.name} --force`"
            )

    async def _check_node_files(self, ws: WorkspaceRecord, client: AgentClient) -> None:
        src = ws.source
        try:
            changed = await source_pull.node_changes(self.home, ws.name, src, client)
        except VendettaError as exc:
            raise FailedPreconditionError(
                f"cannot tell whether workspace {ws.name!r} holds changes not pulled yet "
                f"({exc}); drop them with `vendetta workspace destroy {ws.name} --force`"
            ) from exc
        if not changed:
            return
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        keep = (
            f"commit them there and `vendetta workspace pull {ws.name}`"
            if src.kind == "git"
            else f"`vendetta workspace pull {ws.name}` brings them here"
        )
        raise FailedPreconditionError(
            f"workspace {ws.name!r} holds {len(changed)} changed file(s) that are nowhere "
            f"else ({shown}): {keep}, or drop them with "
            f"`vendetta workspace destroy {ws.name} --force`"
        )

    async def remove(self, ws: WorkspaceRecord, client: AgentClient | None) -> str:
        """Remove the node's copy and the worktree or clone; what is kept ("" if none)."""
        src = ws.source
        if not src.kind:
            return ""
        if src.transport == "shipped" and client is not None:
            try:
                await client.delete_source(ws.name)
            except VendettaError as exc:
                log.warning("workspace %s: the node's copy of its source stays: %s", ws.name, exc)
        kept = ""
        try:
            kept = await source_git.remove(src)
        except VendettaError as exc:
            log.warning("workspace %s: its worktree %s stays: %s", ws.name, src.path, exc)
        source_transfer.forget(self.home, ws.name)
        ws.source = WorkspaceSource()  # removed: a second call has nothing to do
        return kept

    def _shipped(self, ws: WorkspaceRecord, verb: str) -> WorkspaceSource:
        src = ws.source
        if not src.kind:
            raise FailedPreconditionError(
                f"workspace {ws.name!r} has no source to {verb}: it was created without one"
            )
        if src.mode == "copied":
            workdir = src.workdir or "/workspace"
            raise FailedPreconditionError(
                f"workspace {ws.name!r} runs on {ws.provider}, which copied the source in at "
                f"its first start (`copied` in its status): a {verb} cannot reach what is "
                f"inside; copy files out with `vendetta workspace connect {ws.name} -- tar -C "
                f"{workdir} -c . | tar -x`"
            )
        if src.transport != "shipped":
            raise FailedPreconditionError(
                f"workspace {ws.name!r} needs no {verb}: its source {src.path} is mounted as it "
                "is (the node shares this machine's disk), so changes are seen on both sides"
            )
        return src

    async def push(
        self,
        ws: WorkspaceRecord,
        cfg: ProjectConfig | None,
        client: AgentClient,
        progress: Callable[[Transfer], None],
    ) -> Transfer:
        src = self._shipped(ws, "push")
        limits = self.limits(cfg)
        t = await source_transfer.push(
            self.home, ws.name, src, client, limits.max_bytes, limits.max_files, progress
        )
        src.last_transfer_unix_nano = time.time_ns()
        return t

    async def pull(
        self,
        ws: WorkspaceRecord,
        client: AgentClient,
        force: bool,
        progress: Callable[[Transfer], None],
    ) -> Transfer:
        src = self._shipped(ws, "pull")
        started = time.time_ns()
        t = await source_pull.pull(self.home, ws.name, src, client, force, progress)
        src.last_transfer_unix_nano = started
        return t
