"""A workspace's source at its workdir, on every provider, through the agent's real wire.

The folder on the node belongs to a user who is not root (the test node user,
when scripts/test-users.sh made it): inside, its files must belong to the user
who works there. Docker and LXD mount the folder (edits are seen both ways at
once); QEMU copies it in at the first start and says so. One environment per
provider (a QEMU boot is slow under TCG).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tests.integration.test_provider_conformance import CASES, Agent, running_agent
from tests.support.node_user import MEMBER, users_problem
from tests.unit.test_node_sources import file, get, make_tar, put
from vendetta.v1 import common_pb2, nodeagent_pb2

MOUNTED = {"docker": "mounted", "lxd": "mounted", "qemu": "copied"}


@pytest.fixture(params=[pytest.param(c, marks=c.marks, id=c.name) for c in CASES])
async def agent(request: pytest.FixtureRequest) -> AsyncIterator[Agent]:
    async with running_agent(request.param) as a:
        yield a


@pytest.fixture
def source() -> Iterator[Path]:
    """A project folder on the node, owned by the test node user where there is one."""
    folder = Path(tempfile.mkdtemp(prefix="vd-src-", dir="/tmp"))
    (folder / "sub").mkdir()
    (folder / "hello.txt").write_text("hello from the node\n")
    (folder / "sub" / "deep.txt").write_text("deep\n")
    os.chmod(folder, 0o755)
    if not users_problem():
        user = pwd.getpwnam(MEMBER)
        for path in (folder, folder / "sub", folder / "hello.txt", folder / "sub" / "deep.txt"):
            os.chown(path, user.pw_uid, user.pw_gid)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def attach(agent: Agent, ws: str, argv: list[str], *, tty: bool) -> tuple[bytes, int]:
    """Run argv through Attach (a terminal, or pipes): its output and exit code."""
    start = common_pb2.AttachStart(
        workspace=ws,
        provider=agent.provider,
        argv=argv,
        tty=tty,
        size=common_pb2.TerminalSize(rows=24, cols=80),
    )
    done = asyncio.Event()

    async def inputs() -> AsyncIterator[common_pb2.AttachInput]:
        yield common_pb2.AttachInput(start=start)
        if not tty:
            yield common_pb2.AttachInput(stdin_eof=True)
        await done.wait()

    out, code = b"", -1
    async for o in agent.stub.Attach(inputs(), timeout=120):
        kind = o.WhichOneof("output")
        if kind == "stdout":
            out += o.stdout
        elif kind == "exit_code":
            code = o.exit_code
            done.set()
    return out, code


async def test_the_source_is_at_the_workdir_owned_by_the_user_inside(
    agent: Agent, source: Path
) -> None:
    ws = agent.ws()
    owner = source.stat()
    # No user given: Docker (which maps no ids) has the folder's owner work there in
    # place of the image's root; LXD maps the owner to the image's user (root).
    env = await agent.stub.CreateEnvironment(agent.spec(ws, source_path=str(source)))
    assert (env.workdir, env.source_mode) == ("/workspace", MOUNTED[agent.provider])
    await agent.stub.StartEnvironment(agent.ref(ws))
    inspected = await agent.stub.InspectEnvironment(agent.ref(ws))
    assert (inspected.workdir, inspected.source_mode) == ("/workspace", MOUNTED[agent.provider])

    # Commands start in the workdir: exec, a terminal, pipes.
    assert await agent.exec(ws, "pwd") == (b"/workspace\n", b"", 0)
    # (A moment before exiting: LXD may drop a terminal's last output otherwise.)
    out, code = await attach(agent, ws, ["sh", "-c", "pwd; sleep 0.5"], tty=True)
    assert code == 0 and b"/workspace" in out, out
    out, code = await attach(agent, ws, ["pwd"], tty=False)
    assert (out, code) == (b"/workspace\n", 0)
    # An exec's own workdir still wins.
    assert await agent.exec(ws, "pwd", workdir="/") == (b"/\n", b"", 0)
    # Hooks and services too.
    hook = nodeagent_pb2.RunHookRequest(
        workspace=ws, provider=agent.provider, name="setup", command="pwd"
    )
    assert [o.stdout async for o in agent.stub.RunHook(hook) if o.stdout] == [b"/workspace\n"]
    service = common_pb2.ServiceSpec(
        name="where", command=["sh", "-c", "pwd > /tmp/service-cwd; exec sleep 1000"]
    )
    async for _ in agent.stub.StartServices(
        nodeagent_pb2.StartServicesRequest(
            workspace=ws, provider=agent.provider, services=[service]
        )
    ):
        pass
    for _ in range(100):
        out, _, code = await agent.exec(ws, "cat", "/tmp/service-cwd")
        if code == 0 and out:
            break
        await asyncio.sleep(0.1)
    assert out == b"/workspace\n"

    out, err, code = await agent.exec(ws, "cat", "hello.txt", "sub/deep.txt")
    assert (out, code) == (b"hello from the node\ndeep\n", 0), err
    # The files belong to whoever works inside (not nobody, not a shifted uid).
    me, _, _ = await agent.exec(ws, "id", "-u")
    owners, err, code = await agent.exec(ws, "stat", "-c", "%u %g", "hello.txt", "sub")
    assert code == 0, err
    my_gid, _, _ = await agent.exec(ws, "id", "-g")
    expected = f"{me.decode().strip()} {my_gid.decode().strip()}"
    assert owners.decode().split("\n")[:2] == [expected, expected]

    # The user inside can write there.
    _, err, code = await agent.exec(ws, "sh", "-c", "echo from inside > made-inside.txt")
    assert code == 0, err
    if MOUNTED[agent.provider] == "mounted":
        # Seen on the node at once, as the folder owner's file (editable there).
        made = source / "made-inside.txt"
        assert made.read_text() == "from inside\n"
        assert (made.stat().st_uid, made.stat().st_gid) == (owner.st_uid, owner.st_gid)
        # And the other way: written on the node, seen inside at once.
        (source / "sub" / "from-node.txt").write_text("fresh\n")
        assert (await agent.exec(ws, "cat", "sub/from-node.txt"))[0] == b"fresh\n"

        # A restart keeps it where it was.
        await agent.stub.StopEnvironment(
            nodeagent_pb2.StopEnvironmentRequest(
                workspace=ws, provider=agent.provider, timeout_seconds=5
            )
        )
        await agent.stub.StartEnvironment(agent.ref(ws))
        out, _, code = await agent.exec(ws, "cat", "made-inside.txt", "sub/from-node.txt")
        assert (out, code) == (b"from inside\nfresh\n", 0)
        assert (await agent.exec(ws, "pwd"))[0] == b"/workspace\n"
    else:
        # A copy: the node's folder is as it was; a later start does not copy again.
        assert not (source / "made-inside.txt").exists()
        await agent.stub.StartEnvironment(agent.ref(ws))
        assert (await agent.exec(ws, "cat", "made-inside.txt"))[0] == b"from inside\n"


async def test_a_command_a_custom_workdir_and_a_named_user(agent: Agent, source: Path) -> None:
    ws = agent.ws()
    # A user of the image by name (the test images have root only); Docker: the
    # folder owner's uid, as above.
    user = {"docker": f"{source.stat().st_uid}", "lxd": "root", "qemu": "root"}
    await agent.stub.CreateEnvironment(
        agent.spec(
            ws,
            source_path=str(source),
            workdir="/src/app",
            user=user[agent.provider],
            command=["sh", "-c", "pwd > /tmp/cwd; while :; do sleep 1; done"],
        )
    )
    await agent.stub.StartEnvironment(agent.ref(ws))
    assert await agent.exec(ws, "pwd") == (b"/src/app\n", b"", 0)
    me, _, _ = await agent.exec(ws, "id", "-u")
    owner, _, _ = await agent.exec(ws, "stat", "-c", "%u", "hello.txt")
    assert owner == me
    for _ in range(100):  # the command runs in the workdir too
        out, _, code = await agent.exec(ws, "cat", "/tmp/cwd")
        if code == 0 and out:
            break
        await asyncio.sleep(0.1)
    assert out == b"/src/app\n"
    assert (await agent.exec(ws, "cat", "hello.txt"))[0] == b"hello from the node\n"


async def test_bad_sources_are_refused(agent: Agent, source: Path) -> None:
    ws = agent.ws()
    for kw, words in (
        ({"source_path": str(source / "absent")}, "not a folder on this node"),
        ({"source_path": str(source / "hello.txt")}, "not a folder on this node"),
        ({"source_path": "relative/dir"}, "not a folder on this node"),
        ({"source_path": str(source), "workdir": "workspace"}, "absolute folder"),
        ({"source_path": str(source), "workdir": "/"}, "absolute folder"),
        ({"source_path": str(source), "workdir": "/a/../etc"}, "absolute folder"),
        ({"source_path": str(source), "user": "bad user;"}, "not a user name"),
        # LXD looks a name up in the image before it maps ids (and removes what it made).
        *(
            [({"source_path": str(source), "user": "nosuchuser"}, "not in the image's")]
            if agent.provider == "lxd"
            else []
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await agent.stub.CreateEnvironment(agent.spec(ws, **kw))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
        assert words in (info.value.details() or ""), info.value.details()
    env = await agent.stub.InspectEnvironment(agent.ref(ws))
    assert env.state == common_pb2.ENVIRONMENT_STATE_ABSENT


@pytest.mark.lxd
async def test_lxd_maps_the_owner_to_a_user_who_is_not_root(source: Path) -> None:
    """uid:gid inside other than root: the folder's owner becomes them, both ways."""
    (case,) = [c for c in CASES if c.name == "lxd"]
    async with running_agent(case) as agent:
        ws = agent.ws()
        await agent.stub.CreateEnvironment(
            agent.spec(ws, source_path=str(source), user="1234:2345")
        )
        await agent.stub.StartEnvironment(agent.ref(ws))
        assert await agent.exec(ws, "id", "-u") == (b"1234\n", b"", 0)
        assert await agent.exec(ws, "id", "-g") == (b"2345\n", b"", 0)
        assert await agent.exec(ws, "stat", "-c", "%u:%g", "hello.txt") == (
            b"1234:2345\n",
            b"",
            0,
        )
        _, err, code = await agent.exec(ws, "sh", "-c", "echo x > mine.txt")
        assert code == 0, err
        made = (source / "mine.txt").stat()
        assert (made.st_uid, made.st_gid) == (source.stat().st_uid, source.stat().st_gid)


async def test_a_shipped_source_stays_in_step_both_ways(agent: Agent) -> None:
    """A remote node's source: PutSource fills the agent's folder, the environment is
    made on it; a later delta reaches the environment, what is made inside comes back
    with GetSource (QEMU: copied in and out of the running guest)."""
    ws = agent.ws()
    receipt = await put(agent.stub, make_tar(file("a.txt", b"A\n"), file("old.txt", b"O\n")), ws=ws)
    assert Path(receipt.path) == agent.agent_dir / "sources" / ws
    await agent.stub.CreateEnvironment(agent.spec(ws, source_path=receipt.path))
    await agent.stub.StartEnvironment(agent.ref(ws))
    assert (await agent.exec(ws, "cat", "a.txt"))[0] == b"A\n"

    await put(
        agent.stub, make_tar(file("b.txt", b"B\n")), ws=ws, replace=False, deleted=("old.txt",)
    )
    out, err, code = await agent.exec(ws, "sh", "-c", "cat b.txt; ls")
    assert (out, code) == (b"B\na.txt\nb.txt\n", 0), err

    since = time.time_ns() - 2 * 10**9  # the guest's clock may lag the node's a little
    _, err, code = await agent.exec(ws, "sh", "-c", "echo made inside > inside.txt")
    assert code == 0, err
    changed = await get(agent.stub, since, ws=ws)
    assert changed.get("inside.txt") == b"made inside\n", changed
    everything = await get(agent.stub, ws=ws)
    assert {k.removeprefix("./") for k, v in everything.items() if v} == {
        "a.txt",
        "b.txt",
        "inside.txt",
    }
    if MOUNTED[agent.provider] == "copied":
        # A stopped guest cannot take a push, and its next start would not copy again:
        # refused, with the node's folder left as it was (the same push works once up).
        await agent.stub.StopEnvironment(
            nodeagent_pb2.StopEnvironmentRequest(
                workspace=ws, provider=agent.provider, timeout_seconds=10
            )
        )
        delta = make_tar(file("c.txt", b"C\n"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await put(agent.stub, delta, ws=ws, replace=False)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "vendetta workspace up" in (info.value.details() or "")
        assert not (Path(receipt.path) / "c.txt").exists()
        # What it held was brought out as it stopped: a pull (and destroy's check of
        # unpulled work) reads that, including what was made inside.
        held = {k.removeprefix("./"): v for k, v in (await get(agent.stub, ws=ws)).items()}
        assert held.get("inside.txt") == b"made inside\n", held
        await agent.stub.StartEnvironment(agent.ref(ws))
        await put(agent.stub, delta, ws=ws, replace=False)
        assert (await agent.exec(ws, "cat", "c.txt"))[0] == b"C\n"
        assert (Path(receipt.path) / "c.txt").read_bytes() == b"C\n"
