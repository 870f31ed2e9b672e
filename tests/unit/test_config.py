"""Project config validation (.vendetta/config.yaml), sizes and names."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config, parse_config, parse_size
from common.errors import ConfigError, InvalidArgumentError
from common.names import validate_name

SOURCE = "/home/dev/proj/.vendetta/config.yaml"

# The example of DESIGN.md ("Project config"), verbatim.
DESIGN_EXAMPLE = """\
name: my-project
provider: docker            # docker | lxd (alias lxc) | qemu
remote: {node: node1, user: dev, port: 22}   # optional; absent = local node
docker: {image: "ubuntu:22.04"}
lxd:    {image: "ubuntu/22.04"}
qemu:   {image: "debian-12", cpu: 4, memory: 8G, disk: 50G}
services:
  db:  {command: "postgres", port: 5432, health_check: {tcp: 5432}}
  web: {command: "npm run dev", port: 3000, depends_on: [db],
        health_check: {http: "/health"}, env: {DEBUG: "1"}}
hooks: {setup: "...", teardown: "..."}
"""


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    message = str(info.value)
    assert message.startswith(SOURCE + ":"), "every config error names the file first"
    return message


def test_design_example_parses() -> None:
    cfg = parse_config(DESIGN_EXAMPLE, SOURCE)
    assert cfg.name == "my-project"
    assert cfg.provider == "docker"
    assert cfg.remote is not None
    assert (cfg.remote.node, cfg.remote.user, cfg.remote.port) == ("node1", "dev", 22)
    assert cfg.docker.image == "ubuntu:22.04"
    assert cfg.lxd.image == "ubuntu/22.04"
    assert (cfg.qemu.image, cfg.qemu.cpu, cfg.qemu.memory, cfg.qemu.disk) == (
        "debian-12",
        4,
        "8G",
        "50G",
    )
    assert parse_size(cfg.qemu.memory) == 8 * 1024**3
    assert list(cfg.services) == ["db", "web"]
    db, web = cfg.services["db"], cfg.services["web"]
    assert (db.command, db.port) == ("postgres", 5432)
    assert db.health_check is not None and db.health_check.tcp == 5432
    assert web.depends_on == ["db"]
    assert web.health_check is not None and web.health_check.http == "/health"
    assert web.env == {"DEBUG": "1"}
    assert web.port == 3000
    assert cfg.hooks is not None
    assert (cfg.hooks.setup, cfg.hooks.teardown) == ("...", "...")


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config("name: p\n")
    assert cfg.provider == "docker"
    assert cfg.remote is None
    assert cfg.docker.image == "ubuntu:22.04"
    assert cfg.docker.command is None
    assert cfg.services == {}
    assert cfg.hooks is None


# ----------------------------------------------------------------------------- errors


def test_unknown_top_level_key() -> None:
    message = config_error("name: p\nprovder: docker\n")
    assert "provder: unknown key" in message


def test_unknown_nested_key() -> None:
    message = config_error("name: p\nservices:\n  web: {command: x, prot: 80}\n")
    assert "services.web.prot: unknown key" in message
    message = config_error("name: p\nremote: {node: n1, hostname: h}\n")
    assert "remote.hostname: unknown key" in message


def test_wrong_type() -> None:
    message = config_error("name: p\nremote: {node: n1, port: twenty-two}\n")
    assert "remote.port:" in message
    assert "integer" in message
    message = config_error("name: p\nservices:\n  web: {command: x, port: 70000}\n")
    assert "services.web.port:" in message


def test_missing_required_key() -> None:
    message = config_error("provider: docker\n")
    assert "name:" in message
    assert "required" in message.lower()


def test_every_problem_is_listed() -> None:
    message = config_error("name: p\nbogus: 1\nremote: {node: n, port: x}\n")
    assert "bogus: unknown key" in message
    assert "remote.port:" in message


@pytest.mark.parametrize("name", ["My-Project", "-proj", "my_project", "x" * 64, ""])
def test_invalid_project_name(name: str) -> None:
    message = config_error(f"name: {name!r}\n")
    assert "name:" in message
    assert "lowercase" in message


def test_unknown_provider() -> None:
    message = config_error("name: p\nprovider: podman\n")
    assert "provider:" in message
    for known in ("docker", "lxd", "qemu"):
        assert known in message


@pytest.mark.parametrize(("given", "expected"), [("lxc", "lxd"), ("kvm", "qemu"), ("qemu", "qemu")])
def test_provider_aliases(given: str, expected: str) -> None:
    assert parse_config(f"name: p\nprovider: {given}\n").provider == expected


def test_unknown_dependency() -> None:
    message = config_error("name: p\nservices:\n  web: {command: x, depends_on: [db, cache]}\n")
    assert "services.web.depends_on: unknown service 'db'" in message
    assert "unknown service 'cache'" in message
    assert "known: web" in message


def test_dependency_cycle() -> None:
    text = (
        "name: p\nservices:\n"
        "  a: {command: x, depends_on: [b]}\n"
        "  b: {command: x, depends_on: [c]}\n"
        "  c: {command: x, depends_on: [a]}\n"
    )
    message = config_error(text)
    assert "services: dependency cycle a -> b -> c -> a" in message


def test_self_dependency_is_a_cycle() -> None:
    message = config_error("name: p\nservices:\n  a: {command: x, depends_on: [a]}\n")
    assert "dependency cycle a -> a" in message


def test_acyclic_diamond_is_fine() -> None:
    text = (
        "name: p\nservices:\n"
        "  db: {command: x}\n"
        "  api: {command: x, depends_on: [db]}\n"
        "  worker: {command: x, depends_on: [db]}\n"
        "  web: {command: x, depends_on: [api, worker]}\n"
    )
    assert sorted(parse_config(text).services) == ["api", "db", "web", "worker"]


def test_duplicate_ports() -> None:
    text = "name: p\nservices:\n  a: {command: x, port: 8080}\n  b: {command: y, port: 8080}\n"
    message = config_error(text)
    assert "services.b.port: port 8080 is already used by service 'a'" in message


def test_invalid_service_name() -> None:
    message = config_error("name: p\nservices:\n  Web_1: {command: x}\n")
    assert "services.Web_1: invalid service name" in message


def test_health_check_with_two_kinds() -> None:
    text = "name: p\nservices:\n  web: {command: x, health_check: {http: /h, tcp: 80}}\n"
    message = config_error(text)
    assert "services.web.health_check" in message
    assert "exactly one of http, tcp or command" in message


def test_health_check_with_no_kind() -> None:
    message = config_error("name: p\nservices:\n  web: {command: x, health_check: {retries: 3}}\n")
    assert "services.web.health_check" in message
    assert "exactly one of" in message


def test_both_health_check_spellings() -> None:
    text = "name: p\nservices:\n  web: {command: x, health_check: /a, healthcheck: /b}\n"
    message = config_error(text)
    assert "services.web" in message
    assert "either health_check or healthcheck" in message


def test_empty_file() -> None:
    for text in ("", "\n", "# only a comment\n"):
        message = config_error(text)
        assert "empty" in message
        assert "vendetta init" in message


@pytest.mark.parametrize("text", ["- name: p\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(text: str) -> None:
    message = config_error(text)
    assert "top level must be a mapping" in message


def test_invalid_yaml() -> None:
    message = config_error("name: p\nservices: {web: [unclosed\n")
    assert "not valid YAML" in message
    # PyYAML's position helps find the mistake.
    assert "line" in message


def test_default_source_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("nme: p\n")
    assert str(info.value).startswith(".vendetta/config.yaml:")


def test_config_error_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError):
        parse_config("", SOURCE)


# ----------------------------------------------------------------------------- short forms


def test_health_check_short_string_form() -> None:
    cfg = parse_config('name: p\nservices:\n  web: {command: x, health_check: "/health"}\n')
    hc = cfg.services["web"].health_check
    assert hc is not None
    assert (hc.http, hc.tcp, hc.command) == ("/health", None, None)


def test_healthcheck_spelling_with_url() -> None:
    cfg = parse_config("name: p\nservices:\n  web: {command: x, healthcheck: {url: /h}}\n")
    hc = cfg.services["web"].health_check
    assert hc is not None
    assert hc.http == "/h"
    assert hc.retries == 30


def test_health_check_command_and_timing() -> None:
    text = (
        "name: p\nservices:\n"
        "  db: {command: x, health_check: {command: [pg_isready], interval: 0.5, retries: 3}}\n"
    )
    hc = parse_config(text).services["db"].health_check
    assert hc is not None
    assert (hc.command, hc.interval, hc.retries) == (["pg_isready"], 0.5, 3)


# ----------------------------------------------------------------------------- load_config


def test_load_config_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("name: p\nbogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:")
    assert "bogus" in str(info.value)

    path.write_text("name: p\n")
    assert load_config(path).name == "p"


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "vendetta init" in str(info.value)


def test_invalid_size_is_a_config_error() -> None:
    message = config_error("name: p\nqemu: {memory: lots}\n")
    assert "qemu.memory" in message


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1024, 1024),
        ("100", 100),
        ("10B", 10),
        ("1K", 1024),
        ("1k", 1024),
        ("1.5K", 1536),
        ("512M", 512 * 1024**2),
        ("512MB", 512 * 1024**2),
        ("8G", 8 * 1024**3),
        ("2GiB", 2 * 1024**3),
        (" 2 G ", 2 * 1024**3),
        ("1T", 1024**4),
    ],
)
def test_parse_size(value: str | int, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "lots", "8X", "-1G", "G", "8 G B extra", "1e3"])
def test_parse_size_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(value)


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "0", "my-project", "node-1", "a-", "x" * 63, "9lives"])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name("workspace", name) == name


@pytest.mark.parametrize(
    "name",
    ["", "Upper", "myProject", "-lead", "x" * 64, "under_score", "dot.ted", "sp ace", "abc\n", "é"],
)
def test_validate_name_rejects(name: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_name("node", name)
    message = str(info.value)
    assert f"invalid node name {name!r}" in message
    assert "1-63 characters" in message
    assert "lowercase letters, digits and '-'" in message


def test_local_port_needs_a_port_and_is_unique() -> None:
    cfg = parse_config(
        "name: p\nservices:\n  web: {command: x, port: 80, local_port: 8080}\n", "c.yaml"
    )
    assert cfg.services["web"].local_port == 8080
    with pytest.raises(ConfigError) as e:
        parse_config(
            "name: p\nservices:\n  a: {command: x, local_port: 8080}\n"
            "  b: {command: x, port: 81, local_port: 8080}\n",
            "c.yaml",
        )
    text = str(e.value)
    assert "services.a.local_port: needs services.a.port" in text
    assert "services.b.local_port: port 8080 is already the local port of service 'a'" in text
