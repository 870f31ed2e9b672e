"""Where the coordinator is and how its certificate is trusted.

``vendetta://HOST:PORT`` (or ``https://``, ``grpcs://``, bare ``HOST:PORT``) is its
TLS listener: the certificate is trusted because its SHA-256 matches a pinned
fingerprint (the one ``vendetta server start --listen`` printed), or because the
system's CAs (or a given CA file) verify it for the host's name. An unknown
certificate is refused with its fingerprint; nothing is trusted on first use.
``unix:PATH`` is a coordinator's socket on this machine (no token: its owner only).
With no target, VENDETTA_URL names one, else the local socket is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import grpc

from vendetta_client.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError

URL_ENV = "VENDETTA_URL"
TOKEN_ENV = "VENDETTA_TOKEN"
FINGERPRINT_ENV = "VENDETTA_TLS_FINGERPRINT"
CA_ENV = "VENDETTA_TLS_CA"

_SECURE = ("vendetta://", "https://", "grpcs://")
_PLAIN = ("http://", "grpc://", "tcp://")

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Pings keep long calls (up, logs -f) alive through idle NATs and find a dead peer.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A resolved coordinator: ``address`` for grpc, ``tls`` False for a unix socket."""

    address: str
    tls: bool
    host: str = ""
    port: int = 0


def local_socket() -> Path:
    home = os.environ.get("VENDETTA_HOME")
    if home:
        return Path(home).expanduser() / "coordinator.sock"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "vendetta" / "coordinator.sock"


def parse_target(target: str | None) -> Endpoint:
    text = (target if target is not None else os.environ.get(URL_ENV, "")).strip()
    if not text:
        return Endpoint(f"unix:{local_socket()}", tls=False)
    if text.startswith("unix:"):
        return Endpoint(text, tls=False)
    lower = text.lower()
    if lower.startswith(_PLAIN):
        raise InvalidArgumentError(
            f"{text[:80]!r}: a coordinator is reached over TLS only: give vendetta://HOST:PORT"
        )
    for scheme in _SECURE:
        if lower.startswith(scheme):
            text = text[len(scheme) :]
            break
    host, sep, port = text.rstrip("/").rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(
            f"{text[:80]!r}: give vendetta://HOST:PORT, e.g. vendetta://build1:7443"
        )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Endpoint(address, tls=True, host=host, port=int(port))


def fingerprint_of(der: bytes) -> str:
    """SHA-256 of a certificate, as `openssl x509 -fingerprint -sha256` shows it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def normalize_fingerprint(text: str) -> str:
    hexits = text.strip().upper().removeprefix("SHA256:").removeprefix("SHA256=")
    hexits = hexits.replace(":", "").replace(" ", "")
    if len(hexits) != 64 or any(c not in "0123456789ABCDEF" for c in hexits):
        raise InvalidArgumentError(
            "the TLS fingerprint must be a SHA-256 in hex (64 digits, colons allowed), as "
            "`vendetta server start --listen` printed it"
        )
    return ":".join(hexits[i : i + 2] for i in range(0, 64, 2))


def _handshake(where: Endpoint, context: ssl.SSLContext, name: str | None) -> ssl.SSLSocket:
    context.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((where.host, where.port), timeout=15)
    except OSError as exc:
        reason = exc.strerror or str(exc) or "no answer"
        raise UnavailableError(
            f"cannot reach the coordinator at {where.address}: {reason}"
        ) from None
    try:
        return context.wrap_socket(raw, server_hostname=name)
    except BaseException:
        raw.close()
        raise


def credentials(
    where: Endpoint, token: str = "", fingerprint: str = "", ca_file: str = ""
) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
    """Credentials that trust only the pinned certificate (or the CAs) and send the
    token; blocking (two TLS handshakes at most)."""
    options: list[tuple[str, Any]] = []
    if fingerprint:
        pinned = normalize_fingerprint(fingerprint)
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE
        with _handshake(where, probe, None) as conn:
            der = conn.getpeercert(binary_form=True) or b""
        got = fingerprint_of(der)
        if got != pinned:
            raise FailedPreconditionError(
                f"the coordinator at {where.address} presented a certificate with SHA-256 "
                f"{got.replace(':', '')}, not the pinned {pinned.replace(':', '')}: someone may "
                "be in between; if its owner replaced the certificate, pin the new one"
            )
        pem = ssl.DER_cert_to_PEM_cert(der)
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        check.check_hostname = False
        check.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        check.load_verify_locations(cadata=pem)
        with _handshake(where, check, None) as conn:
            names = _alt_names(conn.getpeercert() or {})
        # The pinned certificate is gRPC's only root: its own handshake accepts nothing else.
        creds = grpc.ssl_channel_credentials(root_certificates=pem.encode())
        options.append(("grpc.ssl_target_name_override", names[0] if names else where.host))
    else:
        context = ssl.create_default_context(cafile=ca_file or None)
        try:
            _handshake(where, context, where.host).close()
        except ssl.SSLCertVerificationError as exc:
            raise FailedPreconditionError(
                f"the coordinator at {where.address} presented a certificate this machine does "
                f"not trust ({exc.verify_message}): pin its fingerprint (fingerprint= or "
                f"{FINGERPRINT_ENV}), as `vendetta server status` shows it there"
            ) from None
        roots = Path(ca_file).read_bytes() if ca_file else None
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds, options


def _alt_names(cert: dict[str, Any]) -> list[str]:
    names = [
        value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")
    ]
    for rdn in cert.get("subject", ()):
        names += [value for key, value in rdn if key == "commonName"]
    return names
