"""Services through the CLI on every provider that has landed: dependency order,
health gates, per-service logs, restarts, failure summaries, reverse-order
stop, and supervision surviving an agent restart.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LXD_TEST_IMAGE, TEST_IMAGE
from tests.support.cli import BIN, Env, cli_env, wait_for

pytestmark = pytest.mark.e2e

# Each service appends its name to /tmp/order when asked to stop (TERM), so the
# stop order can be read back; `sleep & wait` lets the trap run at once.
SERVICES = """
services:
  db:
    command: >-
      trap 'echo db >> /tmp/order; kill $n; exit 0' TERM;
      nc -ll -p 5432 -e cat & n=$!; echo db ready;
      while :; do sleep 1 & wait $!; done
    port: 5432
    health_check: {tcp: 5432, interval: 0.3}
  web:
    command: >-
      trap 'echo web >> /tmp/order; kill $h; exit 0' TERM;
      mkdir -p /www && echo ok > /www/health;
      echo "web sees db at $VENDETTA_SERVICE_DB_URL port $VENDETTA_SERVICE_DB_PORT";
      echo "web error stream" >&2;
      httpd -f -p 3000 -h /www & h=$!;
      while :; do sleep 1 & wait $!; done
    port: 3000
    depends_on: [db]
    health_check: {http: /health, interval: 0.3}
  worker:
    command: >-
      trap 'echo worker >> /tmp/order; exit 0' TERM;
      while :; do echo "worker tick $GREETING"; sleep 0.5 & wait $!; done
    depends_on: [db, web]
    env: {GREETING: hello}
hooks:
  setup: "echo setting things up; rm -f /tmp/order"
"""

BROKEN = """
services:
  bad:
    command: "echo booting bad; echo still booting; while :; do sleep 1; done"
    port: 8081
    restart: "no"
    health_check: {http: /health, interval: 0.2, retries: 3}
"""

PROVIDERS = [
    pytest.param(
        ("docker", f"docker:\n  image: {TEST_IMAGE}\n"), marks=pytest.mark.docker, id="docker"
    ),
    pytest.param(("lxd", f"lxd:\n  image: {LXD_TEST_IMAGE}\n"), marks=pytest.mark.lxd, id="lxd"),
    pytest.param(
        ("qemu", "qemu: {image: debian-12, cpu: 1, memory: 512M, disk: 2G}\n"),
        marks=pytest.mark.qemu,
        id="qemu",
    ),
]


@pytest.fixture(scope="module", params=PROVIDERS)
def project(request: pytest.FixtureRequest) -> Iterator[tuple[Env, str, Path]]:
    provider, section = request.param
    with cli_env(prefix="vd-svc-") as e:
        e.cli("server", "start")
        cfg = e.home / "proj" / ".vendetta" / "config.yaml"
        cfg.parent.mkdir(parents=True)
        cfg.write_text(f"name: three\nprovider: {provider}\n{section}{SERVICES}")
        bad = e.home / "bad" / ".vendetta" / "config.yaml"
        bad.parent.mkdir(parents=True)
        bad.write_text(f"name: broken\nprovider: {provider}\n{section}{BROKEN}")
        yield e, provider, bad


def services(e: Env, ws: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in e.workspace(ws)["services"]}


def wait_for_text(lines: list[str], text: str, within: float) -> bool:
    """Whether ``text`` shows in the lines a reader thread collects, within ``within`` s."""
    deadline = time.monotonic() + within
    while text not in "".join(lines):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_up_starts_services_in_dependency_order(project: tuple[Env, str, Path]) -> None:
    e, _, _ = project
    e.cli("workspace", "create", "three", "--config", str(e.home / "proj/.vendetta/config.yaml"))
    up = e.cli("workspace", "up", "three")
    progress = up.stderr
    order = [progress.index(f"{s}: healthy") for s in ("db", "web", "worker")]
    assert order == sorted(order), progress
    assert progress.index("db: healthy") < progress.index("web: starting")
    assert progress.index("web: healthy") < progress.index("worker: starting")
    assert "setup hook" in progress
    for name in ("db", "web", "worker"):  # the summary table
        assert name in up.stdout
    states = {n: s["state"] for n, s in services(e, "three").items()}
    assert states == dict.fromkeys(("db", "web", "worker"), "SERVICE_STATE_HEALTHY")
    # up again is a no-op that still succeeds
    again = e.cli("workspace", "up", "three")
    assert "healthy" in again.stdout


def test_logs_per_service_and_interleaved(project: tuple[Env, str, Path]) -> None:
    e, _, _ = project

    def web_lines() -> list[str]:
        return e.cli("workspace", "logs", "three", "--service", "web").stdout.splitlines()

    lines = wait_for("web's output", lambda: (ls := web_lines()) and len(ls) >= 2 and ls)
    assert "web sees db at http://localhost:5432 port 5432" in lines
    assert "web error stream" in lines  # stderr is captured too
    assert not any("worker tick" in ln or "db ready" in ln for ln in lines)

    def worker_tail(n: int) -> list[str]:
        out = e.cli("workspace", "logs", "three", "--service", "worker", "--tail", str(n))
        return out.stdout.splitlines()

    # The worker ticks every 0.5 s from its start: on a busy machine its second
    # tick may not be in yet, so wait for it; --tail must then cut to 2 and 1.
    assert wait_for("two worker ticks", lambda: len(worker_tail(2)) == 2)
    assert worker_tail(2) == ["worker tick hello"] * 2
    assert worker_tail(1) == ["worker tick hello"]
    hook = e.cli("workspace", "logs", "three", "--service", "hook-setup").stdout
    assert "setting things up" in hook
    recent = e.cli("workspace", "logs", "three", "--service", "worker", "--since", "1d").stdout
    assert "worker tick hello" in recent
    future = e.cli("workspace", "logs", "three", "--service", "worker", "--since", "2099-01-01")
    assert future.stdout == ""
    everything = e.cli("workspace", "logs", "three").stdout
    assert "db | db ready" in everything and "worker | worker tick hello" in everything
    assert "web | web sees db" in everything
    out = e.fails("workspace", "logs", "three", "--service", "nope")
    assert "has no service 'nope'" in out and "worker" in out


def test_logs_follow_one_service(project: tuple[Env, str, Path]) -> None:
    e, _, _ = project
    follow = subprocess.Popen(
        [
            str(BIN / "vendetta"),
            "workspace",
            "logs",
            "three",
            "--service",
            "worker",
            "-f",
            "--tail",
            "1",
        ],
        env=e.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None
        seen = [follow.stdout.readline().strip() for _ in range(4)]
        assert seen == ["worker tick hello"] * 4
    finally:
        follow.kill()
        follow.wait()


def test_killed_service_restarts_and_the_status_stream_shows_it(
    project: tuple[Env, str, Path],
) -> None:
    e, _, _ = project
    watch = subprocess.Popen(
        [str(BIN / "vendetta"), "workspace", "status", "three", "--watch"],
        env=e.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []  # the watch's output so far, read as it comes
    assert watch.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(watch.stdout or []), daemon=True)
    reader.start()
    try:
        # Subscribed once it shows an event: an `up` of the running workspace (a no-op
        # for its services) publishes some. A fixed sleep here missed the kill's events
        # when the CLI took longer than that to start on a busy machine.
        def subscribed() -> bool:
            e.cli("workspace", "up", "three")
            return wait_for_text(lines, "services healthy", within=5)

        wait_for("the watch to subscribe", subscribed, show=lambda: "".join(lines))
        before = services(e, "three")["worker"]
        e.cli("workspace", "exec", "three", "--", "kill", "-9", str(before["pid"]))
        after = wait_for(
            "worker to restart",
            lambda: (
                (w := services(e, "three")["worker"])["restarts"] == 1
                and w["state"] == "SERVICE_STATE_HEALTHY"
                and w
            ),
        )
        assert after["pid"] != before["pid"]
        # The stream may trail the status read above: wait for its healthy event.
        wait_for(
            "the watch to show the worker healthy again",
            lambda: (
                (text := "".join(lines)).find("restart 1/5") != -1
                and text.rfind("worker: healthy") > text.find("restart 1/5")
            ),
            show=lambda: "".join(lines),
        )
    finally:
        watch.terminate()
        watch.wait(timeout=10)
        reader.join(timeout=10)
    text = "".join(lines)
    assert "worker: exited (exited with code 137; restart 1/5" in text, text
    assert text.index("restart 1/5") < text.rindex("worker: healthy")


def test_unhealthy_service_fails_up_with_a_summary(project: tuple[Env, str, Path]) -> None:
    e, _, bad = project
    e.cli("workspace", "create", "broken", "--config", str(bad))
    out = e.fails("workspace", "up", "broken")
    assert "not all its services are healthy" in out
    assert "bad: failed" in out and "health check never passed after 3 tries" in out
    assert "booting bad" in out  # the last lines of its log
    state = services(e, "broken")["bad"]
    assert state["state"] == "SERVICE_STATE_FAILED" and state["restarts"] == 0
    e.cli("workspace", "destroy", "broken")


def test_services_survive_an_agent_restart(project: tuple[Env, str, Path]) -> None:
    e, _, _ = project
    pids = {n: s["pid"] for n, s in services(e, "three").items()}
    agent_dir = e.home / "coord" / "agent"
    old_agent = (agent_dir / "agent.pid").read_text()
    subprocess.run([str(BIN / "vendetta-agent"), "--dir", str(agent_dir), "stop"], check=True)
    # The coordinator notices (heartbeat) and starts a new agent by itself.
    wait_for(
        "a new agent",
        lambda: (
            (agent_dir / "agent.pid").exists()
            and (agent_dir / "agent.pid").read_text() != old_agent
        ),
    )
    e.wait_node("local", "ready")
    resumed = wait_for(
        "services found again",
        lambda: (
            (s := services(e, "three"))
            and all(v["state"] == "SERVICE_STATE_HEALTHY" for v in s.values())
            and s
        ),
        show=lambda: services(e, "three"),
    )
    assert {n: s["pid"] for n, s in resumed.items()} == pids  # the same processes
    # and their output is still collected
    count = len(e.cli("workspace", "logs", "three", "--service", "worker").stdout.splitlines())
    wait_for(
        "new worker output",
        lambda: (
            len(e.cli("workspace", "logs", "three", "--service", "worker").stdout.splitlines())
            > count
        ),
    )


def test_down_stops_services_in_reverse_order(project: tuple[Env, str, Path]) -> None:
    e, _, _ = project
    e.cli("workspace", "down", "three")
    states = {n: s["state"] for n, s in services(e, "three").items()}
    assert set(states.values()) == {"SERVICE_STATE_STOPPED"}, states
    e.cli("workspace", "up", "three")  # the environment keeps /tmp: read the stop order
    order = e.cli("workspace", "exec", "three", "--", "cat", "/tmp/order").stdout.split()
    assert order[:3] == ["worker", "web", "db"]
    # setup ran once only (it would have removed /tmp/order)
    hook = e.cli("workspace", "logs", "three", "--service", "hook-setup").stdout
    assert hook.count("setting things up") == 1
    e.cli("workspace", "destroy", "three")
    assert json.loads(e.cli("workspace", "list", "--json").stdout) == []
