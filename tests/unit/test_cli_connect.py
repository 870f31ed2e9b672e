"""`vendetta workspace connect` asks the workspace's provider what it can do
(terminal, stdin) through the coordinator, instead of knowing providers by name.

Against the in-process cluster: a real coordinator, agents over FakeProviders
(which, by default, have neither terminals nor stdin).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from pathlib import Path

import grpc
import grpc.aio
import pytest

from cli.workspace import STDIN, TERMINAL, check_session
from common.errors import FailedPreconditionError
from providers.base import Capabilities
from tests.support.fakes import Cluster, FakeProvider
from vendetta.v1 import coordinator_pb2 as pb

VENDETTA = Path(sys.executable).with_name("vendetta")


async def running(cluster: Cluster, name: str) -> None:
    await cluster.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name, node="node1"))
    await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name=name))


def test_the_cli_names_flags_the_provider_contract_has() -> None:
    assert {TERMINAL, STDIN} <= {f.name for f in dataclasses.fields(Capabilities)}


async def test_a_provider_without_terminal_or_stdin_is_asked_not_named(cluster: Cluster) -> None:
    await running(cluster, "ws1")
    assert await check_session(cluster.stub, "ws1", terminal=False, piped_input=False) is None
    warning = await check_session(cluster.stub, "ws1", terminal=False, piped_input=True)
    assert warning is not None and "not passed" in warning and "docker" in warning
    with pytest.raises(FailedPreconditionError, match="no interactive terminals"):
        await check_session(cluster.stub, "ws1", terminal=True, piped_input=False)


async def test_a_provider_with_terminal_and_stdin_gets_no_warning(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    await running(cluster, "ws1")
    monkeypatch.setattr(FakeProvider, "capabilities", Capabilities(terminal=True, stdin=True))
    await cluster.stub.TestNode(pb.GetNodeRequest(name="node1"))  # the node reports again
    assert await check_session(cluster.stub, "ws1", terminal=False, piped_input=True) is None
    assert await check_session(cluster.stub, "ws1", terminal=True, piped_input=False) is None


async def test_an_unknown_workspace_is_the_coordinators_error(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check_session(cluster.stub, "nope", terminal=True, piped_input=False)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown workspace" in (info.value.details() or "")


async def connect(cluster: Cluster, *args: str, stdin: bytes | None) -> tuple[int, str, str]:
    """The real CLI in a subprocess (the coordinator serves from this event loop)."""
    proc = await asyncio.create_subprocess_exec(
        str(VENDETTA),
        "workspace",
        "connect",
        *args,
        env={**os.environ, "VENDETTA_HOME": str(cluster.home)},
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_piped_input_the_provider_drops_is_warned_about(cluster: Cluster) -> None:
    await running(cluster, "ws1")
    code, out, err = await connect(cluster, "ws1", "--", "cat", stdin=b"hello\n")
    assert code == 0 and out == "cat\n"  # the fake's exec echoes its argv
    assert err.count("\n") == 1 and err.startswith("warning: input is not passed to commands on")

    # -n: no input is meant for the command; nothing piped: nothing to lose
    code, out, err = await connect(cluster, "ws1", "-n", "--", "cat", stdin=b"hello\n")
    assert (code, out, err) == (0, "cat\n", "")
    code, out, err = await connect(cluster, "ws1", "--", "cat", stdin=None)
    assert (code, out, err) == (0, "cat\n", "")
