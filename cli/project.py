"""`vendetta init` and `vendetta config validate`: the project's .vendetta/config.yaml."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from cli.output import out, plain, print_error, print_json
from common.errors import VendettaError

DEFAULT_CONFIG = Path(".vendetta/config.yaml")

STARTER = """\
# vendetta project config (the format: docs/config.md in the vendetta repository)
name: {name}

# Where the workspace runs: docker | lxd (alias lxc) | qemu
provider: {provider}

# Run on a remote node added with `vendetta node add` (absent: this machine).
# remote: {{node: node1}}

docker:
  image: "ubuntu:22.04"
lxd:
  image: "ubuntu/22.04"
qemu:
  image: "debian-12"
  cpu: 2
  memory: 4G
  disk: 20G

# Services start in dependency order, each once its dependencies are healthy.
# services:
#   db:
#     command: "postgres"
#     port: 5432
#     health_check: {{tcp: 5432}}
#   web:
#     command: "npm run dev"
#     port: 3000
#     depends_on: [db]
#     health_check: {{http: "/health"}}
#     env: {{DEBUG: "1"}}

# hooks:
#   setup: "make deps"        # once, after create
#   teardown: "make clean"    # before destroy
"""


def _project_name(directory: Path) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", directory.name.lower()).strip("-")[:63]
    return name or "my-project"


def init(
    name: Annotated[str, typer.Option(help="Project name (default: this folder's).")] = "",
    provider: Annotated[str, typer.Option(help="docker | lxd | qemu.")] = "docker",
    path: Annotated[Path, typer.Option(help="Where to write it.")] = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter .vendetta/config.yaml."""
    from common.config import parse_config

    if path.exists() and not force:
        print_error(f"{path} exists; pass --force to overwrite it")
        raise typer.Exit(1)
    text = STARTER.format(name=name or _project_name(Path.cwd()), provider=provider)
    try:
        parse_config(text, str(path))  # never write a config we would refuse
    except VendettaError as exc:
        print_error(str(exc))
        raise typer.Exit(1) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        print_error(f"cannot write {path}: {exc.strerror or exc}; pick another --path")
        raise typer.Exit(1) from None
    out.print(f"wrote {plain(str(path))}; check it with `vendetta config validate`")


config_app = typer.Typer(help="Check project configs.", no_args_is_help=True)


@config_app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="Config file.")] = DEFAULT_CONFIG,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check a config file; every problem is listed with its key."""
    from common.config import load_config

    try:
        cfg = load_config(path)
    except VendettaError as exc:
        if json_:
            print_json({"valid": False, "path": str(path), "error": str(exc)})
        else:
            print_error(str(exc))
        raise typer.Exit(1) from None
    if json_:
        print_json({"valid": True, "path": str(path), "config": cfg.model_dump(mode="json")})
        return
    services = ", ".join(cfg.services) or "none"
    where = plain(str(path))
    out.print(f"{where}: valid (project {cfg.name}, provider {cfg.provider}, services: {services})")
