"""`vendetta token create|list|revoke`: bearer tokens for the coordinator's TLS listener."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated

import typer
from rich.table import Table

from cli.client import coordinator
from cli.output import as_dict, err, out, print_json
from cli.runner import fail, run
from common.config import parse_duration
from common.errors import InvalidArgumentError
from vendetta.v1 import coordinator_pb2 as pb

app = typer.Typer(
    help="Tokens for other machines and services (`vendetta server start --listen`).",
    no_args_is_help=True,
)

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_DAYS = re.compile(r"^(\d+(?:\.\d+)?)d$")


def parse_expires(text: str) -> float:
    """'24h', '30d', '1h30m', 'never' -> seconds (0: never)."""
    text = text.strip()
    if text in ("never", "0", ""):
        return 0.0
    days = _DAYS.match(text)
    try:
        seconds = float(days.group(1)) * 86400 if days else parse_duration(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        fail(InvalidArgumentError(f"--expires {text[:40]!r}: use e.g. 24h, 30d, 1h30m or never"))
    return seconds


def _when(unix_nano: int) -> str:
    if not unix_nano:
        return "never"
    return dt.datetime.fromtimestamp(unix_nano / 1e9).strftime("%Y-%m-%d %H:%M")


def _state(t: pb.Token) -> str:
    if t.revoked_unix_nano:
        return "revoked"
    if t.expires_unix_nano and t.expires_unix_nano <= dt.datetime.now().timestamp() * 1e9:
        return "expired"
    return "active"


@app.command()
def create(
    name: Annotated[str, typer.Option(help="A name to list and revoke it by.")] = "",
    scope: Annotated[
        list[str] | None,
        typer.Option(
            help="read (list, status, logs, watch), operate (also create, up, down, exec, "
            "connect, destroy), admin (also nodes, images, tokens); may repeat. Default: read."
        ),
    ] = None,
    workspace: Annotated[
        list[str] | None,
        typer.Option(help="operate only on this workspace; may repeat. Default: on all."),
    ] = None,
    expires: Annotated[str, typer.Option(help="e.g. 24h, 30d, never.")] = "never",
    json_: Json = False,
) -> None:
    """Make a token; it is printed once (the coordinator keeps only its hash)."""
    seconds = parse_expires(expires)

    async def go() -> pb.CreateTokenResponse:
        async with coordinator() as c:
            return await c.CreateToken(
                pb.CreateTokenRequest(
                    name=name,
                    scopes=scope or [],
                    workspaces=workspace or [],
                    expires_seconds=seconds,
                )
            )

    made = run(go())
    if json_:
        print_json({**as_dict(made.token), "secret": made.secret})
        return
    t = made.token
    err.print(
        f"token {t.name} ({', '.join(t.scopes)}"
        + (f" on {', '.join(t.workspaces)}" if t.workspaces else "")
        + f", expires {_when(t.expires_unix_nano)}); it is shown only now:"
    )
    typer.echo(made.secret)  # alone on stdout: `export VENDETTA_TOKEN=$(vendetta token create)`


@app.command("list")
def list_(json_: Json = False) -> None:
    """Tokens, without their secrets."""

    async def go() -> pb.ListTokensResponse:
        async with coordinator() as c:
            return await c.ListTokens(pb.ListTokensRequest())

    tokens = run(go()).tokens
    if json_:
        print_json([{**as_dict(t), "state": _state(t)} for t in tokens])
        return
    if not tokens:
        out.print("no tokens; make one with `vendetta token create --scope read`")
        return
    table = Table("NAME", "ID", "SCOPES", "WORKSPACES", "STATE", "CREATED", "EXPIRES")
    for t in tokens:
        table.add_row(
            t.name,
            t.id,
            ", ".join(t.scopes),
            ", ".join(t.workspaces) or "all",
            _state(t),
            _when(t.created_unix_nano),
            _when(t.expires_unix_nano),
        )
    out.print(table)


@app.command()
def revoke(
    token: Annotated[str, typer.Argument(help="The token's name or id.")],
) -> None:
    """Revoke a token: calls carrying it are refused from now on."""

    async def go() -> pb.Token:
        async with coordinator() as c:
            return await c.RevokeToken(pb.RevokeTokenRequest(token=token))

    t = run(go())
    out.print(f"token {t.name} ({t.id}) revoked")
