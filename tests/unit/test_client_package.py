"""vendetta_client's copies held to the originals: its error tree and status mapping are
common/errors.py's and common/rpc_errors.py's (the package cannot import them); and how
it reads a target, a pin and the environment."""

from __future__ import annotations

import inspect
from typing import Any

import grpc
import grpc.aio
import pytest

from common import errors as server_errors
from common import rpc_errors
from vendetta_client import connect
from vendetta_client import errors as client_errors
from vendetta_client._common import Settings


def _tree(module: object) -> dict[str, str]:
    return {
        name: cls.__mro__[1].__name__
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__ == module.__name__  # type: ignore[attr-defined]
    }


def test_the_error_tree_is_the_clis() -> None:
    server, client = _tree(server_errors), _tree(client_errors)
    assert server.items() <= client.items(), set(server.items()) - set(client.items())
    assert set(client) - set(server) == {"UnauthenticatedError"}
    assert client["UnauthenticatedError"] == "PermissionDeniedError"


def test_status_codes_and_kinds_map_as_the_clis() -> None:
    for code, cls in rpc_errors._FROM_CODE.items():
        assert client_errors.FROM_CODE[code].__name__ == cls.__name__
    assert set(client_errors.KINDS) == set(rpc_errors._KINDS)
    assert client_errors.KIND_KEY == rpc_errors._KIND_KEY


def _failed(code: grpc.StatusCode, details: str, kind: str = "") -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(("vendetta-error", kind)) if kind else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details, None)


def test_from_rpc_error() -> None:
    got = client_errors.from_rpc_error(
        _failed(grpc.StatusCode.FAILED_PRECONDITION, "w is stopped", "NotRunningError")
    )
    assert type(got) is client_errors.NotRunningError and str(got) == "w is stopped"
    got = client_errors.from_rpc_error(_failed(grpc.StatusCode.UNAUTHENTICATED, "no token"))
    assert isinstance(got, client_errors.PermissionDeniedError)
    assert type(got) is client_errors.UnauthenticatedError
    got = client_errors.from_rpc_error(_failed(grpc.StatusCode.UNAVAILABLE, "refused"))
    assert type(got) is client_errors.UnavailableError and "does not answer" in str(got)
    assert client_errors.from_server(_failed(grpc.StatusCode.NOT_FOUND, "x", "NotFoundError"))
    assert not client_errors.from_server(_failed(grpc.StatusCode.UNAVAILABLE, "x"))
    got = client_errors.from_rpc_error(_failed(grpc.StatusCode.DATA_LOSS, "odd"))
    assert type(got) is client_errors.InternalError


def test_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    assert connect.parse_target("vendetta://build1:7443").address == "build1:7443"
    assert connect.parse_target("[::1]:7443").address == "[::1]:7443"
    assert connect.parse_target("unix:/tmp/c.sock") == connect.Endpoint("unix:/tmp/c.sock", False)
    for bad in ("http://build1:7443", "build1", "vendetta://build1:0", "vendetta://a/b:1"):
        with pytest.raises(client_errors.InvalidArgumentError):
            connect.parse_target(bad)
    monkeypatch.setenv("VENDETTA_HOME", "/srv/vd")
    monkeypatch.delenv("VENDETTA_URL", raising=False)
    assert connect.parse_target(None).address == "unix:/srv/vd/coordinator.sock"
    monkeypatch.setenv("VENDETTA_URL", "vendetta://c:1")
    monkeypatch.setenv("VENDETTA_TOKEN", "vdt_env")
    monkeypatch.setenv("VENDETTA_TLS_FINGERPRINT", "ab" * 32)
    from_env = Settings.resolve(None, None, None, None, 3)
    assert from_env.endpoint.address == "c:1" and from_env.token == "vdt_env"
    # A token meant for VENDETTA_URL is not sent to a target given in code.
    elsewhere = Settings.resolve("vendetta://other:2", None, None, None, 3)
    assert elsewhere.token == "" and elsewhere.fingerprint == ""


def test_fingerprints() -> None:
    pin = "AB:" * 31 + "AB"
    assert connect.normalize_fingerprint("ab" * 32) == pin
    assert connect.normalize_fingerprint("SHA256:" + pin.lower()) == pin
    with pytest.raises(client_errors.InvalidArgumentError, match="64 digits"):
        connect.normalize_fingerprint("abcd")


class _Flaky:
    """A unary method that fails like a lost connection ``failures`` times, then answers;
    it keeps each request it was sent."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures, self.code = failures, code
        self.sent: list[Any] = []

    def __call__(self, request: Any, timeout: float | None = None) -> str:
        self.sent.append(request)
        if len(self.sent) <= self.failures:
            raise _failed(self.code, "Connection reset")
        return "answer"


def test_retries_resend_the_same_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from vendetta_client import client as sync_client
    from vendetta_client import pb

    monkeypatch.setattr(sync_client, "BACKOFF", (0.0,))
    with sync_client.Client("unix:/nonexistent/c.sock", retries=3) as vd:
        flaky = _Flaky(2)
        request = pb.WorkspaceRequest(name="w", request_id="r1")
        assert vd._unary(flaky, request, 5, True) == "answer"  # type: ignore[arg-type]
        assert [r.request_id for r in flaky.sent] == ["r1", "r1", "r1"]
        with pytest.raises(client_errors.UnavailableError):  # retries run out
            vd._unary(_Flaky(9), request, 5, True)  # type: ignore[arg-type]
        # What the coordinator itself said is not retried; nor is a call marked so.
        tagged = _Flaky(1, grpc.StatusCode.NOT_FOUND)
        with pytest.raises(client_errors.NotFoundError):
            vd._unary(tagged, request, 5, True)  # type: ignore[arg-type]
        once = _Flaky(1)
        with pytest.raises(client_errors.UnavailableError):
            vd._unary(once, request, 5, False)  # type: ignore[arg-type]
        assert len(tagged.sent) == len(once.sent) == 1
