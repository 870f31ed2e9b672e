"""A coordinator with one node `n1` that logs in as the test user who is not root
(vdnode) through a real sshd, for the editor tests of `ssh NAME.vendetta`."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import require
from tests.support.cli import Env, agent_id, cli_env
from tests.support.node_user import MEMBER, agent_python, open_dir, remove_as_root, users_problem
from tests.support.sshd import SshServer


@contextmanager
def member_node(prefix: str, host: str) -> Iterator[Env]:
    """The coordinator's Env; on leaving, the node's leftovers go too."""
    problem = users_problem()
    require("the test users", not problem, problem)
    scratch = open_dir(prefix)
    agent_dir = scratch / "agent"
    agent_dir.mkdir()
    shutil.chown(agent_dir, MEMBER, MEMBER)
    server: SshServer | None = None
    try:
        with cli_env(prefix=prefix) as e:
            server = SshServer.start(open_dir(f"{prefix}sshd-"), host=host)
            server.user = MEMBER
            server.authorized_keys_path.chmod(0o644)
            e.nodes["n1"] = server
            e.agent_dirs.append(agent_dir)
            e.cli("server", "start")
            python = agent_python(MEMBER, scratch)
            e.cli(
                "node", "add", "n1", server.host, "--port", str(server.port), "--user", MEMBER,
                "--identity", str(server.client_key_path), "--yes",
                "--agent-command", f"{python} -m nodeagent.main --dir {agent_dir}",
            )  # fmt: skip
            yield e
    finally:
        remove_lxd_leftovers(agent_id(agent_dir))
        remove_as_root(scratch, *([server.root] if server else []))


def ssh_config(e: Env) -> Path:
    """A user's ssh config holding only the generated `Host NAME.vendetta` entries."""
    config = e.home / "dot-ssh" / "config"
    config.parent.mkdir()
    config.write_text("")
    e.cli("ssh-config", "--file", str(config), "--yes")
    return config


def remove_lxd_leftovers(agent: str) -> None:
    """LXD instances of our agent that a failed destroy left (cli_env removes Docker's)."""
    listed = subprocess.run(
        ["lxc", "list", "--format", "json"], capture_output=True, text=True, check=False
    )
    for inst in json.loads(listed.stdout or "[]"):
        if inst.get("config", {}).get("user.vendetta.agent") == agent:
            subprocess.run(["lxc", "delete", "--force", inst["name"]], capture_output=True)
