"""LogBatch's compact form (issue 16): the same lines as LogLine messages, as blocks.

Through the real coordinator and agent servicers (fake provider): a compact request
brings blocks whose lines, times and streams are exactly what a plain request brings
as LogLine messages; a plain request (every older client) still gets only LogLines.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc.aio

from cli.log_text import log_text
from nodeagent import convert
from providers.base import EnvState, LogRecord
from tests.support.fakes import Cluster
from vendetta.v1 import common_pb2
from vendetta.v1 import coordinator_pb2 as pb

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


async def _started(cluster: Cluster) -> Any:
    fake = cluster.provider("node1")
    await cluster.stub.CreateWorkspace(
        pb.CreateWorkspaceRequest(name="ws1", node="node1", config_yaml="name: ws1\n")
    )
    await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name="ws1"))
    return fake


def _flat(batches: list[common_pb2.LogBatch]) -> list[tuple[int, str, str, str]]:
    """(time, stream, service, text) of every line, whichever form it came in."""
    lines: list[tuple[int, str, str, str]] = []
    for b in batches:
        assert not (b.lines and b.text), "a batch holds lines or a block, never both"
        lines += [(ln.time_unix_nano, ln.stream, ln.service, ln.text) for ln in b.lines]
        if b.text:
            texts = b.text.decode().split("\n")
            assert texts.pop() == "", "a block's last line ends in a newline"
            assert len(texts) == len(b.times_unix_nano)
            lines += [
                (t, b.stream, b.service, x) for t, x in zip(b.times_unix_nano, texts, strict=True)
            ]
    return lines


async def test_compact_logs_carry_the_same_lines_as_blocks(cluster: Cluster) -> None:
    fake = await _started(cluster)
    streams = ["stdout", "stdout", "stderr", "stdout", "stdout", "stderr"]
    for i, stream in enumerate(streams):
        fake.add_log("ws1", f"line {i} \u00e9 \r x", stream=stream)

    async def read(**kw: Any) -> list[common_pb2.LogBatch]:
        return [b async for b in cluster.stub.StreamLogs(pb.StreamLogsRequest(name="ws1", **kw))]

    plain, compact = await read(), await read(compact=True)
    assert all(b.lines and not b.text for b in plain)
    assert all(b.text and not b.lines for b in compact)
    assert _flat(compact) == _flat(plain)
    assert [x[1] for x in _flat(compact)] == streams
    # One block per run of a stream: stdout x2, stderr, stdout x2, stderr.
    assert len(compact) == 4
    tail = await read(compact=True, tail=2)
    assert [x[3] for x in _flat(tail)] == ["line 4 \u00e9 \r x", "line 5 \u00e9 \r x"]


async def test_compact_follow_ends_when_the_environment_stops(cluster: Cluster) -> None:
    fake = await _started(cluster)
    fake.add_log("ws1", "first")
    call = cluster.stub.StreamLogs(pb.StreamLogsRequest(name="ws1", follow=True, compact=True))
    first: Any = await asyncio.wait_for(call.read(), 5)
    assert first.text == b"first\n" and first.stream == "stdout"
    fake.add_log("ws1", "second", stream="stderr")
    second: Any = await asyncio.wait_for(call.read(), 5)
    assert (second.text, second.stream) == (b"second\n", "stderr")
    fake.set_state("ws1", EnvState.STOPPED)
    assert await asyncio.wait_for(call.read(), 5) is EOF


def test_a_record_holding_a_newline_goes_as_lines() -> None:
    recs = [
        LogRecord(1, "stdout", "a"),
        LogRecord(2, "stdout", "b\nc"),
        LogRecord(3, "stderr", "d"),
    ]
    batches = list(convert.log_blocks(recs))
    assert [ln.text for ln in batches[0].lines] == ["a", "b\nc"]
    assert (batches[1].text, list(batches[1].times_unix_nano)) == (b"d\n", [3])


def test_the_cli_prints_either_form_the_same() -> None:
    lines = common_pb2.LogBatch(
        lines=[
            common_pb2.LogLine(text="main"),
            common_pb2.LogLine(text="up", service="web"),
        ]
    )
    assert log_text(lines, prefix=True) == b"main\nweb | up\n"
    assert log_text(lines, prefix=False) == b"main\nup\n"
    block = common_pb2.LogBatch(text=b"a\n\xffb\r\n", times_unix_nano=[1, 2], stream="stdout")
    assert log_text(block, prefix=True) == b"a\n\xffb\r\n"
    web = common_pb2.LogBatch(text=b"a\n\rb\n", times_unix_nano=[1, 2], service="web")
    assert log_text(web, prefix=True) == b"web | a\nweb | \rb\n"
    assert log_text(web, prefix=False) == b"a\n\rb\n"
    assert log_text(common_pb2.LogBatch(), prefix=True) == b""
