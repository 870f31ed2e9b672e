"""A coordinator shared over TLS with tokens, end to end: a real coordinator started
with `server start --listen 127.0.0.1:0` and its self-signed certificate.

For every method of the Coordinator's service descriptor, calls without a token,
with a wrong, an expired or a revoked one, and with one of a narrower scope are
refused before anything runs; plaintext and another certificate do not connect;
health and reflection answer; the CLI elsewhere (VENDETTA_URL, VENDETTA_TOKEN,
VENDETTA_TLS_FINGERPRINT, no local coordinator) drives a Docker workspace; and no
token is written or printed anywhere.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from common.loopback import free_ports
from common.paths import coordinator_socket
from common.remote import PINNED_NAME
from coordinator import scopes, tls
from tests.conftest import TEST_IMAGE
from tests.support.cli import BIN, Env, cli_env
from vendetta.v1 import coordinator_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
OPERATE_ON = "mine"


@dataclass
class Shared:
    env: Env
    address: str
    fingerprint: str
    cert: bytes
    tokens: dict[str, str]  # what it is -> the token


def _token(e: Env, *args: str) -> str:
    made = e.cli("token", "create", *args)
    return made.stdout.strip()


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    with cli_env(prefix="vd-tls-") as e:
        started = e.cli("server", "start", "--listen", "127.0.0.1:0")
        info = e.json("server", "status")
        assert info["listen"].startswith("127.0.0.1:") and info["tls_fingerprint"]
        assert info["tls_fingerprint"] in started.stdout
        home = Path(e.env["VENDETTA_HOME"])
        tokens = {
            "read": _token(e, "--name", "reader"),
            "operate": _token(e, "--name", "operator", "--scope", "operate"),
            "limited": _token(
                e, "--name", "limited", "--scope", "operate", "--workspace", OPERATE_ON
            ),
            "admin": _token(e, "--name", "admin", "--scope", "admin"),
            "expired": _token(e, "--name", "expired", "--scope", "admin", "--expires", "1s"),
            "revoked": _token(e, "--name", "revoked", "--scope", "admin"),
        }
        e.cli("token", "revoke", "revoked")
        deadline = time.monotonic() + 30
        while not _expired(e):
            assert time.monotonic() < deadline, "the 1s token never expired"
            time.sleep(0.2)
        yield Shared(
            e,
            info["listen"],
            info["tls_fingerprint"],
            (home / "tls" / "cert.pem").read_bytes(),
            tokens,
        )


def test_server_start_says_what_it_listens_on(shared: Shared) -> None:
    # First: a source edit meanwhile (a new build id) would make start replace it.
    e = shared.env
    again = e.cli("server", "start", "--listen", "127.0.0.1:0").stdout
    assert "already running" in again and f"TLS listener {shared.address}, this machine" in again
    out = e.fails("server", "start", "--listen", "127.0.0.2:0")
    assert f"already runs with its listener on {shared.address}" in out
    assert "give HOST:PORT" in e.fails("server", "start", "--listen", "7443")
    assert "--tls-cert and --tls-key" in e.fails("server", "start", "--tls-cert", "/nonexistent")


def _channel(s: Shared, root: bytes | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=root or s.cert)
    return grpc.secure_channel(
        s.address, creds, options=[("grpc.ssl_target_name_override", PINNED_NAME)]
    )


def _call(channel: grpc.Channel, method: Any, token: str | None, request: Any) -> None:
    """One call of ``method`` as the descriptor says it is called."""
    req = message_factory.GetMessageClass(method.input_type)
    resp = message_factory.GetMessageClass(method.output_type)
    path = f"/{SERVICE.full_name}/{method.name}"
    kind = (method.client_streaming, method.server_streaming)
    make: Callable[..., Any] = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[kind]
    stub: Callable[..., Any] = make(
        path, request_serializer=req.SerializeToString, response_deserializer=resp.FromString
    )
    md = [("authorization", f"Bearer {token}")] if token is not None else None
    arg = iter([request]) if method.client_streaming else request
    result = stub(arg, metadata=md, timeout=20)
    if method.server_streaming:
        list(result)


def _request(method: Any, workspace: str) -> Any:
    """The smallest request, naming ``workspace`` where the method names one."""
    request = message_factory.GetMessageClass(method.input_type)()
    path = scopes.METHODS[method.name].workspace
    if path:
        target = request
        *parents, leaf = path.split(".")
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, workspace)
    return request


def _refused(s: Shared, method: Any, token: str | None, workspace: str = "") -> grpc.RpcError:
    with _channel(s) as channel, pytest.raises(grpc.RpcError) as refused:
        _call(channel, method, token, _request(method, workspace))
    return refused.value


def _expired(e: Env) -> bool:
    listed = e.json("token", "list")
    return any(t["name"] == "expired" and t["state"] == "expired" for t in listed)


def test_every_method_refuses_bad_and_narrow_tokens(shared: Shared) -> None:
    wrong = "vdt_" + "0" * 12 + "_" + "A" * 43
    secret_parts = [t.split("_", 2)[2] for t in shared.tokens.values()]
    checked = 0
    for method in SERVICE.methods:
        rule = scopes.METHODS[method.name]
        unauthenticated = {
            None: "no token",
            "": "no token",
            wrong: "not known",
            "garbage": "malformed",
            shared.tokens["expired"]: "has expired",
            shared.tokens["revoked"]: "was revoked",
        }
        for token, why in unauthenticated.items():
            err = _refused(shared, method, token)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (method.name, why, err)
            assert why in (err.details() or ""), (method.name, err.details())
            checked += 1
        narrower = {"operate": "read", "admin": "operate"}.get(rule.scope)
        if narrower:
            err = _refused(shared, method, shared.tokens[narrower], OPERATE_ON)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (method.name, err)
            assert f"needs {rule.scope}" in (err.details() or ""), err.details()
            checked += 1
        if rule.workspace:  # limited to another workspace
            err = _refused(shared, method, shared.tokens["limited"], "not-mine")
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (method.name, err)
            assert "only on workspace(s) mine" in (err.details() or ""), err.details()
            checked += 1
        assert not any(p in (err.details() or "") for p in secret_parts)
    assert checked > 6 * len(SERVICE.methods)


def test_a_dial_route_is_only_for_clients_on_the_coordinators_machine(shared: Shared) -> None:
    """DialRoute answers a socket path there: over TLS, even with the scope, it is
    refused (ssh-proxy elsewhere uses Dial)."""
    method = SERVICE.methods_by_name["DialRoute"]
    err = _refused(shared, method, shared.tokens["operate"], OPERATE_ON)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert "for clients on its unix socket" in (err.details() or ""), err.details()


def test_plaintext_and_another_certificate_do_not_connect(shared: Shared) -> None:
    method = SERVICE.methods_by_name["ListWorkspaces"]
    request = coordinator_pb2.ListWorkspacesRequest()
    with grpc.insecure_channel(shared.address) as plain, pytest.raises(grpc.RpcError) as err:
        _call(plain, method, shared.tokens["read"], request)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    other, _ = tls._self_signed("127.0.0.1")
    with _channel(shared, other) as channel, pytest.raises(grpc.RpcError) as err:
        _call(channel, method, shared.tokens["read"], request)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with _channel(shared) as channel:  # the right certificate and a read token: served
        _call(channel, method, shared.tokens["read"], request)
    # The CLI: no pin is refused with the fingerprint to check; a wrong one is refused.
    remote = _remote_env(shared, "read")
    del remote["VENDETTA_TLS_FINGERPRINT"]
    out = _fails(remote, "workspace", "list")
    assert "does not trust" in out and shared.fingerprint.replace(":", "") in out
    remote["VENDETTA_TLS_FINGERPRINT"] = "AB" * 32
    assert "not the pinned" in _fails(remote, "workspace", "list")
    remote["VENDETTA_URL"] = f"http://{shared.address}"
    assert "over TLS only" in _fails(remote, "workspace", "list")


def test_health_and_reflection_on_both_listeners(shared: Shared) -> None:
    sock = coordinator_socket(Path(shared.env.env["VENDETTA_HOME"]))
    check = health_pb2.HealthCheckRequest(service=SERVICE.full_name)
    with grpc.insecure_channel(f"unix:{sock}") as local:
        assert health_pb2_grpc.HealthStub(local).Check(check, timeout=10).status == 1
        assert SERVICE.full_name in ProtoReflectionDescriptorDatabase(local).get_services()
    with _channel(shared) as channel:  # health needs no token
        assert health_pb2_grpc.HealthStub(channel).Check(check, timeout=10).status == 1
        with pytest.raises(grpc.RpcError) as err:  # reflection does
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=shared.cert),
        grpc.access_token_call_credentials(shared.tokens["read"]),
    )
    options = [("grpc.ssl_target_name_override", PINNED_NAME)]
    with grpc.secure_channel(shared.address, creds, options=options) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {SERVICE.full_name, "grpc.health.v1.Health"} <= services


def _remote_env(s: Shared, token: str) -> dict[str, str]:
    """The CLI on "another machine": no coordinator of its own, only the URL."""
    env = dict(s.env.env)
    env["VENDETTA_HOME"] = str(s.env.home / "elsewhere")
    env["VENDETTA_URL"] = f"vendetta://{s.address}"
    env["VENDETTA_TOKEN"] = s.tokens[token]
    env["VENDETTA_TLS_FINGERPRINT"] = s.fingerprint.replace(":", "").lower()
    return env


def _cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "vendetta"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def _ok(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    proc = _cli(env, *args, stdin=stdin)
    assert proc.returncode == 0, f"vendetta {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _fails(env: dict[str, str], *args: str) -> str:
    proc = _cli(env, *args)
    assert proc.returncode != 0, f"vendetta {' '.join(args)} succeeded: {proc.stdout}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return " ".join((proc.stdout + proc.stderr).split())


def test_the_cli_elsewhere_drives_a_docker_workspace(shared: Shared) -> None:
    shown = ""
    reader = _remote_env(shared, "read")
    shown += _ok(reader, "workspace", "list")
    shown += _ok(reader, "node", "list", "--json")
    shown += _ok(reader, "node", "status", "local")  # every read command works with read
    shown += _ok(reader, "cluster", "status")
    out = _fails(reader, "workspace", "create", OPERATE_ON, "--no-source")
    assert "needs operate" in out and "--scope operate" in out
    shown += out

    cfg = shared.env.home / "proj" / ".vendetta" / "config.yaml"
    cfg.parent.mkdir(parents=True)
    inside, here = free_ports(2)
    cfg.write_text(
        f"name: remote\nprovider: docker\ndocker:\n  image: {TEST_IMAGE}\n"
        # trapped: sh as first process ignores SIGTERM, a down would wait 10 s
        '  command: [/bin/sh, -c, \'trap "exit 0" TERM; i=0;'
        " while :; do i=$((i+1)); echo tick $i; sleep 0.2; done']\n"
        "services:\n  web:\n    command: >-\n      mkdir -p /www && echo hello-remote"
        f" > /www/index.html && exec httpd -f -p {inside} -h /www\n"
        f"    port: {inside}\n    health_check: {{http: /, interval: 0.3}}\n"
    )
    limited = _remote_env(shared, "limited")
    out = _fails(limited, "workspace", "create", "other", "--config", str(cfg), "--no-source")
    assert "only on workspace(s) mine" in out
    out = _fails(limited, "workspace", "create", OPERATE_ON, "--config", str(cfg))
    assert "https:// git URL" in out  # the project folder is this machine's, not the server's
    url = _fails(limited, "workspace", "create", OPERATE_ON, "--source", "https://x.org/r.git")
    assert "network and git credentials" in url  # an operate token: no fetch by the server
    shown += out
    shown += _ok(limited, "workspace", "create", OPERATE_ON, "--config", str(cfg), "--no-source")
    shown += _ok(limited, "workspace", "up", OPERATE_ON)
    ran = _ok(limited, "workspace", "exec", OPERATE_ON, "--", "sh", "-c", "echo out-$((6*7))")
    assert "out-42" in ran
    piped = _ok(limited, "workspace", "connect", OPERATE_ON, "--", "head", "-n", "1", stdin="hi\n")
    assert "hi" in piped
    deadline = time.monotonic() + 30
    while "tick" not in (logs := _ok(limited, "workspace", "logs", OPERATE_ON, "--tail", "2")):
        assert time.monotonic() < deadline, logs
        time.sleep(0.3)
    shown += ran + piped + logs
    # The service's port on the CLI's machine, through the coordinator's Dial.
    forward = subprocess.Popen(
        [str(BIN / "vendetta"), "workspace", "forward", OPERATE_ON, f"{here}:web"],
        env=limited,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert forward.stdout is not None
        while "forwarding" not in (line := forward.stdout.readline()):
            assert line, forward.stderr.read() if forward.stderr else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{here}/", timeout=10) as page:
            assert page.read().decode().strip() == "hello-remote"
    finally:
        forward.terminate()
        forward.wait(timeout=30)
    shown += _ok(limited, "workspace", "status", OPERATE_ON, "--json")
    shown += _ok(reader, "workspace", "list", "--json")
    shown += _ok(limited, "workspace", "down", OPERATE_ON)
    shown += _fails(limited, "token", "list")
    shown += _ok(_remote_env(shared, "admin"), "token", "list", "--json")
    shown += _ok(limited, "workspace", "destroy", OPERATE_ON)

    # No token anywhere: not in what the CLI printed, the coordinator's files or log.
    home = Path(shared.env.env["VENDETTA_HOME"])
    leaks = [name for name, t in shared.tokens.items() if t in shown]
    assert not leaks, f"printed: {leaks}"
    for path in home.rglob("*"):
        if path.is_file() and not path.is_socket():
            data = path.read_bytes()
            found = [n for n, t in shared.tokens.items() if t.split("_", 2)[2].encode() in data]
            assert not found, f"{path} holds token(s) {found}"
    key = home / "tls" / "key.pem"
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert os.stat(home / "state.db").st_mode & 0o777 == 0o600


def _ca_signed(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate and key it signed for 127.0.0.1: the user's own pair."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name("coordinator"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(paths[2], 0o600)
    return paths


def test_the_users_own_certificate_verified_by_its_ca() -> None:
    with cli_env(prefix="vd-tlsca-") as e:
        ca, cert, key = _ca_signed(e.home)
        e.cli(
            "server",
            "start",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        )
        info = e.json("server", "status")
        assert not (Path(e.env["VENDETTA_HOME"]) / "tls").exists()  # no self-signed pair made
        env = dict(e.env)
        env["VENDETTA_HOME"] = str(e.home / "elsewhere")
        env["VENDETTA_URL"] = f"vendetta://{info['listen']}"
        env["VENDETTA_TOKEN"] = e.cli("token", "create").stdout.strip()
        assert "does not trust" in _fails(env, "workspace", "list")  # not a CA of this machine
        env["VENDETTA_TLS_CA"] = str(ca)
        assert "no workspaces" in _ok(env, "workspace", "list")
        env.pop("VENDETTA_TLS_CA")
        env["VENDETTA_TLS_FINGERPRINT"] = info["tls_fingerprint"]  # or pinned, without the CA
        assert "no workspaces" in _ok(env, "workspace", "list")
