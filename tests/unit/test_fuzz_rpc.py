"""Fuzzing: every RPC of the Coordinator and NodeAgent services, with generated messages.

A real coordinator and real agents (over fake providers, tests/support/fakes.py) serve
on their unix sockets; each method is called with messages drawn from its request type
(tests/support/proto_strategies.py), streams with a few messages then the end. Each
call must end in an expected status code with a short, printable message (an
unhandled exception is UNKNOWN, or INTERNAL "... (this is a bug)" through
common/rpc_errors.py), and both servers must answer afterwards.

The methods come from the service descriptors, so a new RPC is fuzzed without a change
here; it must also be listed in DRIVERS, which says what its generated input must be
kept from (the network, the machine's files) before it is let loose.

Budget: VENDETTA_FUZZ_EXAMPLES examples per method (default 10); e.g.
`VENDETTA_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/unit/test_fuzz_rpc.py`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.rpc_errors import wire_message
from coordinator.source_git import is_url
from tests.support.fakes import Cluster, running_cluster, ssh_public_key_line
from tests.support.proto_strategies import ODD_STRINGS, messages, odd_text
from tests.support.rpc_fuzz import World, call_method, check, healthy, key
from vendetta.v1 import common_pb2, coordinator_pb2, nodeagent_pb2
from vendetta.v1 import coordinator_pb2 as pb

EXAMPLES = int(os.environ.get("VENDETTA_FUZZ_EXAMPLES", "10"))
# The 20,000-character strings are meant; hypothesis warns about their repr.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
COORDINATOR = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
AGENT = nodeagent_pb2.DESCRIPTOR.services_by_name["NodeAgent"]
NODES = ("local", "node1", "node2")
# Names that reach past the checks: nodes, the running workspace, the fake's provider.
KNOWN = (*NODES, "ws1", "ws2", "docker", "lxd", "qemu", "setup", "teardown")
TEXT = odd_text(KNOWN)
HOST_KEY = ssh_public_key_line()

# Loopback only, or strings that fail before any lookup (no DNS query leaves the machine).
LOOPBACK = st.sampled_from(["127.0.0.1", "::1", "", "a\x00b", "x" * 20_000, "-oProxyCommand=id"])
# Never a git URL (a clone would reach the network); folders that do not exist, or a
# small one of our own (a folder is copied to the node: never /tmp or the like).
SOURCE_DIR = tempfile.mkdtemp(prefix="vd-fuzz-src-")
Path(SOURCE_DIR, "README").write_text("a workspace's source\n")
atexit.register(shutil.rmtree, SOURCE_DIR, True)
SOURCE = st.one_of(
    st.sampled_from(["", SOURCE_DIR, "/nonexistent-vd-fuzz", "file:///nonexistent-vd-fuzz"]),
    TEXT.filter(lambda s: not is_url(s)),
)
KEY = st.one_of(st.just(HOST_KEY), TEXT)
# Configs that pass validation with odd values inside (they reach the agent), or any YAML.
_SERVICE = st.fixed_dictionaries(
    {"command": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3))},
    optional={
        "port": st.integers(1, 65535),
        "env": st.dictionaries(st.sampled_from(["A", "PATH", "X_1"]), TEXT, max_size=2),
        "restart": st.sampled_from(["no", "on-failure", "always"]),
        "health_check": st.sampled_from(["/health", {"tcp": 80}, {"command": "true"}]),
    },
)
CONFIG = st.one_of(
    st.builds(
        lambda d: yaml.safe_dump(d, allow_unicode=True),
        st.fixed_dictionaries(
            {"name": st.sampled_from(["ws1", "proj", "a" * 63])},
            optional={
                "remote": st.fixed_dictionaries({"node": st.sampled_from(NODES)}),
                "docker": st.fixed_dictionaries(
                    {"image": TEXT}, optional={"command": st.lists(TEXT, max_size=3)}
                ),
                "services": st.dictionaries(st.sampled_from(["web", "db"]), _SERVICE, max_size=2),
                "hooks": st.fixed_dictionaries({}, optional={"setup": TEXT, "teardown": TEXT}),
                "workdir": st.sampled_from(["/", "/workspace", "/a b/ü", "/" + "d" * 300]),
                "user": st.sampled_from(["dev", "1000:1000", "root"]),
            },
        ),
    ),
    TEXT,
)


@dataclass(frozen=True)
class Driver:
    """How to fuzz one method: fields kept in bounds, and a word on why."""

    fields: dict[str, st.SearchStrategy[Any]]
    why: str = ""


def _plain(why: str = "") -> Driver:
    return Driver({}, why)


# Every method, by "Service/Method". A new one fails test_every_method_has_a_driver until
# someone has checked where its input can lead (a host to reach, a file to write).
DRIVERS: dict[str, Driver] = {
    "Coordinator/GetServerInfo": _plain(),
    "Coordinator/ScanHostKey": Driver({"address": LOOPBACK}, "connects to the address"),
    "Coordinator/AddNode": Driver(
        {"host_key": KEY, "identity_file": st.sampled_from(["", "/nonexistent", "/etc"])},
        "fake transports: a node without an agent is unreachable",
    ),
    "Coordinator/ListNodes": _plain(),
    "Coordinator/GetNode": _plain(),
    "Coordinator/TestNode": _plain(),
    "Coordinator/RemoveNode": Driver(
        {"name": odd_text(("local", "node2", "ghost"))}, "node1 keeps the running workspace"
    ),
    "Coordinator/UpgradeNodes": _plain("fake transports reconnect in-process"),
    "Coordinator/TrustNode": Driver({"host_key": KEY}),
    "Coordinator/WatchNodes": _plain("endless: read while it answers"),
    "Coordinator/CreateWorkspace": Driver(
        {"source": SOURCE, "config_yaml": CONFIG}, "a git URL would be cloned"
    ),
    "Coordinator/UpWorkspace": _plain(),
    "Coordinator/RebuildWorkspace": _plain(),
    "Coordinator/DownWorkspace": _plain(),
    "Coordinator/DestroyWorkspace": _plain(),
    "Coordinator/GetWorkspace": _plain(),
    "Coordinator/ListWorkspaces": _plain(),
    "Coordinator/WatchWorkspace": _plain("endless"),
    "Coordinator/StreamLogs": _plain("follow is endless"),
    "Coordinator/ExecWorkspace": _plain("the fake provider echoes argv"),
    "Coordinator/GetConnectionInfo": _plain(),
    "Coordinator/Connect": _plain("the fake provider has no terminal"),
    "Coordinator/Dial": _plain("relayed to the agent's Dial"),
    "Coordinator/DialRoute": _plain("answers a socket path; connects nothing"),
    "Coordinator/Listen": _plain("relayed to the agent's Listen"),
    "Coordinator/ListImages": _plain(),
    "Coordinator/ImportImage": _plain("spooled in the agent's folder"),
    "Coordinator/PushWorkspace": _plain(),
    "Coordinator/PullWorkspace": _plain(),
    "Coordinator/CreateToken": _plain("kept in the coordinator's state"),
    "Coordinator/ListTokens": _plain(),
    "Coordinator/RevokeToken": _plain(),
    "Coordinator/ListOrphans": _plain(),
    "Coordinator/AdoptWorkspace": _plain("takes over an environment no record owns"),
    "Coordinator/CleanNode": _plain("removes only environments no record owns"),
    "Coordinator/RecordWorkspaceEvent": _plain("a line in a workspace's events"),
    "NodeAgent/Info": _plain(),
    "NodeAgent/Heartbeat": _plain(),
    "NodeAgent/Sink": _plain(),
    "NodeAgent/CreateEnvironment": _plain("in the fake provider's memory"),
    "NodeAgent/StartEnvironment": _plain(),
    "NodeAgent/StopEnvironment": _plain(),
    "NodeAgent/DestroyEnvironment": _plain(),
    "NodeAgent/InspectEnvironment": _plain(),
    "NodeAgent/ListEnvironments": _plain(),
    "NodeAgent/Exec": _plain(),
    "NodeAgent/StreamLogs": _plain(),
    "NodeAgent/StartServices": _plain("the fake provider runs nothing"),
    "NodeAgent/StopServices": _plain(),
    "NodeAgent/GetServices": _plain(),
    "NodeAgent/WatchServices": _plain("endless"),
    "NodeAgent/RunHook": _plain(),
    "NodeAgent/Attach": _plain(),
    "NodeAgent/Dial": _plain("through provider.pipe: the fake provider has no stdin"),
    "NodeAgent/Listen": _plain("inside the environment: the fake provider runs nothing"),
    "NodeAgent/ListImages": _plain(),
    "NodeAgent/ImportImage": _plain(),
    "NodeAgent/PutSource": _plain("written under the agent's folder (names checked)"),
    "NodeAgent/GetSource": _plain(),
    "NodeAgent/DeleteSource": _plain(),
}

# What a call may end with: an answer, or one of the errors the error tree maps to.
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _methods(service: ServiceDescriptor) -> list[MethodDescriptor]:
    return list(service.methods)


ALL = [*_methods(COORDINATOR), *_methods(AGENT)]


# ------------------------------------------------------------------------ the servers


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World(running_cluster(NODES))
    try:
        w.run(w.open_agent_channel(w.cluster.agents["node1"].server.socket))
        w.run(_restore(w.cluster))
        yield w
    finally:
        w.close()


async def _restore(cluster: Cluster) -> None:
    """ws1 running on node1 again, whatever the last example did (best effort)."""
    stub = cluster.stub
    with contextlib.suppress(grpc.aio.AioRpcError):
        try:
            ws = await stub.GetWorkspace(pb.GetWorkspaceRequest(name="ws1"), timeout=5)
        except grpc.aio.AioRpcError:
            ws = await stub.CreateWorkspace(
                pb.CreateWorkspaceRequest(name="ws1", node="node1"), timeout=5
            )
        if ws.state != pb.WORKSPACE_STATE_RUNNING:
            await stub.UpWorkspace(pb.WorkspaceRequest(name="ws1"), timeout=5)


# ------------------------------------------------------------------------ one call


def _requests(method: MethodDescriptor) -> st.SearchStrategy[list[Message]]:
    driver = DRIVERS.get(key(method), _plain())
    one = messages(method.input_type, fields=driver.fields, text=TEXT)
    if not method.client_streaming:
        return st.lists(one, min_size=1, max_size=1)
    return st.lists(one, max_size=4)  # none at all: a stream closed at once


# ------------------------------------------------------------------------ the tests


def test_every_method_has_a_driver() -> None:
    missing = [key(m) for m in ALL if key(m) not in DRIVERS]
    assert not missing, f"add these RPCs to DRIVERS (checking where their input leads): {missing}"


def test_odd_strings_are_valid_protobuf_strings() -> None:
    # Protobuf refuses strings that are not UTF-8 (lone surrogates): the fuzzer must not.
    for s in ODD_STRINGS:
        pb.GetNodeRequest(name=s).SerializeToString()


@pytest.mark.parametrize("method", ALL, ids=key)
def test_rpc_survives_generated_messages(world: World, method: MethodDescriptor) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests=_requests(method))
    def fuzz(requests: list[Message]) -> None:
        world.run(_restore(world.cluster))
        world.errors.take()
        outcome = world.run(call_method(world.channel(method), method, requests))
        check(method, requests, outcome, world.errors.take())
        world.run(healthy(world))

    fuzz()


# Streams whose first message must be `start` (Attach, Connect, Dial, Listen, ...).
SESSIONS = [
    m
    for m in ALL
    if m.client_streaming and m.server_streaming and "start" in m.input_type.fields_by_name
]


def _not_started(method: MethodDescriptor) -> list[list[Message]]:
    """Streams that end at once, or open with anything but `start`."""
    cls = GetMessageClass(method.input_type)
    others = [f for f in method.input_type.fields if f.name != "start"]
    streams: list[list[Message]] = [[], [cls()]]
    for f in others:
        msg = cls()
        if f.message_type is not None:
            getattr(msg, f.name).SetInParent()
        elif f.type == f.TYPE_BYTES:
            setattr(msg, f.name, b"x")
        elif f.type == f.TYPE_BOOL:
            setattr(msg, f.name, True)
        else:
            setattr(msg, f.name, 1)
        streams.append([msg, cls()])
    return streams


@pytest.mark.parametrize("method", SESSIONS, ids=key)
def test_session_streams_that_do_not_start_with_start(
    world: World, method: MethodDescriptor
) -> None:
    for requests in _not_started(method):
        world.errors.take()
        outcome = world.run(call_method(world.channel(method), method, requests))
        check(method, requests, outcome, world.errors.take())
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (requests, outcome)


# Found by the fuzzing above; each case once, whatever the generator draws next time.
REGRESSIONS: list[tuple[ServiceDescriptor, str, Message, grpc.StatusCode]] = [
    # The resolver and the socket raised ValueError (INTERNAL "this is a bug").
    (COORDINATOR, "ScanHostKey", pb.ScanHostKeyRequest(address="a\x00b"), INVALID),
    (COORDINATOR, "ScanHostKey", pb.ScanHostKeyRequest(address="x" * 300), INVALID),
    (COORDINATOR, "ScanHostKey", pb.ScanHostKeyRequest(address="127.0.0.1", port=-1), INVALID),
    (COORDINATOR, "ScanHostKey", pb.ScanHostKeyRequest(address="::1", port=70000), INVALID),
    (COORDINATOR, "AddNode", pb.AddNodeRequest(name="n9", address="h", port=2**31 - 1), INVALID),
    # Echoed whole, these went over gRPC's 16 KiB status limit: RESOURCE_EXHAUSTED.
    (COORDINATOR, "GetNode", pb.GetNodeRequest(name="x" * 20_000), INVALID),
    (
        AGENT,
        "InspectEnvironment",
        nodeagent_pb2.EnvironmentRequest(workspace="ws1", provider="x" * 20_000),
        INVALID,
    ),
    # NaN and infinity passed `timeout < 0`; Docker's math.ceil then raised ValueError.
    (
        AGENT,
        "StopEnvironment",
        nodeagent_pb2.StopEnvironmentRequest(
            workspace="ws1", provider="docker", timeout_seconds=float("nan")
        ),
        INVALID,
    ),
    (
        AGENT,
        "StopServices",
        nodeagent_pb2.StopServicesRequest(workspace="ws1", timeout_seconds=float("inf")),
        INVALID,
    ),
    # The services' log files are named after the workspace: OSError "File name too long".
    (
        AGENT,
        "StreamLogs",
        nodeagent_pb2.AgentLogsRequest(workspace="a" * 300, provider="docker"),
        INVALID,
    ),
    (
        AGENT,
        "RunHook",
        nodeagent_pb2.RunHookRequest(workspace="a" * 300, provider="docker", name="setup"),
        INVALID,
    ),
    # Any handler that echoes its input: cut on the wire (common/rpc_errors.wire_message).
    (
        AGENT,
        "Dial",
        common_pb2.DialInput(start=common_pb2.DialStart(workspace="ws1", host="x" * 20_000)),
        INVALID,
    ),
    (
        AGENT,
        "RunHook",
        nodeagent_pb2.RunHookRequest(workspace="ws1", provider="docker", name="x" * 20_000),
        INVALID,
    ),
    (
        AGENT,
        "StartServices",
        nodeagent_pb2.StartServicesRequest(
            workspace="ws1",
            provider="docker",
            services=[common_pb2.ServiceSpec(name="x" * 20_000)],
        ),
        INVALID,
    ),
]


@pytest.mark.parametrize(
    ("service", "name", "request_", "code"),
    REGRESSIONS,
    ids=[f"{r[1]}-{i}" for i, r in enumerate(REGRESSIONS)],
)
def test_regression(
    world: World,
    service: ServiceDescriptor,
    name: str,
    request_: Message,
    code: grpc.StatusCode,
) -> None:
    method = service.methods_by_name[name]
    world.errors.take()
    outcome = world.run(call_method(world.channel(method), method, [request_]))
    check(method, [request_], outcome, world.errors.take())
    assert outcome.code == code, outcome


def test_wire_message_is_short_and_printable() -> None:
    assert wire_message("plain") == "plain"
    assert wire_message("two\nlines\tand a tab") == "two\nlines\tand a tab"
    assert wire_message("a\x1b[31mb\u202ec\x00") == "a\\x1b[31mb\\u202ec\\x00"
    long = wire_message("x" * 20_000)
    assert len(long) < 2100 and long.endswith("(20000 characters)")


def test_an_upload_refused_at_its_start_gets_its_error_not_grpcs(world: World) -> None:
    # The server refuses the first message while the client is still sending the rest:
    # without the server reading the rest first, grpc's client reported INTERNAL "Internal
    # error from Core" (about 1 call in 13 here) instead of the refusal.
    from vendetta.v1 import coordinator_pb2_grpc

    async def upload() -> str:
        stub = coordinator_pb2_grpc.CoordinatorStub(world.channel(COORDINATOR.methods[0]))

        async def requests() -> AsyncIterator[common_pb2.ImageUpload]:
            start = common_pb2.ImageUploadStart(
                node="node1",
                provider="nope",
                name="img",
                files=[common_pb2.ImageFile(name="rootfs.tar", size_bytes=50 * 65536)],
            )
            yield common_pb2.ImageUpload(start=start)
            for _ in range(50):
                yield common_pb2.ImageUpload(chunk=b"x" * 65536)

        try:
            await stub.ImportImage(requests(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return "OK"

    outcomes = [world.run(upload()) for _ in range(40)]
    assert all(o.startswith("INVALID_ARGUMENT: provider 'nope'") for o in outcomes), outcomes
