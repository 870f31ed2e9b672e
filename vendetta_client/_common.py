"""What the sync and async clients share: calls' defaults, retries' rules, settings."""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any

import grpc

from vendetta_client import connect
from vendetta_client.errors import from_server

# Seconds a call may take when the caller gives no timeout. Reads answer quickly; up,
# create and the like take what their work takes (an image pull, health checks).
READ_TIMEOUT = 30.0
ACT_TIMEOUT = 900.0

# Calls safe to send again when the connection failed before an answer: reads, and
# mutations carrying a request id (the coordinator answers a repeat with the first result).
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
BACKOFF = (0.5, 1.0, 2.0, 4.0)


def request_id() -> str:
    return uuid.uuid4().hex


def retryable(exc: grpc.RpcError) -> bool:
    return exc.code() in RETRY_CODES and not from_server(exc)


@dataclasses.dataclass(frozen=True)
class Settings:
    endpoint: connect.Endpoint
    token: str
    fingerprint: str
    ca_file: str
    retries: int

    @classmethod
    def resolve(
        cls,
        target: str | None,
        token: str | None,
        fingerprint: str | None,
        ca_file: str | None,
        retries: int,
    ) -> Settings:
        """Arguments first, else the environment the CLI reads (only when no target was
        given: a token meant for VENDETTA_URL is never sent to another target)."""
        from_env = target is None
        endpoint = connect.parse_target(target)

        def pick(given: str | None, env: str) -> str:
            if given is not None:
                return given
            return os.environ.get(env, "").strip() if from_env else ""

        return cls(
            endpoint,
            pick(token, connect.TOKEN_ENV),
            pick(fingerprint, connect.FINGERPRINT_ENV),
            pick(ca_file, connect.CA_ENV),
            retries,
        )

    def channel_args(self) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
        """Credentials (None: the local socket) and options; blocking over TLS."""
        if not self.endpoint.tls:
            return None, list(connect.CHANNEL_OPTIONS)
        creds, extra = connect.credentials(
            self.endpoint, self.token, self.fingerprint, self.ca_file
        )
        return creds, [*connect.CHANNEL_OPTIONS, *extra]


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What a command run inside a workspace did."""

    exit_code: int
    stdout: bytes
    stderr: bytes
