"""`vendetta`: remote dev environments on Docker, LXD and QEMU/KVM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cli.lazy import NOUNS, Lazy, LazyGroup

app = typer.Typer(
    help="vendetta: remote dev environments with a local-devcontainer feel.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)
# Each noun's module is imported only when a command line names it (cli/lazy.py);
# the help line here is what `vendetta --help` shows (a unit test keeps it the module's).
NOUNS.extend(
    [
        Lazy("init", "cli.project", "init", "Write a commented starter .vendetta/config.yaml."),
        Lazy(
            "ssh-config",
            "cli.ssh_config",
            "ssh_config",
            "Let `ssh NAME.vendetta` reach workspaces: include vendetta's entries in "
            "~/.ssh/config.",
        ),
        Lazy("ssh-proxy", "cli.ssh_config", "ssh_proxy", "", hidden=True),
        Lazy("server", "cli.server", "app", "Run the coordinator (the service the CLI talks to)."),
        Lazy("node", "cli.node", "app", "Manage the nodes that run workspaces."),
        Lazy(
            "image",
            "cli.image",
            "app",
            "Images on nodes: list them, or import one from files on this machine.",
        ),
        Lazy(
            "workspace",
            "cli.workspace",
            "app",
            "Create, run and inspect workspaces.",
            extra=(("forward", "cli.forward", "forward"),),
        ),
        Lazy("cluster", "cli.cluster", "app", "The whole cluster at a glance."),
        Lazy("config", "cli.project", "config_app", "Check project configs."),
        Lazy(
            "token",
            "cli.token",
            "app",
            "Tokens for other machines and services (`vendetta server start --listen`).",
        ),
        Lazy(
            "mcp",
            "cli.mcp",
            "mcp",
            "Run an MCP server for AI coding agents (stdio, or HTTPS with --http).",
        ),
    ]
)


def _version(value: bool) -> None:
    if value:
        from common.version import VERSION

        typer.echo(f"vendetta {VERSION}")
        raise typer.Exit()


@app.callback()
def _root(
    home: Annotated[
        Path | None,
        typer.Option(help="Coordinator state folder.", envvar="VENDETTA_HOME", show_default=False),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="A coordinator on another machine, vendetta://HOST:PORT (with VENDETTA_TOKEN "
            "and VENDETTA_TLS_FINGERPRINT); default: this machine's.",
            envvar="VENDETTA_URL",
            show_default=False,
        ),
    ] = None,
    fingerprint: Annotated[
        str | None,
        typer.Option(
            help="The SHA-256 of its TLS certificate, as `server start --listen` printed it.",
            envvar="VENDETTA_TLS_FINGERPRINT",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    if home is not None:
        os.environ["VENDETTA_HOME"] = str(home.expanduser().absolute())
    if url is not None:  # read by cli/remote.py, like the environment
        os.environ["VENDETTA_URL"] = url
    if fingerprint is not None:
        os.environ["VENDETTA_TLS_FINGERPRINT"] = fingerprint


def main() -> None:
    try:
        app()
    except Exception as exc:  # a bug: one line here, the traceback in a file
        from cli.crash import report

        raise SystemExit(report(exc)) from None


if __name__ == "__main__":
    main()
