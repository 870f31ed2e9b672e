"""A workspace's source on the CLI's side: `create`'s default source and options, the
lines `status` shows, progress of transfers, and `workspace push|pull`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from cli.client import coordinator
from cli.output import as_dict, err, out, print_json
from cli.runner import fail, run
from common.errors import InvalidArgumentError, NotFoundError
from vendetta.v1 import coordinator_pb2 as pb

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Name = Annotated[str, typer.Argument(help="Workspace name.")]

_URL_RE = re.compile(r"^([a-z][a-z0-9+.-]*://|[\w.-]+@[\w.-]+:)", re.IGNORECASE)


def project_folder(config: Path) -> Path:
    """The project folder of a config: the folder holding `.vendetta/config.yaml`."""
    folder = config.absolute().parent
    return folder.parent if folder.name == ".vendetta" else folder


def resolve_source(source: str, config: Path | None, no_source: bool) -> str:
    """What `create` sends as the source: a git URL as given, a folder made absolute,
    else the project folder when there is a config; "" for none."""
    if no_source:
        if source:
            fail(InvalidArgumentError("give either --source or --no-source, not both"))
        return ""
    if source:
        if _URL_RE.match(source):
            return source
        folder = Path(source).expanduser().absolute()
        if not folder.is_dir():
            fail(NotFoundError(f"--source {source}: no such folder (give a folder or a git URL)"))
        return str(folder)
    return str(project_folder(config)) if config is not None else ""


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def progress_line(t: pb.SourceTransfer) -> str:
    """One line of a transfer in progress: files, bytes (of how many), rate."""
    rate = t.bytes / t.seconds if t.seconds > 0 else 0.0
    verb = "sending" if t.direction == "send" else "receiving"
    files = f"{t.files}/{t.total_files} files" if t.total_files else f"{t.files} files"
    size = f"{human(t.bytes)}/{human(t.total_bytes)}" if t.total_bytes else human(t.bytes)
    return f"{verb} the source: {files}, {size}, {human(rate)}/s"


def source_lines(ws: pb.Workspace) -> list[str]:
    """What `status` says of the source (empty when it has none)."""
    s = ws.source
    if not s.kind:
        return []
    if s.kind == "git":
        where = f"git {s.origin}, branch {s.branch}"
        if s.path != s.origin:
            where += f" (its worktree here: {s.path})"
    else:
        where = f"folder {s.path}"
    mode = s.mode or "not reported by the node"
    how = (
        "live: the node shares this disk"
        if s.transport == "live"
        else f"shipped to node {ws.node} at {s.node_path}: `vendetta workspace push|pull {ws.name}`"
    )
    lines = [f"  source   {where}", f"  inside   {s.workdir or '/workspace'}, {mode}; {how}"]
    if ws.rebuild_pending:
        lines.append(
            f"  config   changed since its environment was made: `vendetta workspace rebuild "
            f"{ws.name}` applies it"
        )
    return lines


def _transfer(name: str, pull: bool, force: bool, json_: bool) -> None:
    async def go() -> pb.SourceTransfer:
        async with coordinator() as c:
            request = pb.SourceTransferRequest(name=name, force=force)
            stream = c.PullWorkspace(request) if pull else c.PushWorkspace(request)
            done = pb.SourceTransfer()
            verb = "Pulling" if pull else "Pushing"
            with err.status(f"{verb} workspace {name}'s source...") as status:
                async for t in stream:
                    if t.done:
                        done = t
                    else:
                        status.update(progress_line(t))
            return done

    done = run(go())
    if json_:
        print_json(as_dict(done))
        return
    out.print(f"{name}: {done.summary}")


def register(app: typer.Typer) -> None:
    @app.command()
    def push(name: Name, json_: Json = False) -> None:
        """Send the source's changes since the last transfer to a workspace on a remote
        node (files changed, added and deleted; ignored files stay here)."""
        _transfer(name, pull=False, force=False, json_=json_)

    @app.command()
    def pull(
        name: Name,
        force: Annotated[
            bool, typer.Option(help="A folder: overwrite files changed here too.")
        ] = False,
        json_: Json = False,
    ) -> None:
        """Bring a remote workspace's work back: a git source's commits onto its branch
        (vendetta/NAME) here, or a folder's changed files (refusing to overwrite files
        changed here as well, unless --force)."""
        _transfer(name, pull=True, force=force, json_=json_)

    @app.command()
    def rebuild(
        name: Name,
        force: Annotated[
            bool,
            typer.Option(help="QEMU: copy the source in again, losing what changed inside."),
        ] = False,
        json_: Json = False,
    ) -> None:
        """Recreate the workspace's environment with its config read again, as `up`
        does (a new image, provider, resources, ports, workdir or user), keeping
        /workspace and its branch; a running workspace is started again."""
        _rebuild(name, force, json_)


def _rebuild(name: str, force: bool, json_: bool) -> None:
    from cli.client import request_id
    from cli.output import styled
    from cli.workspace import _with_progress, services_table, state_of

    async def go() -> pb.Workspace:
        async with coordinator() as c:
            return await _with_progress(
                c,
                name,
                f"Rebuilding workspace {name}...",
                lambda: c.RebuildWorkspace(
                    pb.WorkspaceRequest(name=name, request_id=request_id(), force=force)
                ),
            )

    ws = run(go())
    if json_:
        print_json(as_dict(ws))
        return
    out.print(
        f"workspace [bold]{ws.name}[/bold] rebuilt on node {ws.node} ({ws.provider}, image "
        f"{ws.image}): {styled(state_of(ws))}"
    )
    if ws.services:
        out.print(services_table(ws))
    for line in source_lines(ws):
        out.print(line)
