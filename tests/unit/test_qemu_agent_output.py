"""What the guest agent's exec status gives: the output, or a clear error when the
agent cut it (it keeps 16 MiB of each stream), never the cut output as if whole."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from common.errors import FailedPreconditionError
from providers.qemu import agent


def _status(monkeypatch: pytest.MonkeyPatch, **status: Any) -> None:
    monkeypatch.setattr(agent, "command", lambda _dom, _execute, **_args: status)


def test_whole_output_comes_with_the_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    out = base64.b64encode(b"hello\n").decode()
    _status(monkeypatch, exited=True, exitcode=3, **{"out-data": out})
    assert agent.exec_status(None, 1) == (True, 3, b"hello\n", b"")


@pytest.mark.parametrize("stream", ["out", "err"])
def test_cut_output_is_an_error(monkeypatch: pytest.MonkeyPatch, stream: str) -> None:
    data = base64.b64encode(b"x" * 100).decode()
    _status(monkeypatch, exited=True, exitcode=0, **{f"{stream}-data": data,
                                                     f"{stream}-truncated": True})  # fmt: skip
    with pytest.raises(FailedPreconditionError, match=f"std{stream}.*was cut"):
        agent.exec_status(None, 1)


def test_an_answer_over_libvirts_limit_is_not_a_daemon_that_is_down() -> None:
    import libvirt

    from providers.qemu.errors import translate

    said = "internal error: Unable to encode message payload"
    exc = libvirt.libvirtError(said)
    # As libvirt reports it (measured with 3 MiB of output): an RPC error.
    exc.err = (libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_RPC, said, 2, None, None, None, 0, 0)
    err = translate(exc, uri="qemu:///system", action="running 'cat' in 'w'")
    assert isinstance(err, FailedPreconditionError), err
    assert "larger than libvirt passes" in str(err) and "not reachable" not in str(err)
