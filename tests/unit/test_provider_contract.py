"""The provider contract in ``providers.base``: arguments checked once, before any
engine hook runs, and the common errors worded once for every engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from common import errors as e
from providers.base import EnvironmentSpec, EnvState, Provider
from tests.support.fakes import FakeProvider


def _spec(**kw: Any) -> EnvironmentSpec:
    return EnvironmentSpec(**{"workspace": "ws1", "image": "img", **kw})


async def _drain(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


BAD_CALLS: list[tuple[str, Callable[[Provider], Awaitable[Any]]]] = [
    ("bad name on create", lambda p: p.create(_spec(workspace="Bad_Name"))),
    ("no image", lambda p: p.create(_spec(image=""))),
    ("zero cpus", lambda p: p.create(_spec(cpus=0))),
    ("negative memory", lambda p: p.create(_spec(memory_bytes=-1))),
    ("zero disk", lambda p: p.create(_spec(disk_bytes=0))),
    ("empty command", lambda p: p.create(_spec(command=()))),
    ("env name with =", lambda p: p.create(_spec(env={"A=B": "1"}))),
    ("port 0", lambda p: p.create(_spec(ports=(0,)))),
    ("port 65536", lambda p: p.create(_spec(ports=(65536,)))),
    ("bad name on start", lambda p: p.start("../etc")),
    ("bad name on stop", lambda p: p.stop("UPPER")),
    ("negative stop timeout", lambda p: p.stop("ws1", timeout=-1)),
    ("bad name on destroy", lambda p: p.destroy("-x")),
    ("bad name on inspect", lambda p: p.inspect("")),
    ("empty argv", lambda p: _drain(p.exec("ws1", []))),
    ("exec env name empty", lambda p: _drain(p.exec("ws1", ["true"], env={"": "x"}))),
    ("run with empty argv", lambda p: p.run("ws1", [])),
    ("negative tail", lambda p: _drain(p.logs("ws1", follow=False, tail=-1))),
    (
        "negative since",
        lambda p: _drain(p.logs("ws1", follow=False, tail=None, since_unix_nano=-5)),
    ),
    ("terminal without argv", lambda p: p.attach("ws1", [], rows=24, cols=80)),
    ("negative terminal size", lambda p: p.attach("ws1", ["sh"], rows=-1, cols=80)),
    ("pipe without argv", lambda p: p.pipe("ws1", [])),
]


@pytest.mark.parametrize("call", [c for _, c in BAD_CALLS], ids=[n for n, _ in BAD_CALLS])
async def test_bad_arguments_never_reach_the_engine(
    call: Callable[[Provider], Awaitable[Any]],
) -> None:
    provider = FakeProvider()
    await provider.create(_spec())
    await provider.start("ws1")
    provider.calls.clear()
    provider.exec_calls.clear()
    with pytest.raises(e.InvalidArgumentError):
        await call(provider)
    assert provider.calls == [] and provider.exec_calls == []


async def test_create_of_an_existing_workspace_says_what_to_do() -> None:
    provider = FakeProvider()
    await provider.create(_spec())
    with pytest.raises(e.AlreadyExistsError) as dup:
        await provider.create(_spec())
    assert "vendetta workspace destroy ws1" in str(dup.value)
    assert [c for c in provider.calls if c[0] == "create"] == [("create", "ws1")]


async def test_a_stopped_environment_is_not_running_in_every_command() -> None:
    provider = FakeProvider()
    await provider.create(_spec())
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: _drain(provider.exec("ws1", ["true"])),
        lambda: provider.run("ws1", ["true"]),
        lambda: provider.pipe("ws1", ["cat"]),
    ]
    for call in calls:
        with pytest.raises(e.NotRunningError) as stopped:
            await call()
        # The engine's own wording is replaced by the one users act on.
        assert str(stopped.value) == (
            "workspace ws1 is not running: run `vendetta workspace up ws1`"
        )


async def test_terminals_are_refused_where_the_engine_has_none() -> None:
    provider = FakeProvider()
    assert not provider.capabilities.terminal
    await provider.create(_spec())
    await provider.start("ws1")
    with pytest.raises(e.FailedPreconditionError) as refused:
        await provider.attach("ws1", ["sh"], rows=24, cols=80)
    assert "vendetta workspace connect NAME -- CMD" in str(refused.value)


async def test_pipe_without_stdin_runs_the_command_with_no_input() -> None:
    provider = FakeProvider()
    assert not provider.capabilities.stdin
    await provider.create(_spec())
    await provider.start("ws1")
    terminal = await provider.pipe("ws1", ["cat", "-"])
    await terminal.write(b"dropped")
    chunks = [chunk async for chunk in terminal.output()]
    await terminal.close()
    assert b"".join(c.stdout for c in chunks) == b"cat -\n"
    assert chunks[-1].exit_code == 0
    assert provider.exec_calls == [("ws1", ["cat", "-"], {}, "")]


async def test_list_is_sorted_and_inspect_of_nothing_is_absent() -> None:
    provider = FakeProvider()
    for name in ("zeta", "alpha", "mid"):
        await provider.create(_spec(workspace=name))
    assert [s.workspace for s in await provider.list()] == ["alpha", "mid", "zeta"]
    assert (await provider.inspect("nothing")).state is EnvState.ABSENT
