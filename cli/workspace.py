"""`vendetta workspace create|up|down|destroy|list|status|logs|exec`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli import checks
from cli.client import coordinator, request_id
from cli.log_text import log_text
from cli.orphans import register_workspace as register_orphans
from cli.output import ago, as_dict, enum_name, err, out, plain, print_error, print_json, styled
from cli.project import DEFAULT_CONFIG
from cli.runner import run
from cli.ssh_config import included as ssh_included
from cli.workspace_source import progress_line, register, resolve_source, source_lines
from common.display import shown
from common.errors import FailedPreconditionError, VendettaError
from common.ssh_hosts import SUFFIX
from vendetta.v1 import common_pb2, coordinator_pb2_grpc
from vendetta.v1 import coordinator_pb2 as pb

app = typer.Typer(help="Create, run and inspect workspaces.", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Name = Annotated[str, typer.Argument(help="Workspace name.", callback=checks.workspace_name)]


def services_table(ws: pb.Workspace) -> Table:
    rows = []
    for s in ws.services:
        state = enum_name(common_pb2.ServiceState.Name(s.state), "SERVICE_STATE_")
        here = f"http://{s.local_address}" if s.local_address else "-"
        rows.append(
            (s.name, state, here, s.local_note, str(s.port or "-"), str(s.restarts), s.detail)
        )
    table = Table()
    table.add_column("SERVICE", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    # Where to go is the point of the table: never shortened, whatever the width.
    url_width = max((len(r[2]) for r in rows), default=1)
    table.add_column("ON YOUR MACHINE", no_wrap=True, min_width=url_width)
    table.add_column("PORT", no_wrap=True)
    table.add_column("RESTARTS", no_wrap=True)
    table.add_column("DETAIL", ratio=1)
    for name, state, here, note, port, restarts, detail in rows:
        detail = f"{note}; {detail}" if note and detail else note or detail
        # A detail quotes the service's output: text, not markup ("[/x]" raised).
        table.add_row(name, styled(state), here, port, restarts, plain(detail))
    return table


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> int:
    """'10m' (ago) or an ISO time (local unless it says otherwise) -> unix nanoseconds."""
    now = time.time() if now is None else now
    value = text.strip()
    if value[:-1].isascii() and value[:-1].isdigit() and value[-1:] in _UNITS:
        seconds = now - int(value[:-1]) * _UNITS[value[-1]]
    else:
        try:
            seconds = dt.datetime.fromisoformat(value).timestamp()
        except (ValueError, OverflowError, OSError):
            raise ValueError(
                f"--since '{shown(text)}': use a duration like 30s, 10m, 2h, 1d or a time like "
                "2026-11-22T10:00"
            ) from None
    # Nanoseconds in an int64, as the call carries them: 1970 to 2262.
    if not 0 <= seconds < 2**63 / 1e9:
        raise ValueError(
            f"--since '{shown(text)}' is before 1970 or after 2262: use a shorter duration, "
            "or leave --since out for every line"
        )
    return int(seconds * 1e9)


def state_of(ws: pb.Workspace) -> str:
    return enum_name(pb.WorkspaceState.Name(ws.state), "WORKSPACE_STATE_")


def _desired(ws: pb.Workspace) -> str:
    return enum_name(pb.DesiredState.Name(ws.desired), "DESIRED_STATE_")


async def _with_progress(
    c: coordinator_pb2_grpc.CoordinatorAsyncStub,
    name: str,
    what: str,
    call: Callable[[], Awaitable[pb.Workspace]],
) -> pb.Workspace:
    """Run ``call`` while showing the workspace's events under a spinner."""

    async def follow() -> None:
        first = True
        async for ev in c.WatchWorkspace(pb.WatchWorkspaceRequest(name=name)):
            if first:  # the current state, not news
                first = False
                continue
            if ev.HasField("transfer") and not ev.transfer.done:
                spinner.update(progress_line(ev.transfer))
            elif ev.message:
                err.print(f"  {name}: {plain(ev.message)}")

    spinner = err.status(what)
    watcher = asyncio.create_task(follow())
    try:
        with spinner:
            return await call()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher


@app.command()
def create(
    name: Name,
    provider: Annotated[
        str,
        typer.Option(
            help="docker | lxd (lxc) | qemu (default: from config, else docker).",
            callback=checks.provider,
        ),
    ] = "",
    remote: Annotated[
        str | None,
        typer.Option(
            help="Node to run on (default: config, else local).",
            callback=checks.optional_node_name,
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Project config (default: ./.vendetta/config.yaml).")
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            help="The code at the workdir: a folder (a git repository's gets a worktree of its "
            "own) or a git URL (default: the project folder, the one holding "
            ".vendetta/config.yaml)."
        ),
    ] = "",
    no_source: Annotated[bool, typer.Option("--no-source", help="No code inside.")] = False,
    branch: Annotated[
        str, typer.Option(help="git: the workspace's branch (default: vendetta/NAME).")
    ] = "",
    with_changes: Annotated[
        bool,
        typer.Option("--with-changes", help="git: carry the checkout's uncommitted changes along."),
    ] = False,
    json_: Json = False,
) -> None:
    """Create a workspace's environment (stopped) with the project's code at its workdir
    (/workspace); `up` starts it."""
    path = config or DEFAULT_CONFIG
    text = ""
    if config is not None or path.exists():
        text = load_config_or_exit(path)
    origin = resolve_source(source, path if text else None, no_source)

    async def go() -> pb.Workspace:
        async with coordinator() as c:
            return await _with_progress(
                c,
                name,
                f"Creating workspace {name}...",
                lambda: c.CreateWorkspace(
                    pb.CreateWorkspaceRequest(
                        name=name,
                        provider=provider,
                        node=remote or "",
                        config_yaml=text,
                        config_path=str(path.absolute()) if text else "",
                        request_id=request_id(),
                        source=origin,
                        branch=branch,
                        with_changes=with_changes,
                    )
                ),
            )

    ws = run(go())
    if json_:
        print_json(as_dict(ws))
        return
    out.print(
        f"workspace [bold]{ws.name}[/bold] created on node {ws.node} "
        f"({ws.provider}, image {ws.image}); start it with `vendetta workspace up {ws.name}`"
    )
    for line in source_lines(ws):
        out.print(line)


def load_config_or_exit(path: Path) -> str:
    """The config's text, read once (bounded) and checked as the coordinator will."""
    from common.config import parse_config  # pydantic and YAML: only where a config is read
    from common.config_read import read_config_text

    try:
        text = read_config_text(path)
        parse_config(text, str(path))
    except VendettaError as exc:
        print_error(str(exc))
        raise typer.Exit(1) from None
    return text


@app.command()
def up(name: Name, json_: Json = False) -> None:
    """Start the workspace (a running one stays as it is)."""

    async def go() -> tuple[pb.Workspace, list[str]]:
        from common import agent_rules  # rule files for AI agents (config agents.rules)

        async with coordinator() as c:
            # Templates read and checked before anything starts: a wrong one changes nothing.
            got = await c.GetWorkspace(pb.GetWorkspaceRequest(name=name))
            rules = agent_rules.read_rules(Path(got.config_path)) if got.config_path else []
            ws = await _with_progress(
                c,
                name,
                f"Starting workspace {name}...",
                lambda: c.UpWorkspace(pb.WorkspaceRequest(name=name, request_id=request_id())),
            )
            return ws, await agent_rules.install(c, ws, rules)

    ws, rules_written = run(go())
    if json_:
        print_json(as_dict(ws))
        return
    out.print(f"workspace [bold]{ws.name}[/bold] is {styled(state_of(ws))}")
    if ws.services:
        out.print(services_table(ws))
    out.print(f"  node      {ws.node}")
    out.print(f"  provider  {ws.provider} ({ws.image})")
    if ws.addresses:
        out.print(f"  addresses {', '.join(ws.addresses)} (on the node)")
    out.print(f"  shell     vendetta workspace connect {ws.name}")
    ssh_hint = "" if ssh_included() else "  (once: vendetta ssh-config)"
    out.print(f"  ssh       ssh {ws.name}{SUFFIX}{ssh_hint}")
    out.print(f"  logs      vendetta workspace logs {ws.name} -f")
    out.print(f"  run       vendetta workspace exec {ws.name} -- CMD ...")
    for written in rules_written:
        out.print(f"  agents    {written}")


@app.command()
def ports(name: Name, json_: Json = False) -> None:
    """Where each service of the workspace is on this machine."""

    async def go() -> pb.Workspace:
        async with coordinator() as c:
            return await c.GetWorkspace(pb.GetWorkspaceRequest(name=name))

    ws = run(go())
    rows = [
        {
            "service": s.name,
            "port": s.port,
            "local_address": s.local_address,
            "url": f"http://{s.local_address}" if s.local_address else "",
            "node_endpoint": s.node_endpoint,
            "note": s.local_note,
        }
        for s in ws.services
        if s.port
    ]
    if json_:
        print_json(rows)
        return
    if not rows:
        out.print(f"workspace {name} has no service ports (is it up?)")
        return
    table = Table()
    table.add_column("SERVICE", no_wrap=True)
    table.add_column(
        "ON YOUR MACHINE", no_wrap=True, min_width=max(len(str(r["url"])) for r in rows)
    )
    table.add_column("PORT", no_wrap=True)
    table.add_column("ON THE NODE", no_wrap=True)
    table.add_column("NOTE", ratio=1)
    for r in rows:
        table.add_row(
            str(r["service"]),
            str(r["url"] or "-"),
            str(r["port"]),
            str(r["node_endpoint"] or "-"),
            str(r["note"]),
        )
    out.print(table)


@app.command()
def down(name: Name, json_: Json = False) -> None:
    """Stop the workspace gracefully (a stopped one stays as it is)."""

    async def go() -> pb.Workspace:
        async with coordinator() as c:
            return await _with_progress(
                c,
                name,
                f"Stopping workspace {name}...",
                lambda: c.DownWorkspace(pb.WorkspaceRequest(name=name, request_id=request_id())),
            )

    ws = run(go())
    if json_:
        print_json(as_dict(ws))
        return
    out.print(f"workspace [bold]{ws.name}[/bold] is {styled(state_of(ws))}")


@app.command()
def destroy(
    name: Name,
    force: Annotated[
        bool,
        typer.Option(
            help="Forget it even if its node is unreachable, and drop work of its source that "
            "exists nowhere else (commits not pulled, uncommitted changes in its worktree)."
        ),
    ] = False,
) -> None:
    """Remove the workspace and its environment."""

    async def go() -> pb.DestroyWorkspaceResponse:
        async with coordinator() as c:
            with err.status(f"Destroying workspace {name}..."):
                return await c.DestroyWorkspace(
                    pb.WorkspaceRequest(name=name, request_id=request_id(), force=force)
                )

    done = run(go())
    out.print(f"workspace {name} destroyed" + (f"; {done.kept}" if done.kept else ""))


@app.command("list")
def list_(
    node: Annotated[
        str, typer.Option(help="Only this node's workspaces.", callback=checks.node_filter)
    ] = "",
    json_: Json = False,
) -> None:
    """All workspaces with their state."""

    async def go() -> pb.ListWorkspacesResponse:
        async with coordinator() as c:
            return await c.ListWorkspaces(pb.ListWorkspacesRequest(node=node))

    resp = run(go())
    if json_:
        print_json([as_dict(w) for w in resp.workspaces])
        return
    if not resp.workspaces:
        out.print("no workspaces; create one with `vendetta workspace create NAME`")
        return
    table = Table("NAME", "NODE", "PROVIDER", "IMAGE", "STATE", "DESIRED", "UPDATED")
    for w in resp.workspaces:
        table.add_row(
            w.name,
            w.node,
            w.provider,
            w.image,
            styled(state_of(w)),
            _desired(w),
            ago(w.updated_unix_nano),
        )
    out.print(table)


@app.command()
def status(
    name: Name,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow changes.")] = False,
    json_: Json = False,
) -> None:
    """One workspace's state (with --watch, every change until Ctrl-C)."""

    async def go() -> None:
        async with coordinator() as c:
            ws = await c.GetWorkspace(pb.GetWorkspaceRequest(name=name))
            _show(ws, json_)
            if watch:
                first = True
                async for ev in c.WatchWorkspace(pb.WatchWorkspaceRequest(name=name)):
                    if first:
                        first = False
                        continue
                    if json_:
                        print_json(as_dict(ev))
                    else:
                        out.print(f"{styled(state_of(ev.workspace))}: {plain(ev.message)}")
                    if ev.workspace.state == pb.WORKSPACE_STATE_DESTROYED:
                        return

    run(go())


def _show(ws: pb.Workspace, json_: bool) -> None:
    if json_:
        print_json(as_dict(ws))
        return
    out.print(f"[bold]{ws.name}[/bold]: {styled(state_of(ws))} (desired: {_desired(ws)})")
    out.print(f"  node     {ws.node}\n  provider {ws.provider}\n  image    {ws.image}")
    if ws.environment_id:
        out.print(f"  env id   {ws.environment_id[:12]}")
    if ws.detail:
        out.print(f"  detail   {plain(ws.detail)}")
    for line in source_lines(ws):
        out.print(line)
    out.print(f"  created  {ago(ws.created_unix_nano)}, updated {ago(ws.updated_unix_nano)}")
    if ws.services:
        out.print(services_table(ws))


@app.command()
def logs(
    name: Name,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    tail: Annotated[
        int, typer.Option(help="Only the last N lines (0: all).", callback=checks.tail)
    ] = 0,
    service: Annotated[
        str, typer.Option(help="Only this service's output.", callback=checks.service_name)
    ] = "",
    since: Annotated[
        str, typer.Option(help="Only lines since a time: 30s, 10m, 2h, 1d or 2026-11-22T10:00.")
    ] = "",
) -> None:
    """The workspace's output (with -f, until Ctrl-C or the workspace stops)."""
    try:
        since_ns = parse_since(since) if since else 0
    except ValueError as exc:
        checks.usage_error(str(exc))

    async def go() -> None:
        async with coordinator() as c:
            stream = c.StreamLogs(
                pb.StreamLogsRequest(
                    name=name,
                    follow=follow,
                    tail=tail,
                    service=service,
                    since_unix_nano=since_ns,
                    compact=True,
                )
            )
            # One write of bytes per batch (a busy log brings hundreds of lines at a time).
            sys.stdout.flush()
            raw = sys.stdout.buffer
            prefix = not service
            async for batch in stream:
                raw.write(log_text(batch, prefix=prefix))
                raw.flush()

    run(go())


# Names of the capability flags an agent reports per provider (ProviderInfo.capabilities).
TERMINAL = "terminal"  # interactive terminals
STDIN = "stdin"  # input reaches a command run without a terminal


def input_piped() -> bool:
    """Whether our stdin is a pipe, a file or a socket: input meant for the command
    (a terminal or /dev/null is not)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):  # closed, or not a file descriptor
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


async def provider_capabilities(
    c: coordinator_pb2_grpc.CoordinatorAsyncStub, workspace: str
) -> tuple[str, frozenset[str]] | None:
    """The workspace's provider and the capabilities its node reports for it; None
    while the node has reported none (the session then says what fails)."""
    ws = await c.GetWorkspace(pb.GetWorkspaceRequest(name=workspace))
    node = await c.GetNode(pb.GetNodeRequest(name=ws.node))
    for info in node.providers:
        if info.name == ws.provider:
            return ws.provider, frozenset(info.capabilities)
    return None


async def check_session(
    c: coordinator_pb2_grpc.CoordinatorAsyncStub,
    workspace: str,
    *,
    terminal: bool,
    piped_input: bool,
) -> str | None:
    """Ask the workspace's provider what it can do before a session that needs it:
    raise if a terminal is asked of one without; the warning to print if piped input
    would not reach the command."""
    if not (terminal or piped_input):
        return None
    found = await provider_capabilities(c, workspace)
    if found is None:
        return None
    provider, capabilities = found
    if terminal and TERMINAL not in capabilities:
        raise FailedPreconditionError(
            f"workspace {workspace!r} runs on {provider}, which has no interactive terminals: "
            f"run a command instead, `vendetta workspace connect {workspace} -- CMD ...`"
        )
    if piped_input and STDIN not in capabilities:
        return (
            f"input is not passed to commands on {provider}: this one in {workspace!r} "
            "runs with none (-n says so and leaves ours unread)"
        )
    return None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def connect(
    name: Name,
    command: Annotated[
        list[str] | None, typer.Argument(help="A command to run instead of a shell (after --).")
    ] = None,
    no_stdin: Annotated[
        bool,
        typer.Option(
            "--no-stdin",
            "-n",
            help="Without a terminal: give the command no input, and leave ours unread.",
        ),
    ] = False,
) -> None:
    """Open a shell inside the workspace (or run `-- CMD ...`); its exit code becomes ours.

    Without a terminal, what is piped in reaches the command's stdin where the
    workspace's provider passes input (its `stdin` capability in `vendetta node
    status`); where it does not, a warning says so.
    """
    from cli.terminal import session

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if not command and not interactive:
        err.print(
            "[red]error:[/red] no terminal here for a shell: run a command instead, "
            f"`vendetta workspace connect {name} -- CMD ...`",
            markup=True,
        )
        raise typer.Exit(1)

    piped = not interactive and not no_stdin and input_piped()

    async def go() -> int:
        async with coordinator() as c:
            warning = await check_session(c, name, terminal=interactive, piped_input=piped)
            if warning:
                err.print(f"[yellow]warning:[/yellow] {warning}", markup=True)
            return await session(c, name, list(command or []), interactive, not no_stdin)

    raise typer.Exit(run(go()))


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    name: Name,
    command: Annotated[list[str], typer.Argument(help="Command and arguments (after --).")],
) -> None:
    """Run a command inside the workspace; its exit code becomes ours."""

    async def go() -> int:
        async with coordinator() as c:
            code = 0
            async for o in c.ExecWorkspace(pb.ExecWorkspaceRequest(name=name, argv=command)):
                kind = o.WhichOneof("output")
                if kind == "stdout":
                    sys.stdout.buffer.write(o.stdout)
                    sys.stdout.flush()
                elif kind == "stderr":
                    sys.stderr.buffer.write(o.stderr)
                    sys.stderr.flush()
                elif kind == "exit_code":
                    code = o.exit_code
            return code

    code = run(go())
    raise typer.Exit(code)


register(app)  # push, pull
register_orphans(app)  # adopt
