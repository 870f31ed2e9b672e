"""The vendetta-client wheel, built from this repository and installed alone into a fresh
virtual environment (its dependencies grpcio and protobuf only), drives a real
coordinator over TLS with a token: create, up, logs -f, exec and down with the blocking
Client (from the environment), then up, watch, logs -f, exec, down and destroy with the
AsyncClient (from arguments); refusals arrive as the error tree. The example watcher
(examples/workspace_watcher.py) runs from the same environment and reacts to an up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TEST_IMAGE
from tests.support.cli import Env, cli_env

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "client_package"
# As docs/api.md builds it: from the venv's setuptools, offline.
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]


@dataclass
class Installed:
    python: Path
    wheel: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    out = tmp_path_factory.mktemp("client-wheel")
    subprocess.run(
        [*PIP_WHEEL, "-w", str(out / "dist"), str(ROOT / "client")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (out / "dist").glob("vendetta_client-*.whl")
    venv = out / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, f"installing the wheel (and grpcio, protobuf): {pip.stderr}"
    return Installed(python, wheel)


def _run(
    installed: Installed, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The fresh environment's interpreter, isolated (-I: no cwd, no PYTHONPATH, no user
    site), run from a folder outside the repository."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [str(installed.python), "-I", *args],
        env={**base, **(env or {})},
        cwd=installed.python.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_wheel_holds_the_client_stubs_and_protos_only(installed: Installed) -> None:
    probe = (
        "import importlib.util as u, json, vendetta_client, vendetta.v1.coordinator_pb2 as c;"
        "from pathlib import Path;"
        "root = Path(vendetta_client.__file__).parent;"
        "print(json.dumps({'at': str(root), 'typed': (root / 'py.typed').exists(),"
        " 'stub_typed': Path(c.__file__).with_suffix('.pyi').exists(),"
        " 'protos': sorted(p.name for p in (root / 'protos').rglob('*.proto')),"
        " 'server': [m for m in ('common', 'coordinator', 'cli', 'nodeagent') if u.find_spec(m)]}))"
    )
    got = _run(installed, "-c", probe)
    assert got.returncode == 0, got.stderr
    seen = json.loads(got.stdout)
    assert seen["at"].startswith(str(installed.python.parents[1])), seen
    assert seen["typed"] and seen["stub_typed"], seen
    assert seen["protos"] == ["common.proto", "coordinator.proto"]
    assert seen["server"] == [], "the wheel must not carry vendetta's server code"


@dataclass
class Shared:
    env: Env
    url: str
    fingerprint: str
    operate: str
    read: str


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    with cli_env(prefix="vd-cpkg-") as e:
        e.cli("server", "start", "--listen", "127.0.0.1:0")
        info = e.json("server", "status")
        operate = e.cli("token", "create", "--name", "svc", "--scope", "operate").stdout.strip()
        read = e.cli("token", "create", "--name", "ro").stdout.strip()
        yield Shared(e, f"vendetta://{info['listen']}", info["tls_fingerprint"], operate, read)


def _config(e: Env, name: str) -> Path:
    cfg = e.home / f"{name}.yaml"
    cfg.write_text(
        f"name: {name}\nprovider: docker\ndocker:\n  image: {TEST_IMAGE}\n"
        # trapped: sh as first process ignores SIGTERM, a down would wait 10 s
        '  command: [/bin/sh, -c, \'trap "exit 0" TERM; i=0;'
        " while :; do i=$((i+1)); echo tick $i; sleep 0.2; done']\n"
    )
    return cfg


def test_the_clients_drive_a_workspace_over_tls(installed: Installed, shared: Shared) -> None:
    name = f"cpkg-{os.getpid()}"
    env = {
        "VENDETTA_URL": shared.url,
        "VENDETTA_TOKEN": shared.operate,
        "VENDETTA_TLS_FINGERPRINT": shared.fingerprint,
    }
    ran = _run(
        installed, str(HERE / "sync_drive.py"), name, str(_config(shared.env, name)), env=env
    )
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout)
    assert seen["where"] == shared.url.removeprefix("vendetta://")
    assert seen["up"] == "WORKSPACE_STATE_RUNNING", seen
    assert seen["log"].startswith("tick "), seen
    assert seen["run"] == [3, "out-42\n", "oops\n"], seen
    assert name in seen["listed"]
    assert f"no-{name}" in seen["not_found"]
    assert seen["down"] == "WORKSPACE_STATE_STOPPED", seen
    assert shared.env.workspace(name)["state"] == "WORKSPACE_STATE_STOPPED"

    args = [shared.url, shared.operate, shared.read, shared.fingerprint, name]
    ran = _run(installed, str(HERE / "async_drive.py"), *args)
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout)
    assert seen["up"] == "WORKSPACE_STATE_RUNNING" and seen["log"].startswith("tick "), seen
    assert seen["run"] == [0, "async-ok\n"], seen
    assert seen["down"] == "WORKSPACE_STATE_STOPPED", seen
    assert "WORKSPACE_STATE_RUNNING" in seen["events"], seen
    assert seen["events"][-1] == "WORKSPACE_STATE_STOPPED", seen
    assert name in seen["read_sees"]
    assert seen["read_refused"][0] == "PermissionDeniedError"
    assert "needs operate" in seen["read_refused"][1], seen
    assert "no token" in seen["no_token"], seen
    assert "not the pinned" in seen["wrong_pin"], seen
    assert name not in seen["after_destroy"]
    tokens = (shared.operate, shared.read)
    assert not any(t in ran.stdout + ran.stderr for t in tokens)


RUN = "sh -c 'echo watcher-$((40+2))'"


def test_the_example_watcher_reacts_to_an_up(installed: Installed, shared: Shared) -> None:
    e, name = shared.env, f"cpkg-watch-{os.getpid()}"
    e.cli("workspace", "create", name, "--config", str(_config(e, name)), "--no-source")
    env = {
        "VENDETTA_URL": shared.url,
        "VENDETTA_TOKEN": shared.operate,
        "VENDETTA_TLS_FINGERPRINT": shared.fingerprint,
        "PYTHONUNBUFFERED": "1",
    }
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    example = ROOT / "examples" / "workspace_watcher.py"
    watcher = subprocess.Popen(
        [str(installed.python), "-I", str(example), "--once", "--run", RUN],
        env={**base, **env},
        cwd=installed.python.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        # Its stream has opened once it names the workspace as it is.
        while f"{name}: WORKSPACE_STATE_STOPPED" not in (line := watcher.stdout.readline()):
            assert line, watcher.stderr.read() if watcher.stderr else ""
        e.cli("workspace", "up", name)
        out, err = watcher.communicate(timeout=120)
        assert watcher.returncode == 0, err
        assert f"{name}: up; `{RUN}` exited 0: watcher-42" in out, out
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        e.cli("workspace", "destroy", name, "--force", check=False)


def test_the_local_socket_needs_no_token(installed: Installed, shared: Shared) -> None:
    """No target and no VENDETTA_URL: the coordinator's socket under VENDETTA_HOME."""
    probe = (
        "import json; from vendetta_client import Client\n"
        "with Client() as vd:\n"
        "    print(json.dumps([vd.settings.endpoint.address, vd.server_info().listen]))"
    )
    home = shared.env.env["VENDETTA_HOME"]
    got = _run(installed, "-c", probe, env={"VENDETTA_HOME": home})
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == [f"unix:{home}/coordinator.sock", shared.url[11:]]
