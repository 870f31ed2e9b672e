"""Tokens (hashing, expiry, revocation), the method-to-scope table against the service
descriptor, the interceptor's checks, and the client's URL and fingerprint rules."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from common.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from common.remote import Target, normalize_fingerprint, parse_url
from coordinator import scopes, tls
from coordinator.auth import authorize, bearer, check_call, check_request
from coordinator.store import SqliteStore
from coordinator.tokens import TokenRecord, TokenService, UnauthenticatedError, parse
from vendetta.v1 import common_pb2, coordinator_pb2


@pytest.fixture
async def service(tmp_path: Path) -> TokenService:
    return TokenService(SqliteStore(tmp_path / "state.db"))


def test_every_coordinator_method_has_a_scope() -> None:
    """A new RPC without a row in coordinator/scopes.py fails here (and is refused on
    the listener); a row for a method that is gone fails too."""
    methods = {m.name for m in coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods}
    assert set(scopes.METHODS) == methods
    for name, rule in scopes.METHODS.items():
        assert rule.scope in ("read", "operate", "admin"), name
        if rule.workspace:  # the field a workspace limit is checked against exists
            method = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods_by_name[
                name
            ]
            message = method.input_type
            for part in rule.workspace.split("."):
                field = message.fields_by_name[part]
                message = field.message_type or message
            assert field.type == field.TYPE_STRING, name
    assert scopes.rule_for("/vendetta.v1.Coordinator/Nope") is None
    assert scopes.rule_for("/other.Service/ListNodes") is None


async def test_a_token_is_stored_as_a_hash_and_found_by_its_id(
    service: TokenService, tmp_path: Path
) -> None:
    record, token = await service.create("ci", ["operate"], ["api"], 0, created_by="socket")
    parsed = parse(token)
    assert parsed is not None and parsed[0] == record.id
    assert record.secret_hash != parsed[1] and len(record.secret_hash) == 64
    assert (await service.authenticate(token)).name == "ci"
    await service.store.close()
    db = (tmp_path / "state.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("state.db-*")
    )
    assert parsed[1].encode() not in db and token.encode() not in db
    assert record.secret_hash.encode() in db


async def test_wrong_malformed_expired_and_revoked_tokens_are_refused(
    service: TokenService,
) -> None:
    good, token = await service.create("", [], [], 0, created_by="socket")
    assert good.name == f"token-{good.id}" and good.scopes == ["read"]
    token_id, secret = parse(token) or ("", "")
    wrong = f"vdt_{token_id}_{'A' * 43}"
    unknown = f"vdt_{'0' * 12}_{secret}"
    for bad, why in ((wrong, "not known"), (unknown, "not known"), ("abc", "malformed")):
        with pytest.raises(UnauthenticatedError, match=why) as refused:
            await service.authenticate(bad)
        assert secret not in refused.value.message
    short, short_token = await service.create("short", [], [], 0.2, created_by="socket")
    assert short.expires_unix_nano > short.created_unix_nano
    deadline = time.monotonic() + 10
    while not short.expired():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    with pytest.raises(UnauthenticatedError, match="'short' has expired"):
        await service.authenticate(short_token)
    revoked = await service.revoke(good.name)
    assert revoked.revoked_unix_nano
    with pytest.raises(UnauthenticatedError, match="was revoked"):
        await service.authenticate(token)
    again = await service.revoke(good.id)  # by id, and twice is fine
    assert again.revoked_unix_nano == revoked.revoked_unix_nano
    with pytest.raises(NotFoundError, match="token list"):
        await service.revoke("nope")


async def test_bad_token_requests_say_what_to_give(service: TokenService) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown scope"):
        await service.create("x", ["root"], [], 0, created_by="socket")
    with pytest.raises(InvalidArgumentError, match="add --scope operate"):
        await service.create("x", ["read"], ["api"], 0, created_by="socket")
    with pytest.raises(InvalidArgumentError, match="admin token acts on every"):
        await service.create("x", ["admin"], ["api"], 0, created_by="socket")
    with pytest.raises(InvalidArgumentError, match="invalid token name"):
        await service.create("Bad Name", [], [], 0, created_by="socket")
    with pytest.raises(InvalidArgumentError, match="--expires"):
        await service.create("x", [], [], -1, created_by="socket")
    with pytest.raises(InvalidArgumentError, match="--expires"):
        await service.create("x", [], [], float("nan"), created_by="socket")
    await service.create("x", [], [], 0, created_by="socket")
    with pytest.raises(AlreadyExistsError):
        await service.create("x", [], [], 0, created_by="socket")


def _record(scopes_: list[str], workspaces: list[str] | None = None) -> TokenRecord:
    return TokenRecord("0" * 12, "t", "", scopes_, workspaces or [], 0)


def test_scopes_include_the_narrower_ones_and_workspace_limits_hold() -> None:
    read, operate, admin = (scopes.METHODS[m] for m in ("ListNodes", "UpWorkspace", "AddNode"))
    path = "/vendetta.v1.Coordinator/"
    check_call(_record(["admin"]), read, path + "ListNodes")
    check_call(_record(["operate"]), operate, path + "UpWorkspace")
    with pytest.raises(PermissionDeniedError, match="needs admin"):
        check_call(_record(["operate"]), admin, path + "AddNode")
    with pytest.raises(PermissionDeniedError, match="needs operate"):
        check_call(_record(["read"]), operate, path + "UpWorkspace")
    limited = _record(["operate"], ["api"])
    check_request(
        limited, operate, path + "UpWorkspace", coordinator_pb2.WorkspaceRequest(name="api")
    )
    with pytest.raises(PermissionDeniedError, match="only on workspace"):
        check_request(
            limited, operate, path + "UpWorkspace", coordinator_pb2.WorkspaceRequest(name="web")
        )
    start = common_pb2.AttachInput(start=common_pb2.AttachStart(workspace="web"))
    with pytest.raises(PermissionDeniedError, match="only on workspace"):
        check_request(limited, scopes.METHODS["Connect"], path + "Connect", start)
    # Over the network, a source is never a folder of the coordinator's machine.
    create = scopes.METHODS["CreateWorkspace"]
    for source in ("/etc", "file:///root/repo", "git@github.com:x/y"):
        with pytest.raises(PermissionDeniedError, match="https:// git URL"):
            check_request(
                _record(["admin"]),
                create,
                path + "CreateWorkspace",
                coordinator_pb2.CreateWorkspaceRequest(name="a", source=source),
            )
    https = coordinator_pb2.CreateWorkspaceRequest(name="api", source="https://x.org/r.git")
    with pytest.raises(PermissionDeniedError, match="machine's network and git credentials"):
        check_request(limited, create, path + "CreateWorkspace", https)
    check_request(_record(["admin"]), create, path + "CreateWorkspace", https)
    check_request(limited, create, path + "CreateWorkspace", _no_source("api"))


def _no_source(name: str) -> coordinator_pb2.CreateWorkspaceRequest:
    return coordinator_pb2.CreateWorkspaceRequest(name=name)


def test_bearer_reads_only_the_authorization_header() -> None:
    assert bearer((("authorization", "Bearer vdt_x"),)) == "vdt_x"
    assert bearer((("authorization", "bearer  vdt_x "),)) == "vdt_x"
    assert bearer((("authorization", "Basic abc"),)) == ""
    assert bearer((("x-token", "vdt_x"),)) == ""
    assert bearer(None) == ""


def test_urls_and_fingerprints() -> None:
    assert parse_url("vendetta://build1:7443") == Target("build1", 7443)
    assert parse_url("https://10.0.0.5:7443/") == Target("10.0.0.5", 7443)
    assert parse_url("[::1]:7443") == Target("::1", 7443)
    assert Target("::1", 7443).address == "[::1]:7443"
    for plain in ("http://build1:7443", "grpc://build1:7443", "unix:/tmp/x"):
        with pytest.raises(InvalidArgumentError, match="over TLS only"):
            parse_url(plain)
    for bad in ("build1", "vendetta://build1", "vendetta://:7443", "vendetta://h:99999"):
        with pytest.raises(InvalidArgumentError, match="vendetta://HOST:PORT"):
            parse_url(bad)
    fp = "AB:" * 31 + "CD"
    assert normalize_fingerprint(fp.replace(":", "").lower()) == fp
    assert normalize_fingerprint("SHA256:" + fp) == fp
    with pytest.raises(InvalidArgumentError, match="64 digits"):
        normalize_fingerprint("AB:CD")


def test_self_signed_pair_is_private_and_kept(tmp_path: Path) -> None:
    cert, key = tls.self_signed(tmp_path, "127.0.0.1")
    assert os.stat(tmp_path / "tls" / "key.pem").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "tls").st_mode & 0o777 == 0o700
    assert tls.self_signed(tmp_path, "127.0.0.1") == (cert, key)  # pins stay good
    fp = tls.fingerprint_of_pem(cert)
    assert len(fp) == 95 and fp == normalize_fingerprint(fp)
    # The user's own pair: checked before the coordinator starts.
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    os.chmod(tmp_path / "k.pem", 0o644)
    with pytest.raises(InvalidArgumentError, match="chmod 600"):
        tls.load_pair(tmp_path / "c.pem", tmp_path / "k.pem")
    os.chmod(tmp_path / "k.pem", 0o600)
    assert tls.load_pair(tmp_path / "c.pem", tmp_path / "k.pem") == (cert, key)
    other_cert, _ = tls._self_signed("x")
    (tmp_path / "o.pem").write_bytes(other_cert)
    with pytest.raises(InvalidArgumentError, match="does not belong"):
        tls.load_pair(tmp_path / "o.pem", tmp_path / "k.pem")
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        tls.load_pair(tmp_path / "none.pem", tmp_path / "k.pem")


def test_listen_addresses_must_be_given_whole() -> None:
    from coordinator.listener import check_config, is_loopback, parse_listen

    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:7443") == ("::1", 7443)
    for bad in (":7443", "7443", "0.0.0.0", "h:x", "h:70000"):
        with pytest.raises(InvalidArgumentError, match="HOST:PORT"):
            parse_listen(bad)
    assert is_loopback("127.0.0.5") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    assert check_config(None, None, None) is None
    with pytest.raises(InvalidArgumentError, match="both --tls-cert and --tls-key"):
        check_config("127.0.0.1:0", Path("c"), None)
    with pytest.raises(InvalidArgumentError, match="need --listen"):
        check_config(None, Path("c"), Path("k"))
    with socket.socket() as taken:  # said before the coordinator starts, in words
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InvalidArgumentError, match="Address already in use"):
            check_config(f"127.0.0.1:{port}", None, None)


async def test_state_from_before_tokens_opens(tmp_path: Path) -> None:
    """An older state.db (no tokens table) gets one; its other rows stay."""
    store = SqliteStore(tmp_path / "state.db")
    await store.put_request("r1", "UpWorkspace", b"x")
    await store.close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("DROP TABLE tokens")
    db.close()
    service = TokenService(SqliteStore(tmp_path / "state.db"))
    assert await service.store.get_request("r1") == ("UpWorkspace", b"x")
    _, token = await service.create("after", ["read"], [], 0, created_by="socket")
    assert (await service.authenticate(token)).name == "after"
    await service.store.close()


async def test_authorize_holds_other_front_doors_to_the_same_rules(service: TokenService) -> None:
    _, limited = await service.create("lim", ["operate"], ["api"], 0, created_by="socket")
    record = await authorize(service, limited, "operate", "run", "api")
    assert record.name == "lim"
    with pytest.raises(PermissionDeniedError, match="only on workspace"):
        await authorize(service, limited, "operate", "run", "web")
    with pytest.raises(PermissionDeniedError, match="run needs admin"):
        await authorize(service, limited, "admin", "run")
    with pytest.raises(UnauthenticatedError, match="no token"):
        await authorize(service, "", "read", "list")


def test_docs_list_each_method_under_its_scope() -> None:
    """docs/api.md's scope table is the table's own (a new method is documented too)."""
    doc = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    for scope in ("read", "operate", "admin"):
        row = re.search(rf"^\| {scope} \| (.*) \|$", doc, re.MULTILINE)
        assert row is not None, scope
        listed = {m.strip() for m in row.group(1).split(",")}
        assert listed == {m for m, r in scopes.METHODS.items() if r.scope == scope}, scope


def test_token_expiry_as_people_write_it(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from cli.token import parse_expires

    assert parse_expires("30d") == 30 * 86400
    assert parse_expires("24h") == parse_expires("1440m") == 86400
    assert parse_expires("1h30m") == 5400
    assert parse_expires("never") == parse_expires("0") == 0
    for bad in ("soon", "-1h", "1y"):
        with pytest.raises(typer.Exit):
            parse_expires(bad)
        assert "use e.g. 24h, 30d" in capsys.readouterr().err
