"""The TLS listener's certificate: the user's, or a self-signed one made once.

The self-signed pair lives in HOME/tls (key 0600) and is kept across restarts,
so clients that pinned its SHA-256 fingerprint keep trusting it. Clients pin
the certificate itself, so its names matter little; it names localhost, this
host and ``vendetta-coordinator`` (the name pinned clients check against).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import stat
from pathlib import Path

from common.errors import InvalidArgumentError
from common.paths import private_dir, write_private
from common.remote import PINNED_NAME, fingerprint_of_der

_VALID_DAYS = 5 * 365


def fingerprint_of_pem(pem: bytes) -> str:
    """Of the first certificate in ``pem`` (the server's own, in a chain)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = x509.load_pem_x509_certificates(pem)[0]
    return fingerprint_of_der(leaf.public_bytes(Encoding.DER))


def _self_signed(host: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName(PINNED_NAME),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for extra in {socket.gethostname(), host} - {"", "0.0.0.0", "::", "localhost"}:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(extra)))
        except ValueError:
            names.append(x509.DNSName(extra))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PINNED_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def self_signed(home: Path, host: str) -> tuple[bytes, bytes]:
    """HOME/tls/{cert,key}.pem, made on first use."""
    folder = private_dir(home / "tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    if not (cert_path.exists() and key_path.exists()):
        cert, key = _self_signed(host)
        write_private(key_path, key)
        write_private(cert_path, cert)
    os.chmod(key_path, 0o600)
    return cert_path.read_bytes(), key_path.read_bytes()


def load_pair(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    """The user's certificate (chain) and key, checked: readable, a key only its owner
    can read, and a key that belongs to the certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_private_key,
    )

    try:
        mode = key_file.stat().st_mode
        cert, key = cert_file.read_bytes(), key_file.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read the TLS certificate or key: {exc.strerror}: {exc.filename}"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidArgumentError(
            f"the TLS key {key_file} can be read by others: `chmod 600 {key_file}`"
        )
    try:
        public = x509.load_pem_x509_certificates(cert)[0].public_key()
        private = load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(
            f"--tls-cert must be a PEM certificate and --tls-key its unencrypted PEM key ({exc})"
        ) from None
    spki = PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(Encoding.PEM, spki) != public.public_bytes(
        Encoding.PEM, spki
    ):
        raise InvalidArgumentError(f"the TLS key {key_file} does not belong to {cert_file}")
    return cert, key
