"""The SSH entries file and the Include line `vendetta ssh-config` manages."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

import asyncssh

from cli.ssh_config import include_line, with_include, without_include
from common.ssh_hosts import HOST_KEY_ALIAS, known_hosts_path
from coordinator.ssh_entries import SshEntries
from coordinator.ssh_keys import ensure_key


def test_entries_follow_the_workspaces(tmp_path: Path) -> None:
    entries = SshEntries(tmp_path)
    entries.prepare()
    entries.write(["web", "api"])
    text = entries.path.read_text()
    assert text.index("Host api.vendetta") < text.index("Host web.vendetta")
    proxy = next(ln for ln in text.splitlines() if "ProxyCommand" in ln and "web" in ln)
    argv = shlex.split(proxy.split("ProxyCommand", 1)[1])
    assert argv[-4:] == ["--home", str(tmp_path), "ssh-proxy", "web"]
    assert f"HostKeyAlias {HOST_KEY_ALIAS}" in text and "StrictHostKeyChecking yes" in text
    entries.write(["web"])
    assert "api.vendetta" not in entries.path.read_text()
    # The proxy's host key is what the known_hosts file pins for the alias.
    alias, key_line = known_hosts_path(tmp_path).read_text().split(" ", 1)
    assert alias == HOST_KEY_ALIAS
    assert asyncssh.import_public_key(key_line).get_fingerprint() == (
        asyncssh.read_private_key(tmp_path / "ssh" / "proxy_host_key").get_fingerprint()
    )


def test_generated_key_is_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "ssh" / "id_ed25519"
    first = ensure_key(path, "vendetta")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_key(path, "vendetta").get_fingerprint() == first.get_fingerprint()
    assert path.with_name("id_ed25519.pub").read_bytes() == first.export_public_key()


def test_include_goes_first_and_comes_out_cleanly() -> None:
    line = include_line(Path("/h/ssh/config"))
    assert line == 'Include "/h/ssh/config"'
    before = "Host a\n  User b\n"
    after = with_include(before, line)
    assert after.splitlines()[1] == line and after.endswith(before)
    assert without_include(after, line) == before
    assert without_include(with_include("", line), line) == ""


def test_a_key_with_a_passphrase_says_to_use_the_agent(tmp_path: Path) -> None:
    import pytest

    from common.errors import InvalidArgumentError
    from coordinator.transports.ssh import SshTransport

    path = tmp_path / "locked"
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.write_bytes(key.export_private_key("pkcs8-pem", passphrase="secret"))
    transport = SshTransport(
        node="n1",
        address="127.0.0.1",
        port=22,
        user="",
        host_key=key.export_public_key().decode(),
        tunnel_dir=tmp_path / "t",
        identity_file=str(path),
    )
    with pytest.raises(InvalidArgumentError, match="load the key into ssh-agent"):
        transport._key_options()
