"""Agent rule templates (config agents.rules): read and checked from the project folder,
named after the template, rendered with a workspace's facts."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import agent_rules
from common.config import parse_config
from common.errors import ConfigError
from vendetta.v1 import common_pb2 as cpb
from vendetta.v1 import coordinator_pb2 as pb


def _project(tmp_path: Path, rules: str, templates: dict[str, str]) -> Path:
    cfg = tmp_path / ".vendetta" / "config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"name: p\n{rules}")
    for rel, text in templates.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return cfg


def test_templates_are_read_from_the_project_folder(tmp_path: Path) -> None:
    cfg = _project(
        tmp_path,
        "agents:\n  rules: [.vendetta/AGENTS.md.tmpl, docs/CLAUDE.md]\n",
        {".vendetta/AGENTS.md.tmpl": "# {{ workspace }}\n", "docs/CLAUDE.md": "{{exec}}"},
    )
    rules = agent_rules.read_rules(cfg)
    assert [r.target for r in rules] == ["AGENTS.md", "CLAUDE.md"]
    assert rules[0].text == "# {{ workspace }}\n"
    assert agent_rules.read_rules(_project(tmp_path / "x", "", {})) == []
    assert agent_rules.read_rules(tmp_path / "elsewhere.yaml") == []


def test_bad_templates_are_refused_before_anything(tmp_path: Path) -> None:
    cfg = _project(tmp_path, "agents:\n  rules: [A.md.tmpl]\n", {"A.md.tmpl": "{{ nope }}"})
    with pytest.raises(ConfigError, match=r"uses \{\{ nope \}\}; known: workspace"):
        agent_rules.read_rules(cfg)
    cfg.write_text("name: p\nagents:\n  rules: [missing.tmpl]\n")
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.tmpl"):
        agent_rules.read_rules(cfg)
    (tmp_path / "A.md.tmpl").write_text("{{ ssh }}")
    cfg.write_text("name: p\nagents:\n  rules: [A.md.tmpl, b/A.md]\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "A.md").write_text("x")
    with pytest.raises(ConfigError, match="same file"):
        agent_rules.read_rules(cfg)
    with pytest.raises(ConfigError, match="give a template file"):
        parse_config("name: p\nagents:\n  rules: ['']\n")


def test_render_with_the_workspaces_facts() -> None:
    ws = pb.Workspace(name="api", node="local", provider="docker", image="debian")
    ws.services.append(
        cpb.ServiceStatus(
            name="web", state=cpb.SERVICE_STATE_HEALTHY, port=8080, local_address="127.0.0.1:18080"
        )
    )
    values = agent_rules.facts(ws, "/workspace")
    assert set(values) == set(agent_rules.FACTS)
    text = agent_rules.render("{{ workspace }} in {{workdir}}\n{{ services }}\n{{ mcp }}", values)
    assert text.startswith("api in /workspace\n")
    assert "- web (healthy): port 8080 inside; http://127.0.0.1:18080" in text
    assert "vendetta mcp --workspace api" in text
