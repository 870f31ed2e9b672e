"""NodeAgent gRPC servicer: thin; converts at the edge and calls the providers."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import grpc.aio

from common.batching import batched
from common.errors import FailedPreconditionError, InvalidArgumentError
from common.names import validate_name
from common.version import build_id
from nodeagent import convert, dial, images, listen
from nodeagent.providers import ProviderSet
from nodeagent.services.manager import ServiceManager
from nodeagent.services.model import ServiceEvent
from nodeagent.sources import SourceStore
from providers.base import EnvState, ExecChunk, LogRecord, Provider
from vendetta.v1 import common_pb2, nodeagent_pb2, nodeagent_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class NodeAgentServicer(nodeagent_pb2_grpc.NodeAgentServicer):
    def __init__(
        self,
        agent_id: str,
        providers: ProviderSet,
        socket_path: str,
        services: ServiceManager,
        spool_dir: Path | None = None,
        sources_dir: Path | None = None,
    ) -> None:
        # Where uploaded images wait for their provider (the agent's folder).
        self.spool_dir = spool_dir or Path(tempfile.gettempdir()) / "vendetta-imports"
        # Workspaces' sources: next to the spool, in the agent's folder (<agent dir>/sources).
        self.sources = SourceStore(sources_dir or self.spool_dir.parent / "sources", providers.all)
        self.agent_id = agent_id
        self.providers = providers
        self.socket_path = socket_path
        self.services = services
        # Set when the agent stops: the watches end then (see _until_stopping).
        self.stopping = asyncio.Event()

    async def Info(
        self, request: nodeagent_pb2.InfoRequest, context: Ctx
    ) -> nodeagent_pb2.InfoResponse:
        infos = [
            convert.provider_info_to_pb(p.name, p.capabilities, r)
            for p, r in await self.providers.readiness()
        ]
        return nodeagent_pb2.InfoResponse(
            version=build_id(),
            agent_id=self.agent_id,
            hostname=socket.gethostname(),
            providers=infos,
            capacity=nodeagent_pb2.Capacity(cpus=os.cpu_count() or 0, memory_bytes=_total_memory()),
            socket_path=self.socket_path,
        )

    async def Heartbeat(
        self, request: nodeagent_pb2.HeartbeatRequest, context: Ctx
    ) -> nodeagent_pb2.HeartbeatResponse:
        return nodeagent_pb2.HeartbeatResponse(
            time_unix_nano=time.time_ns(), agent_id=self.agent_id
        )

    async def Sink(
        self, request_iterator: AsyncIterator[nodeagent_pb2.SinkChunk], context: Ctx
    ) -> nodeagent_pb2.SinkResponse:
        received = 0
        async for chunk in request_iterator:
            received += len(chunk.data)
        return nodeagent_pb2.SinkResponse(bytes=received)

    async def CreateEnvironment(
        self, request: nodeagent_pb2.CreateEnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.Environment:
        spec = convert.spec_from_pb(request.spec)
        validate_name("workspace", spec.workspace)
        if not spec.image:
            raise InvalidArgumentError("no image given for the environment")
        provider = self.providers.get(request.spec.provider)
        return convert.status_to_pb(await provider.create(spec))

    async def StartEnvironment(
        self, request: nodeagent_pb2.EnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.Environment:
        provider = self.providers.get(request.provider)
        return convert.status_to_pb(await provider.start(request.workspace))

    async def StopEnvironment(
        self, request: nodeagent_pb2.StopEnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.Environment:
        provider = self.providers.get(request.provider)
        timeout = _stop_timeout(request.timeout_seconds)
        await self.services.stop(request.workspace, timeout)
        return convert.status_to_pb(await provider.stop(request.workspace, timeout))

    async def DestroyEnvironment(
        self, request: nodeagent_pb2.EnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.DestroyEnvironmentResponse:
        await self.providers.get(request.provider).destroy(request.workspace)
        await self.services.forget(request.workspace)
        return nodeagent_pb2.DestroyEnvironmentResponse()

    async def InspectEnvironment(
        self, request: nodeagent_pb2.EnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.Environment:
        provider = self.providers.get(request.provider)
        return convert.status_to_pb(await provider.inspect(request.workspace))

    async def ListEnvironments(
        self, request: nodeagent_pb2.ListEnvironmentsRequest, context: Ctx
    ) -> nodeagent_pb2.ListEnvironmentsResponse:
        # Providers side by side: as long as the slowest engine takes, not their sum
        # (`node status` under load waited for every readiness check, then each list).
        async def listed(provider: Provider) -> list[nodeagent_pb2.Environment]:
            if not (await provider.readiness()).ready:
                return []
            return [convert.status_to_pb(s) for s in await provider.list()]

        found = await asyncio.gather(*(listed(p) for p in self.providers.all()))
        return nodeagent_pb2.ListEnvironmentsResponse(environments=[e for f in found for e in f])

    async def Exec(
        self, request: nodeagent_pb2.ExecRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        if not request.argv:
            raise InvalidArgumentError("no command given to run")
        provider = self.providers.get(request.provider)
        async for chunk in provider.exec(
            request.workspace, list(request.argv), dict(request.env), request.workdir
        ):
            for out in _exec_outputs(chunk):
                yield out

    async def StreamLogs(
        self, request: nodeagent_pb2.AgentLogsRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.LogBatch]:
        # The name first: the services' logs are files named after it (a 300-character
        # one raised OSError "File name too long"; found by fuzzing).
        validate_name("workspace", request.workspace)
        provider = self.providers.get(request.provider)
        tail = request.tail or None
        ws = request.workspace
        sources: list[AsyncIterator[LogRecord]] = []
        if request.service:
            sources.append(
                self.services.records(
                    ws,
                    [request.service],
                    follow=request.follow,
                    tail=tail,
                    since=request.since_unix_nano,
                )
            )
        else:
            names = self.services.service_names(ws)
            if not names:  # the environment's own output alone: the provider's batches as they come
                chunks = provider.log_batches(
                    ws, follow=request.follow, tail=tail, since_unix_nano=request.since_unix_nano
                )
                # Batches that queued up while a message was being sent go out as one.
                async for group in batched(chunks, max_items=64, size=_chunk_size):
                    if request.compact:
                        for block in convert.log_blocks(itertools.chain.from_iterable(group)):
                            yield block
                    else:
                        yield common_pb2.LogBatch(
                            lines=[convert.log_to_pb(r) for chunk in group for r in chunk]
                        )
                return
            sources.append(
                provider.logs(
                    ws, follow=request.follow, tail=tail, since_unix_nano=request.since_unix_nano
                )
            )
            if names:
                sources.append(
                    self.services.records(
                        ws,
                        names,
                        follow=request.follow,
                        tail=tail,
                        since=request.since_unix_nano,
                    )
                )
        records = sources[0] if len(sources) == 1 else merge(sources, tail, request.follow)
        async for batch in batched(records, size=_record_size):
            yield common_pb2.LogBatch(lines=[convert.log_to_pb(r) for r in batch])

    async def StartServices(
        self, request: nodeagent_pb2.StartServicesRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.ServiceEvent]:
        for s in request.services:  # the names first: the conversion's errors echo them
            validate_name("service", s.name)
        specs = [convert.service_from_pb(s) for s in request.services]
        env = await self.providers.get(request.provider).inspect(request.workspace)
        if env.state != EnvState.RUNNING:
            raise FailedPreconditionError(
                f"workspace {request.workspace!r} is not running: start its environment first"
            )
        sup = self.services.supervisor(request.workspace, request.provider)
        async for ev in sup.start(specs):
            yield convert.service_event_to_pb(ev)

    async def StopServices(
        self, request: nodeagent_pb2.StopServicesRequest, context: Ctx
    ) -> nodeagent_pb2.ServicesStatus:
        sup = self.services.existing(request.workspace)
        timeout = _stop_timeout(request.timeout_seconds)
        statuses = await sup.stop(timeout) if sup else []
        return nodeagent_pb2.ServicesStatus(
            workspace=request.workspace,
            services=[convert.service_status_to_pb(s) for s in statuses],
        )

    async def GetServices(
        self, request: nodeagent_pb2.EnvironmentRequest, context: Ctx
    ) -> nodeagent_pb2.ServicesStatus:
        sup = self.services.existing(request.workspace)
        statuses = sup.statuses() if sup else []
        return nodeagent_pb2.ServicesStatus(
            workspace=request.workspace,
            services=[convert.service_status_to_pb(s) for s in statuses],
        )

    async def WatchServices(
        self, request: nodeagent_pb2.EnvironmentRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.ServiceEvent]:
        validate_name("workspace", request.workspace)  # a supervisor's files bear it
        sup = self.services.supervisor(request.workspace, request.provider)
        with sup.events.subscribe() as events:
            # The state now first (no message: nothing happened), once subscribed, so a
            # watcher that started while this agent resumes its services misses nothing.
            now = time.time_ns()
            for status in sup.statuses():
                yield convert.service_event_to_pb(ServiceEvent(request.workspace, status, "", now))
            while (ev := await self._until_stopping(events.get())) is not None:
                yield convert.service_event_to_pb(ev)

    async def _until_stopping(self, next_event: Awaitable[ServiceEvent]) -> ServiceEvent | None:
        """``next_event``'s result, or None once the agent stops: a watch never ends by
        itself, and the server's stop waited its whole grace (5 s) for it."""
        got = asyncio.ensure_future(next_event)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({got, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            got.cancel()  # a no-op once it is done
        return got.result() if got.done() and not got.cancelled() else None

    async def Attach(
        self, request_iterator: AsyncIterator[common_pb2.AttachInput], context: Ctx
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("input") != "start":
            raise InvalidArgumentError("an attach stream starts with a `start` message")
        start = first.start
        provider = self.providers.get(start.provider)
        argv = list(start.argv) or LOGIN_SHELL
        if start.tty:
            size = start.size
            terminal = await provider.attach(
                start.workspace,
                argv,
                rows=size.rows or 24,
                cols=size.cols or 80,
                env=dict(start.env),
            )
        else:  # plain pipes: stdin in, stdout and stderr apart, the exit code
            terminal = await provider.pipe(start.workspace, argv, dict(start.env))

        async def pump_input() -> None:
            # To the client's end: the session waits for it (see below), whatever became
            # of the command (writes to one that has gone are dropped by the provider).
            async for msg in request_iterator:
                kind = msg.WhichOneof("input")
                if kind == "stdin":
                    await terminal.write(msg.stdin)
                elif kind == "stdin_eof":
                    await terminal.close_stdin()
                elif kind == "resize":
                    await terminal.resize(msg.resize.rows, msg.resize.cols)
            await terminal.close_stdin()  # the client sends no more: end-of-file

        inputs = asyncio.create_task(pump_input())
        try:
            # An empty message first: the session is open, the client may send input.
            # (Input sent while a stream is failing at its start got gRPC to report
            # "Internal error from Core" instead of the error.)
            yield common_pb2.ExecOutput()
            async for chunk in terminal.output():
                for out in _exec_outputs(chunk):
                    yield out
            # The client ends its input once it has the exit code. Ending the call
            # first, with input still on its way, got gRPC to report "Internal error
            # from Core" instead of OK.
            await asyncio.wait({inputs}, timeout=HALF_CLOSE_WAIT)
        finally:
            inputs.cancel()
            await asyncio.gather(inputs, return_exceptions=True)
            await terminal.close()

    async def Dial(
        self, request_iterator: AsyncIterator[common_pb2.DialInput], context: Ctx
    ) -> AsyncIterator[common_pb2.DialOutput]:
        async for out in dial.dial(self.providers, request_iterator):
            yield out

    async def Listen(
        self, request_iterator: AsyncIterator[common_pb2.ListenInput], context: Ctx
    ) -> AsyncIterator[common_pb2.ListenOutput]:
        async for out in listen.listen(self.providers, request_iterator):
            yield out

    async def ListImages(
        self, request: nodeagent_pb2.AgentListImagesRequest, context: Ctx
    ) -> common_pb2.ListImagesResponse:
        return common_pb2.ListImagesResponse(
            images=await images.list_images(self.providers, request.provider)
        )

    async def ImportImage(
        self, request_iterator: AsyncIterator[common_pb2.ImageUpload], context: Ctx
    ) -> common_pb2.ImportImageResponse:
        imported = await images.receive(request_iterator, self.providers, self.spool_dir)
        return common_pb2.ImportImageResponse(images=imported)

    # A workspace's source in the node user's folder (nodeagent/sources.py).
    async def PutSource(
        self, request_iterator: AsyncIterator[nodeagent_pb2.SourceUpload], context: Ctx
    ) -> nodeagent_pb2.SourceReceipt:
        return await self.sources.put(request_iterator)

    async def GetSource(
        self, request: nodeagent_pb2.GetSourceRequest, context: Ctx
    ) -> AsyncIterator[nodeagent_pb2.SourceChunk]:
        async for chunk in self.sources.get(request.workspace, request.since_unix_nano):
            yield chunk

    async def DeleteSource(
        self, request: nodeagent_pb2.DeleteSourceRequest, context: Ctx
    ) -> nodeagent_pb2.DeleteSourceResponse:
        await self.sources.delete(request.workspace)
        return nodeagent_pb2.DeleteSourceResponse()

    async def RunHook(
        self, request: nodeagent_pb2.RunHookRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        if request.name not in ("setup", "teardown"):
            raise InvalidArgumentError(f"unknown hook {request.name[:40]!r} (setup or teardown)")
        validate_name("workspace", request.workspace)  # its log is a file named after it
        async for chunk in self.services.hook(
            request.workspace, request.provider, request.name, request.command
        ):
            for out in _exec_outputs(chunk):
                yield out


def _stop_timeout(seconds: float) -> float:
    """A stop's grace period (0: the default). NaN and infinity passed the providers'
    `timeout < 0` check, then Docker's math.ceil raised ValueError (found by fuzzing)."""
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgumentError(f"a stop timeout is 0 or more seconds, not {seconds}")
    return seconds or 10.0


# How long a session that has ended waits for its client to end its input.
HALF_CLOSE_WAIT = 5.0

# A login shell: bash where the image has it, else sh.
LOGIN_SHELL = ["/bin/sh", "-c", "command -v bash >/dev/null 2>&1 && exec bash -l || exec sh -l"]


def _exec_outputs(chunk: ExecChunk) -> Iterator[common_pb2.ExecOutput]:
    """The messages for one chunk: its output (each stream), then its exit code."""
    if chunk.stdout:
        yield common_pb2.ExecOutput(stdout=chunk.stdout)
    if chunk.stderr:
        yield common_pb2.ExecOutput(stderr=chunk.stderr)
    if chunk.exit_code is not None:
        yield common_pb2.ExecOutput(exit_code=chunk.exit_code)


async def merge(
    sources: list[AsyncIterator[LogRecord]], tail: int | None, follow: bool
) -> AsyncIterator[LogRecord]:
    """Several log sources as one: history sorted by time (tail across all), then live."""
    if not follow:
        history = sorted([r for s in sources async for r in s], key=lambda r: r.time_unix_nano)
        for r in history[-tail:] if tail else history:
            yield r
        return
    queue: asyncio.Queue[LogRecord | None] = asyncio.Queue(maxsize=10000)

    async def pump(source: AsyncIterator[LogRecord]) -> None:
        try:
            async for r in source:
                await queue.put(r)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in sources]
    try:
        ended = 0
        while ended < len(tasks):
            item = await queue.get()
            if item is None:
                ended += 1
                if tasks[0].done():
                    # The environment's own output ended: it stopped, and so did its services.
                    return
                continue
            yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _record_size(rec: LogRecord) -> int:
    return len(rec.text) + 32


def _chunk_size(chunk: list[LogRecord]) -> int:
    return sum(len(r.text) for r in chunk) + 32 * len(chunk)
