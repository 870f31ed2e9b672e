"""The agent's services: one supervisor per workspace, resumed at agent start."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

from common.errors import NotFoundError, VendettaError
from nodeagent.providers import ProviderSet
from nodeagent.services import state
from nodeagent.services.logstore import LogStore
from nodeagent.services.model import ServiceStatus
from nodeagent.services.supervisor import WorkspaceSupervisor
from providers.base import EnvironmentStatus, EnvState, ExecChunk, LogRecord, Provider

log = logging.getLogger("vendetta.services")

STATUS_TTL = 2.0


class ProviderEnv:
    """A provider bound to one workspace: what the supervisor drives."""

    def __init__(self, provider: Provider, workspace: str) -> None:
        self.provider = provider
        self.workspace = workspace
        self.long_exec_streams = provider.capabilities.long_exec_streams
        self._status: tuple[float, asyncio.Future[EnvironmentStatus]] | None = None

    async def _recent_status(self) -> EnvironmentStatus:
        """The environment's status, asked at most every STATUS_TTL seconds, and once
        for all checks that want it meanwhile: health checks of every service tick
        several times a second, and an inspect is an engine call (for LXD, a listing
        of its instances)."""
        now = time.monotonic()
        if self._status is None or (self._status[1].done() and now - self._status[0] > STATUS_TTL):
            self._status = (now, asyncio.ensure_future(self.provider.inspect(self.workspace)))
        asked = self._status[1]
        try:
            return await asyncio.shield(asked)
        except Exception:
            if self._status is not None and self._status[1] is asked:
                self._status = None  # a failed answer is not kept
            raise

    def exec(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> AsyncIterator[ExecChunk]:
        return self.provider.exec(self.workspace, argv, env)

    async def run(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> tuple[int, bytes, bytes]:
        return await self.provider.run(self.workspace, argv, env)

    async def endpoint(self, port: int, published: bool = False) -> tuple[str, int] | None:
        if published:  # new at each start: always asked afresh
            status = await self.provider.inspect(self.workspace)
        else:
            status = await self._recent_status()
        if not published:
            # Health checks: straight to the environment, else from inside; never through
            # a published port: Docker's proxy and LXD's proxy devices accept connections
            # even when nothing listens behind them.
            if status.addresses and ":" not in status.addresses[0]:
                return status.addresses[0], port
            return None
        if port in status.ports:
            host, _, node_port = status.ports[port].rpartition(":")
            return host, int(node_port)
        return None


class ServiceManager:
    """``legacy``: reads the services in state files of agents before the current
    format (see ``nodeagent.services.state``); without it, those are not resumed."""

    def __init__(
        self, root: Path, providers: ProviderSet, legacy: state.LegacyDecoder | None = None
    ) -> None:
        self.root = root
        self.providers = providers
        self.legacy = legacy
        self._sups: dict[str, WorkspaceSupervisor] = {}
        self._created = time.time()

    def _state_file(self, workspace: str) -> Path:
        return self.root / "state" / f"{workspace}.json"

    def logs(self, workspace: str) -> LogStore:
        return (
            LogStore(self.root / "logs" / workspace)
            if workspace not in self._sups
            else (self._sups[workspace].logs)
        )

    def supervisor(self, workspace: str, provider: str) -> WorkspaceSupervisor:
        sup = self._sups.get(workspace)
        if sup is None:
            sup = self._sups[workspace] = WorkspaceSupervisor(
                workspace,
                provider,
                ProviderEnv(self.providers.get(provider), workspace),
                self._state_file(workspace),
                LogStore(self.root / "logs" / workspace),
            )
        return sup

    def existing(self, workspace: str) -> WorkspaceSupervisor | None:
        return self._sups.get(workspace)

    async def resume_all(self) -> None:
        """Find the services an earlier agent run supervised, and supervise them again."""
        folder = self.root / "state"
        await asyncio.to_thread(state.remove_temporaries, folder, self._created)
        for path in sorted(await asyncio.to_thread(lambda: list(folder.glob("*.json")))):
            workspace = path.stem
            try:
                saved = await state.StateFile(path).read(self.legacy)
                env = await self.providers.get(saved.provider).inspect(workspace)
                if env.state != EnvState.RUNNING:
                    await state.StateFile(path).remove()
                    continue
                sup = self.supervisor(workspace, saved.provider)
                sup.services = {s.name: s for s in saved.services}
                await sup.resume()  # saves the state again: in the current format
                log.info("resumed supervising %d services of %s", len(saved.services), workspace)
            except (VendettaError, ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("could not resume the services of %s: %s", workspace, exc)

    async def stop(self, workspace: str, timeout: float) -> list[ServiceStatus]:
        sup = self._sups.get(workspace)
        if sup is None:
            return []
        return await sup.stop(timeout)

    async def forget(self, workspace: str) -> None:
        """The environment is gone: drop supervision, state and logs."""
        sup = self._sups.pop(workspace, None)
        if sup is not None:
            await sup.close()
        await (sup.state_store if sup else state.StateFile(self._state_file(workspace))).remove()
        await asyncio.to_thread(shutil.rmtree, self.root / "logs" / workspace, True)

    async def hook(
        self, workspace: str, provider: str, name: str, command: str
    ) -> AsyncIterator[ExecChunk]:
        """Run a hook with sh -c; its output goes to the caller and into the logs."""
        logs = self.supervisor(workspace, provider).logs.get(f"hook-{name}")
        env = ProviderEnv(self.providers.get(provider), workspace)
        async for chunk in env.exec(["sh", "-c", command]):
            if chunk.stdout:
                await logs.feed("stdout", chunk.stdout)
            if chunk.stderr:
                await logs.feed("stderr", chunk.stderr)
            yield chunk

    async def records(
        self, workspace: str, services: list[str], *, follow: bool, tail: int | None, since: int
    ) -> AsyncIterator[LogRecord]:
        store = self.logs(workspace)
        known = store.known()
        for s in services:
            if s not in known and s not in self._services_of(workspace):
                raise NotFoundError(
                    f"workspace {workspace!r} has no service {s!r} "
                    f"(services: {', '.join(self._services_of(workspace)) or 'none'})"
                )
        async for r in store.stream(services, follow=follow, tail=tail, since_unix_nano=since):
            yield r

    def _services_of(self, workspace: str) -> list[str]:
        sup = self._sups.get(workspace)
        return list(sup.services) if sup else []

    def service_names(self, workspace: str) -> list[str]:
        return sorted(set(self._services_of(workspace)) | set(self.logs(workspace).known()))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._sups.values()), return_exceptions=True)
