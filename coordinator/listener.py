"""The Coordinator service over TLS on a TCP address, for other machines.

Only with `vendetta server start --listen HOST:PORT` (no TCP at all otherwise);
never plaintext. Every call needs a bearer token (coordinator/auth.py), except
the gRPC health check. Health and reflection are served on the unix socket too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from common import keepalive
from common.errors import InvalidArgumentError
from common.rpc_errors import ErrorMappingInterceptor
from coordinator import tls
from coordinator.auth import TokenAuthInterceptor
from coordinator.tokens import TokenService
from vendetta.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger("vendetta.listener")

SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


@dataclasses.dataclass(frozen=True)
class ListenConfig:
    host: str
    port: int
    cert_file: Path | None = None
    key_file: Path | None = None


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT); the host must be given."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgumentError(
            f"--listen {text[:80]!r}: give HOST:PORT, e.g. 127.0.0.1:7443 (this machine "
            "only) or 0.0.0.0:7443 (every interface: others can reach it); port 0 picks one"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(
    listen: str | None, cert_file: Path | None, key_file: Path | None
) -> ListenConfig | None:
    """The listener's settings, checked before anything starts."""
    if (cert_file is None) != (key_file is None):
        raise InvalidArgumentError("give both --tls-cert and --tls-key, or neither")
    if listen is None:
        if cert_file is not None:
            raise InvalidArgumentError("--tls-cert/--tls-key need --listen HOST:PORT")
        return None
    host, port = parse_listen(listen)
    if cert_file is not None and key_file is not None:
        tls.load_pair(cert_file, key_file)
    if port:
        _check_free(host, port)
    return ListenConfig(host, port, cert_file, key_file)


def _check_free(host: str, port: int) -> None:
    """Before the coordinator starts: an address in use, or not this machine's, is one
    line here rather than a failed start (gRPC only says "Failed to bind")."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another address "
            "or port (port 0 picks a free one)"
        ) from None


class _Health(HealthServicer):  # type: ignore[misc]  # grpcio-health-checking is untyped
    """SERVING from the start, for the server as a whole ("") and the Coordinator: a
    server that answers serves (its `set` is a coroutine, for later changes)."""

    def __init__(self) -> None:
        super().__init__()
        self._server_status[SERVICE] = health_pb2.HealthCheckResponse.SERVING


def add_standard_services(server: grpc.aio.Server) -> None:
    """grpc.health.v1 and server reflection."""
    health_pb2_grpc.add_HealthServicer_to_server(_Health(), server)
    reflection.enable_server_reflection(
        [
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )


class Listener:
    def __init__(
        self,
        home: Path,
        config: ListenConfig,
        servicer: coordinator_pb2_grpc.CoordinatorServicer,
        tokens: TokenService,
    ) -> None:
        self.home = home
        self.config = config
        self.server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor(), TokenAuthInterceptor(tokens)],
            options=keepalive.SERVER_OPTIONS,
        )
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, self.server)
        add_standard_services(self.server)
        self.address = ""
        self.fingerprint = ""

    async def start(self) -> None:
        c = self.config
        if c.cert_file is not None and c.key_file is not None:
            cert, key = tls.load_pair(c.cert_file, c.key_file)
        else:
            cert, key = tls.self_signed(self.home, c.host)
        self.fingerprint = tls.fingerprint_of_pem(cert)
        host = f"[{c.host}]" if ":" in c.host else c.host
        credentials = grpc.ssl_server_credentials([(key, cert)])
        try:
            port = self.server.add_secure_port(f"{host}:{c.port}", credentials)
        except RuntimeError:  # gRPC says "Failed to bind" this way
            port = 0
        if not port:
            raise InvalidArgumentError(
                f"cannot listen on {host}:{c.port}: the address is in use or not this machine's"
            )
        await self.server.start()
        self.address = f"{host}:{port}"
        where = "this machine only" if is_loopback(c.host) else "reachable from other machines"
        log.info(
            "TLS listener on %s (%s), certificate SHA-256 %s", self.address, where, self.fingerprint
        )

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)
