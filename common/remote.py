"""Reaching a coordinator's TLS listener from another machine (the CLI; clients).

The target is ``vendetta://HOST:PORT`` (or ``https://``, ``grpcs://``, or bare
``HOST:PORT``); plaintext schemes are refused. The server's certificate is
trusted either because its SHA-256 matches the pinned fingerprint (a
self-signed coordinator: the fingerprint `server start --listen` printed), or
because it verifies against the system's CAs (or a given CA file) for the
host's name. An unknown certificate is never accepted: the error shows its
fingerprint for the user to check with the coordinator's owner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
import ssl
from pathlib import Path

import grpc

from common.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError

# The self-signed certificate's name (coordinator/tls.py).
PINNED_NAME = "vendetta-coordinator"
_SECURE = ("vendetta://", "https://", "grpcs://")
_PLAIN = ("http://", "grpc://", "unix:", "tcp://")


@dataclasses.dataclass(frozen=True)
class Target:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"vendetta://{self.address}"


def parse_url(url: str) -> Target:
    text = url.strip()
    lower = text.lower()
    if lower.startswith(_PLAIN):
        raise InvalidArgumentError(
            f"{text[:80]!r}: a coordinator is reached over TLS only: give "
            "vendetta://HOST:PORT (the address `vendetta server start --listen` printed)"
        )
    for scheme in _SECURE:
        if lower.startswith(scheme):
            text = text[len(scheme) :]
            break
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(
            f"VENDETTA_URL {url[:80]!r}: give vendetta://HOST:PORT, e.g. vendetta://build1:7443"
        )
    return Target(host, int(port))


def fingerprint_of_der(der: bytes) -> str:
    """SHA-256 of a certificate, as `openssl x509 -fingerprint -sha256` shows it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def normalize_fingerprint(text: str) -> str:
    """A fingerprint as given (colons or not, any case, a SHA256: prefix or not) in
    fingerprint_of_der's form; InvalidArgumentError if it is not one."""
    hexits = text.strip().upper().removeprefix("SHA256:").removeprefix("SHA256=")
    hexits = hexits.replace(":", "").replace(" ", "")
    if len(hexits) != 64 or any(c not in "0123456789ABCDEF" for c in hexits):
        raise InvalidArgumentError(
            "the TLS fingerprint must be a SHA-256 in hex (64 digits, colons allowed), as "
            "`vendetta server start --listen` printed it"
        )
    return ":".join(hexits[i : i + 2] for i in range(0, 64, 2))


async def _handshake(target: Target, context: ssl.SSLContext, name: str | None) -> bytes:
    """The certificate the server presents (DER), after ``context``'s checks."""
    context.set_alpn_protocols(["h2"])
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port, ssl=context, server_hostname=name),
            timeout=15,
        )
    except ssl.SSLCertVerificationError:
        raise
    except (OSError, TimeoutError) as exc:
        errno = getattr(exc, "errno", None)
        reason = os.strerror(errno) if errno else str(exc) or "no answer"
        if isinstance(exc, socket.gaierror):
            reason = exc.strerror or reason
        raise UnavailableError(
            f"cannot reach the coordinator at {target}: {reason}; check VENDETTA_URL and that "
            "it runs with `vendetta server start --listen` there"
        ) from None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return bytes(der or b"")


async def server_certificate(target: Target) -> bytes:
    """The server's certificate, not checked yet (for pinning)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return await _handshake(target, context, None)


def _name_in(der: bytes) -> str:
    """A name the certificate holds, for gRPC's check of it (the pin already decided)."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return names[0] if names else str(cn[0].value) if cn else PINNED_NAME


async def channel_credentials(
    target: Target, fingerprint: str = "", ca_file: Path | None = None
) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
    """Credentials (and channel options) that trust only the pinned certificate, or
    the CAs; raises if the server's certificate is neither."""
    if fingerprint:
        pinned = normalize_fingerprint(fingerprint)
        der = await server_certificate(target)
        got = fingerprint_of_der(der)
        if got != pinned:  # shown without colons: the CLI's rich reads ":CD:" as an emoji
            raise FailedPreconditionError(
                f"the coordinator at {target} presented a certificate with SHA-256 "
                f"{got.replace(':', '')}, not the pinned {pinned.replace(':', '')}: someone "
                "may be in between; if its owner replaced the certificate, pin the new one "
                "(VENDETTA_TLS_FINGERPRINT)"
            )
        # The pinned certificate is the only root: gRPC's own handshake then accepts
        # nothing else, whatever happens between this check and it.
        pem = ssl.DER_cert_to_PEM_cert(der).encode()
        return grpc.ssl_channel_credentials(root_certificates=pem), [
            ("grpc.ssl_target_name_override", _name_in(der))
        ]
    roots = ca_file.read_bytes() if ca_file else None
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    try:
        await _handshake(target, context, target.host)
    except ssl.SSLCertVerificationError as exc:
        got = fingerprint_of_der(await server_certificate(target)).replace(":", "")
        raise FailedPreconditionError(
            f"the coordinator at {target} presented a certificate this machine does not "
            f"trust ({exc.verify_message}), SHA-256 {got}: if the coordinator's owner confirms "
            "this fingerprint (`vendetta server status` there), set "
            "VENDETTA_TLS_FINGERPRINT to it"
        ) from None
    return grpc.ssl_channel_credentials(root_certificates=roots), []
