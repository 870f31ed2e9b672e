"""Bearer tokens for the TLS listener: made, checked, listed and revoked here.

A token reads ``vdt_<id>_<secret>``: the id (12 hex digits) is public and finds
the row at once; the secret (32 random bytes, base64url) is kept only as its
SHA-256 and compared in constant time. Nothing here logs or returns a secret
except :meth:`TokenService.create`, once.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import re
import secrets
import time
from typing import TYPE_CHECKING

from common.errors import InvalidArgumentError, NotFoundError, VendettaError
from common.names import validate_name

if TYPE_CHECKING:
    from coordinator.store import Store

PREFIX = "vdt_"
SCOPES = ("read", "operate", "admin")  # each includes the ones before it
_TOKEN_RE = re.compile(r"^vdt_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
MAX_EXPIRES_SECONDS = 10 * 365 * 86400.0


class UnauthenticatedError(VendettaError):
    """No token, or one that is not (or no longer) good: the call is UNAUTHENTICATED."""


@dataclasses.dataclass
class TokenRecord:
    id: str
    name: str
    secret_hash: str  # hex SHA-256 of the secret part
    scopes: list[str]
    workspaces: list[str]
    created_unix_nano: int
    expires_unix_nano: int = 0
    revoked_unix_nano: int = 0
    created_by: str = ""

    def grants(self, scope: str) -> bool:
        """Whether the token holds ``scope`` or a wider one."""
        need = SCOPES.index(scope)
        return any(SCOPES.index(s) >= need for s in self.scopes if s in SCOPES)

    def expired(self, now_ns: int | None = None) -> bool:
        now = time.time_ns() if now_ns is None else now_ns
        return self.expires_unix_nano != 0 and now >= self.expires_unix_nano


def astuple(t: TokenRecord) -> tuple[object, ...]:
    """Its fields in order: the columns of the store's tokens table."""
    return dataclasses.astuple(t)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token() -> tuple[str, str, str]:
    """(id, secret, the whole token as given to the user)."""
    token_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return token_id, secret, f"{PREFIX}{token_id}_{secret}"


def parse(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    m = _TOKEN_RE.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


def check_scopes(scopes: list[str], workspaces: list[str]) -> list[str]:
    scopes = scopes or ["read"]
    for s in scopes:
        if s not in SCOPES:
            raise InvalidArgumentError(
                f"unknown scope {s[:40]!r}: use read, operate or admin (--scope may repeat)"
            )
    for w in workspaces:
        validate_name("workspace", w)
    if workspaces and "admin" in scopes:
        raise InvalidArgumentError(
            "an admin token acts on every workspace: drop --workspace, or give "
            "--scope operate with --workspace"
        )
    if workspaces and "operate" not in scopes:
        raise InvalidArgumentError("--workspace limits operate: add --scope operate")
    return sorted(set(scopes), key=SCOPES.index)


class TokenService:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def create(
        self,
        name: str,
        scopes: list[str],
        workspaces: list[str],
        expires_seconds: float,
        created_by: str,
    ) -> tuple[TokenRecord, str]:
        """The new token's record and its whole text (shown once, never stored)."""
        scopes = check_scopes(list(scopes), list(workspaces))
        if not 0 <= expires_seconds <= MAX_EXPIRES_SECONDS:
            raise InvalidArgumentError("--expires must be positive and at most 10 years")
        token_id, secret, whole = new_token()
        name = validate_name("token", name) if name else f"token-{token_id}"
        now = time.time_ns()
        record = TokenRecord(
            id=token_id,
            name=name,
            secret_hash=hash_secret(secret),
            scopes=scopes,
            workspaces=sorted(set(workspaces)),
            created_unix_nano=now,
            expires_unix_nano=now + int(expires_seconds * 1e9) if expires_seconds else 0,
            created_by=created_by,
        )
        await self.store.add_token(record)
        return record, whole

    async def list(self) -> list[TokenRecord]:
        return await self.store.list_tokens()

    async def find(self, name_or_id: str) -> TokenRecord:
        for t in await self.store.list_tokens():
            if name_or_id in (t.name, t.id):
                return t
        raise NotFoundError(
            f"no token named {name_or_id[:70]!r}: `vendetta token list` shows names and ids"
        )

    async def revoke(self, name_or_id: str) -> TokenRecord:
        record = await self.find(name_or_id)
        if not record.revoked_unix_nano:
            record.revoked_unix_nano = time.time_ns()
            await self.store.revoke_token(record.id, record.revoked_unix_nano)
        return record

    async def authenticate(self, token: str) -> TokenRecord:
        """The record of a good token, else UnauthenticatedError saying why (never
        quoting what was given)."""
        parsed = parse(token)
        if parsed is None:
            raise UnauthenticatedError(
                "the token is malformed: give the whole vdt_... text `vendetta token create` "
                "printed, as `authorization: Bearer TOKEN` (the CLI: VENDETTA_TOKEN)"
            )
        record = await self.store.get_token(parsed[0])
        # Compared even when there is no such id, so both take the same time.
        expected = record.secret_hash if record else hash_secret("")
        if not hmac.compare_digest(expected, hash_secret(parsed[1])) or record is None:
            raise UnauthenticatedError(
                "the token is not known to this coordinator: ask its owner for one "
                "(`vendetta token create`)"
            )
        if record.revoked_unix_nano:
            raise UnauthenticatedError(
                f"token {record.name!r} was revoked: ask the coordinator's owner for a new one"
            )
        if record.expired():
            raise UnauthenticatedError(
                f"token {record.name!r} has expired: ask the coordinator's owner for a new one"
            )
        return record
