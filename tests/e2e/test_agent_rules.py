"""Agent rules from templates, end to end: a project whose config names a template
(`agents: {rules: [...]}`) gets it rendered with the workspace's facts into its workdir
at `workspace up` (a real Docker workspace with a service); a template with an unknown
placeholder is refused before the workspace starts."""

from __future__ import annotations

import os

import pytest

from common.loopback import free_ports
from tests.conftest import TEST_IMAGE
from tests.support.cli import cli_env

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

TEMPLATE = """# Working in {{ workspace }}

Code: {{ workdir }} ({{ provider }} on {{ node }}).

Services:
{{ services }}

Run commands: {{ exec }}
MCP: {{ mcp }}
"""


def test_up_renders_the_rules_into_the_workdir() -> None:
    name = f"rules-{os.getpid()}"
    with cli_env(prefix="vd-rules-") as e:
        e.cli("server", "start")
        project = e.home / "proj"
        (project / ".vendetta").mkdir(parents=True)
        (inside,) = free_ports(1)
        cfg = project / ".vendetta" / "config.yaml"
        cfg.write_text(
            f"name: rules\nprovider: docker\ndocker:\n  image: {TEST_IMAGE}\n"
            # trapped: sh as first process ignores SIGTERM, a down would wait 10 s
            "  command: [/bin/sh, -c, 'trap \"exit 0\" TERM; while :; do sleep 1; done']\n"
            "services:\n  web:\n    command: >-\n      mkdir -p /www && echo hi > /www/index.html"
            f" && exec httpd -f -p {inside} -h /www\n    port: {inside}\n"
            "    health_check: {http: /, interval: 0.3}\n"
            "agents:\n  rules: [.vendetta/AGENTS.md.tmpl]\n"
        )
        template = project / ".vendetta" / "AGENTS.md.tmpl"
        template.write_text(TEMPLATE)
        e.cli("workspace", "create", name, "--config", str(cfg), "--no-source")
        shown = e.cli("workspace", "up", name).stdout
        assert "agents    /workspace/AGENTS.md (from AGENTS.md.tmpl)" in shown, shown
        got = e.cli("workspace", "exec", name, "--", "cat", "/workspace/AGENTS.md").stdout
        assert got.startswith(f"# Working in {name}\n\nCode: /workspace (docker on local)."), got
        assert f"- web (healthy): port {inside} inside; http://" in got, got
        assert f"vendetta workspace exec {name} -- CMD" in got
        assert f"vendetta mcp --workspace {name}" in got

        # A wrong template: refused before anything starts; the workspace stays stopped.
        e.cli("workspace", "down", name)
        template.write_text("{{ workspace }} {{ secrets }}\n")
        out = e.fails("workspace", "up", name)
        assert "uses {{ secrets }}; known: workspace" in out, out
        assert e.workspace(name)["state"] == "WORKSPACE_STATE_STOPPED"
        e.cli("workspace", "destroy", name)
