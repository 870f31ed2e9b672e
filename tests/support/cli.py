"""Driving the `vendetta` CLI as a user would: subprocesses, JSON output, waits."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from tests.support.sshd import SshServer

BIN = Path(sys.executable).parent
TIMEOUT = 120


@dataclass
class Env:
    home: Path
    env: dict[str, str]
    nodes: dict[str, SshServer] = field(default_factory=dict)
    agent_dirs: list[Path] = field(default_factory=list)

    def cli(
        self, *args: str, check: bool = True, timeout: float = TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(BIN / "vendetta"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"vendetta {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def fails(self, *args: str) -> str:
        """Run a command that must fail; return its combined output (one clear line)."""
        proc = self.cli(*args, check=False)
        assert proc.returncode != 0, f"vendetta {' '.join(args)} succeeded:\n{proc.stdout}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return " ".join((proc.stdout + proc.stderr).split())

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def agent_command(self, name: str, extra: str = "") -> str:
        agent_dir = self.home / f"agent-{name}"
        self.agent_dirs.append(agent_dir)
        return f"{BIN / 'vendetta-agent'} --dir {agent_dir} {extra}".strip()

    def add_node(
        self, name: str, server: SshServer, *extra: str
    ) -> subprocess.CompletedProcess[str]:
        return self.cli(
            "node",
            "add",
            name,
            server.host,
            "--port",
            str(server.port),
            "--user",
            server.user,
            "--identity",
            str(server.client_key_path),
            "--yes",
            "--agent-command",
            self.agent_command(name),
            *extra,
        )

    def node(self, name: str) -> dict[str, Any]:
        nodes = {n["name"]: n for n in self.json("node", "list")}
        return dict(nodes[name])

    def wait_node(self, name: str, state: str, within: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            node = self.node(name)
            if node["state"] == f"NODE_STATE_{state.upper()}":
                return node
            if time.monotonic() > deadline:
                raise AssertionError(f"node {name} never became {state}: {node}")
            time.sleep(0.3)

    def workspace(self, name: str) -> dict[str, Any]:
        return dict(self.json("workspace", "status", name))


def containers(workspace: str) -> list[Any]:
    client = docker.from_env()
    try:
        for _ in range(5):
            # docker-py inspects each listed container: one removed meanwhile (another
            # test's cleanup) raises NotFound, so list again.
            with contextlib.suppress(docker.errors.NotFound):
                return list(
                    client.containers.list(
                        all=True, filters={"label": f"vendetta.workspace={workspace}"}
                    )
                )
        raise AssertionError(f"containers of {workspace!r} kept vanishing while listed")
    finally:
        client.close()


def agent_id(agent_dir: Path) -> str:
    try:
        return (agent_dir / "agent-id").read_text().strip()
    except FileNotFoundError:
        return "-"


@contextmanager
def cli_env(prefix: str = "vd-e2e-") -> Iterator[Env]:
    """A coordinator of its own (short paths: unix sockets), stopped with its agents after."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    env = {**os.environ, "VENDETTA_HOME": str(home / "coord"), "NO_COLOR": "1", "COLUMNS": "200"}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    e = Env(home=home, env=env)
    e.agent_dirs.append(home / "coord" / "agent")
    try:
        yield e
    finally:
        # Whatever a failed test left: destroyed through vendetta, on every provider.
        listed = e.cli("workspace", "list", "--json", check=False)
        if listed.returncode == 0:
            # Side by side: one whose node is away waits a few seconds for it to return.
            destroys = [
                subprocess.Popen(
                    [str(BIN / "vendetta"), "workspace", "destroy", ws["name"], "--force"],
                    env=e.env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for ws in json.loads(listed.stdout or "[]")
            ]
            for proc in destroys:
                try:
                    proc.wait(timeout=TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        e.cli("server", "stop", check=False)
        for agent_dir in e.agent_dirs:
            subprocess.run(
                [str(BIN / "vendetta-agent"), "--dir", str(agent_dir), "stop"],
                capture_output=True,
                timeout=30,
                check=False,
            )
        for server in e.nodes.values():
            server.stop()
        client = docker.from_env()
        ours = {agent_id(d) for d in e.agent_dirs}
        # The low-level list: no inspect per container, which raced other tests' cleanup.
        for c in client.api.containers(all=True, filters={"label": "vendetta.managed=true"}):
            if (c.get("Labels") or {}).get("vendetta.agent") in ours:
                with contextlib.suppress(docker.errors.NotFound):
                    client.api.remove_container(c["Id"], force=True)
        client.close()
        shutil.rmtree(home, ignore_errors=True)


def wait_for(what: str, check: Callable[[], Any], within: float = 60, show: Any = None) -> Any:
    """``check()`` once it is truthy; fails with ``what`` (and ``show()``) after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {show() if show else result}")
        time.sleep(0.2)
