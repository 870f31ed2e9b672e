"""`vendetta`: remote dev environments on Docker, LXD and QEMU/KVM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cli import cluster, image, node, project, server, ssh_config, workspace
from common.version import VERSION

app = typer.Typer(
    help="vendetta: remote dev environments with a local-devcontainer feel.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(server.app, name="server")
app.add_typer(node.app, name="node")
app.add_typer(image.app, name="image")
app.add_typer(workspace.app, name="workspace")
app.add_typer(cluster.app, name="cluster")
app.add_typer(project.config_app, name="config")
app.command()(project.init)
app.command("ssh-config")(ssh_config.ssh_config)
app.command("ssh-proxy", hidden=True)(ssh_config.ssh_proxy)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vendetta {VERSION}")
        raise typer.Exit()


@app.callback()
def _root(
    home: Annotated[
        Path | None,
        typer.Option(help="Coordinator state folder.", envvar="VENDETTA_HOME", show_default=False),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    if home is not None:
        os.environ["VENDETTA_HOME"] = str(home.expanduser().absolute())


def main() -> None:
    try:
        app()
    except Exception as exc:  # a bug: one line here, the traceback in a file
        from cli.crash import report

        raise SystemExit(report(exc)) from None


if __name__ == "__main__":
    main()
