"""Fuzzing the agent over the real Docker engine: every method that reaches a provider,
with generated messages about a running container of our own.

The unit fuzz (tests/unit/test_fuzz_rpc.py) runs over fake providers, which accept what
an engine refuses: a NaN stop timeout passed the fake and crashed Docker's provider.
Same rules and budget (VENDETTA_FUZZ_EXAMPLES, default 10 here too).

Kept on this machine: images are the test image only (another name would be pulled),
nothing of the host is mounted (source_path, git_dir), no port is published, Dial
connects to 127.0.0.1 inside the container.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.providers import ProviderSet
from nodeagent.server import AgentServer
from providers.base import EnvironmentSpec, EnvState
from providers.docker import DockerProvider
from tests.conftest import TEST_IMAGE
from tests.support.fakes import short_tmp_dir
from tests.support.proto_strategies import messages, odd_text
from tests.support.rpc_fuzz import World, call_method, check, healthy, key
from vendetta.v1 import nodeagent_pb2

EXAMPLES = int(os.environ.get("VENDETTA_FUZZ_EXAMPLES", "10"))
pytestmark = [
    pytest.mark.docker,
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]
AGENT = nodeagent_pb2.DESCRIPTOR.services_by_name["NodeAgent"]
WS = f"fz-{uuid.uuid4().hex[:10]}"  # running, for the whole module
OTHER = f"fz-{uuid.uuid4().hex[:10]}"  # made and removed by the examples
TEXT = odd_text((WS, OTHER, "docker", "setup", "teardown"))
FIELDS = {
    "image": st.just(TEST_IMAGE),
    "source_path": st.just(""),
    "git_dir": st.just(""),
    "ports": st.nothing(),  # each element: none, so the list stays empty
    "host": st.just("127.0.0.1"),
}
# The methods that reach the engine; the others have nothing of it to find.
METHODS = [
    m
    for m in AGENT.methods
    if m.name
    not in {"Info", "Heartbeat", "Sink", "PutSource", "GetSource", "DeleteSource", "ImportImage"}
]


@contextlib.asynccontextmanager
async def _serve() -> AsyncIterator[AgentServer]:
    root = short_tmp_dir()
    provider = DockerProvider(agent_id=uuid.uuid4().hex)
    server = AgentServer(root / "agent", providers=ProviderSet({"docker": provider}))
    await server.start()
    try:
        await provider.create(EnvironmentSpec(workspace=WS, image=TEST_IMAGE))
        await provider.start(WS)
        yield server
    finally:
        for status in await provider.list():
            with contextlib.suppress(Exception):
                await provider.destroy(status.workspace)
        await server.stop(grace=0.5)
        await provider.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def world(docker_engine: None) -> Iterator[World]:
    w = World(_serve())
    try:
        w.run(w.open_agent_channel(w.target.socket))
        yield w
    finally:
        w.close()


async def _running(world: World) -> None:
    """Our container running again, whatever the last example did (best effort)."""
    provider = world.target.providers.get("docker")
    with contextlib.suppress(Exception):
        if (await provider.inspect(WS)).state == EnvState.ABSENT:
            await provider.create(EnvironmentSpec(workspace=WS, image=TEST_IMAGE))
        await provider.start(WS)


def _requests(method: MethodDescriptor) -> st.SearchStrategy[list[Message]]:
    one = messages(method.input_type, fields=FIELDS, text=TEXT)
    if not method.client_streaming:
        return st.lists(one, min_size=1, max_size=1)
    return st.lists(one, max_size=3)


@pytest.mark.parametrize("method", METHODS, ids=key)
def test_agent_method_survives_generated_messages(world: World, method: MethodDescriptor) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests=_requests(method))
    def fuzz(requests: list[Message]) -> None:
        world.run(_running(world))
        world.errors.take()
        outcome = world.run(call_method(world.channel(method), method, requests))
        check(method, requests, outcome, world.errors.take())
        world.run(healthy(world))

    fuzz()
