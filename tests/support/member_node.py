"""Nodes whose SSH user is the test user MEMBER (vdnode, in the engines' groups), for
e2e modules whose agents need a command of their own: a state folder the test reads,
a fault proxy in front of the sshd, an agent two coordinators share.

    with member_env("vd-x-") as (e, m):
        server = m.sshd("n1", "127.0.0.31")
        m.add("n1", server, "--grace", "3")      # or via=proxy, in front of server
        pid = (m.agent_dir("n1") / "agent.pid").read_text()

The agent is this checkout's, run as MEMBER (node_user.agent_python), with its
state folder under one scratch folder, as are the sshds' files and the home their
sessions get: nothing lands in MEMBER's own home (only its cached answer of the KVM
probe is copied from there). On the way out cli_env destroys the workspaces, stops
the agents and removes their containers (by the agents' ids, read from their
folders); then any process still running from these sessions is killed and the
scratch folder removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import require
from tests.support.cli import Env, cli_env
from tests.support.fault_proxy import PausableProxy
from tests.support.node_user import (
    MEMBER,
    agent_python,
    home,
    open_dir,
    remove_as_root,
    users_problem,
)
from tests.support.sshd import SshServer


def _member_owned(path: Path) -> Path:
    path.mkdir(mode=0o755)
    shutil.chown(path, MEMBER, MEMBER)
    return path


class MemberNodes:
    """One module's nodes reached as MEMBER; their files under ``scratch``."""

    def __init__(self, e: Env, scratch: Path) -> None:
        self.e = e
        self.scratch = scratch
        self.home = _member_owned(scratch / "home")  # HOME of every session
        self.agents = _member_owned(scratch / "agents")
        self.python = agent_python(MEMBER, scratch)
        self._seed_kvm_probe()

    def _seed_kvm_probe(self) -> None:
        """Start the fresh HOME's cache with MEMBER's answer of the KVM probe, if it has
        one: its test boot (providers.qemu.kvm, keyed by this boot, kernel and QEMU)
        holds up each agent's first answer by up to 10 s when KVM does not work."""
        known = home(MEMBER) / ".cache" / "vendetta" / "kvm-probe.json"
        if not known.is_file():
            return
        cache = _member_owned(_member_owned(self.home / ".cache") / "vendetta")
        shutil.copyfile(known, cache / known.name)
        shutil.chown(cache / known.name, MEMBER, MEMBER)

    def sshd(self, name: str, host: str) -> SshServer:
        """A real sshd on ``host`` that lets MEMBER in with its client key."""
        server = SshServer.start(
            self.scratch / f"sshd-{name}", host=host, session_env={"HOME": str(self.home)}
        )
        server.user = MEMBER
        # sshd reads authorized_keys as the user: scratch is open_dir's 0755.
        server.authorized_keys_path.chmod(0o644)
        self.e.nodes[name] = server
        return server

    def agent_dir(self, name: str) -> Path:
        return self.agents / name

    def agent_command(self, name: str, extra: str = "") -> str:
        """The agent of node ``name``, stopped (and its containers removed) by cli_env."""
        agent_dir = self.agent_dir(name)
        if agent_dir not in self.e.agent_dirs:
            self.e.agent_dirs.append(agent_dir)
        return f"{self.python} -m nodeagent.main --dir {agent_dir} {extra}".strip()

    def add(
        self,
        name: str,
        server: SshServer,
        *extra: str,
        via: PausableProxy | None = None,
        agent: str = "",
        into: Env | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`node add` of ``server`` (or of ``via``, a proxy in front of it) as MEMBER to
        ``into`` (this module's coordinator unless said), with its own agent unless
        ``agent`` names another command."""
        host, port = (via.host, via.port) if via else (server.host, server.port)
        return (into or self.e).cli(
            "node", "add", name, host, "--port", str(port), "--user", MEMBER,
            "--identity", str(server.client_key_path), "--yes",
            "--agent-command", agent or self.agent_command(name), *extra,
        )  # fmt: skip

    def kill_leftovers(self) -> list[int]:
        """SIGKILL MEMBER's processes started from these sessions (their HOME) or
        running from the scratch folder; their pids."""
        uid = pwd.getpwnam(MEMBER).pw_uid
        marker, scratch = f"HOME={self.home}".encode(), str(self.scratch).encode()
        killed = []
        for entry in Path("/proc").iterdir():
            try:
                if not entry.name.isdigit() or entry.stat().st_uid != uid:
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            if marker in environ or scratch in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
        return killed


@contextmanager
def member_env(prefix: str) -> Iterator[tuple[Env, MemberNodes]]:
    """A coordinator of its own (cli_env) and the means to add nodes to it as MEMBER."""
    problem = users_problem()
    require("the test users", not problem, problem)
    scratch = open_dir(prefix)
    nodes: MemberNodes | None = None
    try:
        with cli_env(prefix=prefix) as e:
            nodes = MemberNodes(e, scratch)
            yield e, nodes
    finally:
        # After cli_env: it reads the agents' ids in their folders to find their containers.
        if nodes is not None and (killed := nodes.kill_leftovers()):
            print(f"killed {MEMBER}'s processes left after the agents stopped: {killed}")
        remove_as_root(scratch)
