"""Install the agent on a node over its SSH connection: probe, upload, install.

The node needs sshd and a supported ``python3``; nothing else, no package
index. The coordinator sends the bundle of ``coordinator.agent_bundle`` over
SFTP and installs it, as the SSH user, in
``${XDG_DATA_HOME:-~/.local/share}/vendetta/agent/<build>/`` (a venv). The
venv is made in a ``.partial-*`` folder and renamed when complete and checked,
so a dropped connection or a full disk never leaves a half install that is
taken as good, and a retry starts afresh. The previous build is kept for
rollback, older ones are removed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import asyncssh

from common.agent_unit import LINGER_MARK
from common.errors import FailedPreconditionError, NodeUnreachableError
from common.version import build_id
from coordinator.agent_bundle import (
    MIN_GLIBC,
    SUPPORTED_ARCHES,
    SUPPORTED_PYTHONS,
    Bundle,
    get_bundle,
    supported_pythons,
)

log = logging.getLogger("vendetta.coordinator")

INSTALL_TIMEOUT = 600.0
_BY_HAND = (
    "Use another node, or install vendetta on this one yourself and add it with --agent-command"
)
_PROBE = """\
printf 'arch %s\\n' "$(uname -m)"
printf 'home %s\\n' "$HOME"
printf 'data %s\\n' "${XDG_DATA_HOME:-$HOME/.local/share}"
if p=$(command -v python3); then
  printf 'python %s\\n' "$p"
  printf 'version %s\\n' "$(python3 --version 2>&1 | head -n 1)"
fi
"""


@dataclass(frozen=True)
class NodeFacts:
    arch: str
    home: str
    python: str  # path of python3 on the node
    version: tuple[int, int, int]
    base: str  # where agents are installed: <data>/vendetta/agent

    def install_dir(self, build: str) -> str:
        return str(PurePosixPath(self.base) / build)

    def agent_command(self, build: str) -> list[str]:
        return [f"{self.install_dir(build)}/bin/python", "-m", "nodeagent.main"]


def parse_probe(node: str, out: str) -> NodeFacts:
    """The probe's output, or a clear error when the node has no supported python3."""
    facts: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        facts[key] = value.strip()
    need = (
        f"vendetta's agent needs Python {supported_pythons()} as `python3` on the PATH of SSH "
        "sessions (install it, e.g. `apt install python3` or `dnf install python3.11` "
        "and link it as python3)"
    )
    if "python" not in facts:
        raise FailedPreconditionError(f"node {node!r} has no python3: {need}")
    match = re.search(r"Python (\d+)\.(\d+)(?:\.(\d+))?", facts.get("version", ""))
    if not match:
        raise FailedPreconditionError(
            f"node {node!r}: `{facts['python']} --version` printed "
            f"{facts.get('version', '')!r}, not a Python version: {need}"
        )
    version = (int(match[1]), int(match[2]), int(match[3] or 0))
    if version[:2] not in SUPPORTED_PYTHONS:
        found = ".".join(map(str, version))
        raise FailedPreconditionError(
            f"node {node!r} has Python {found} ({facts['python']}), which the agent cannot "
            f"run on: {need}"
        )
    arch = facts.get("arch", "")
    if arch not in SUPPORTED_ARCHES:
        raise FailedPreconditionError(
            f"node {node!r} is a {arch or 'unknown'} machine: the agent runs on "
            f"{', '.join(SUPPORTED_ARCHES)} (uname -m). {_BY_HAND}"
        )
    data = facts.get("data") or f"{facts.get('home', '')}/.local/share"
    if not data.startswith("/"):
        raise FailedPreconditionError(
            f"node {node!r}: the SSH user has no home folder ({data!r}), where the agent is "
            "installed: give the user a home folder, or set XDG_DATA_HOME to a writable "
            "folder for its SSH sessions (e.g. in its ~/.bashrc)"
        )
    return NodeFacts(
        arch=arch,
        home=facts.get("home", ""),
        python=facts["python"],
        version=version,
        base=f"{data}/vendetta/agent",
    )


async def _run(
    conn: asyncssh.SSHClientConnection, node: str, script: str, what: str, timeout: float = 60
) -> asyncssh.SSHCompletedProcess:
    try:
        return await conn.run(script, check=False, timeout=timeout)
    except (asyncssh.Error, OSError, TimeoutError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise NodeUnreachableError(f"node {node!r}: {what} failed: {why}") from exc


async def probe(conn: asyncssh.SSHClientConnection, node: str) -> NodeFacts:
    result = await _run(conn, node, _PROBE, "probing the node")
    return parse_probe(node, str(result.stdout or ""))


async def is_installed(conn: asyncssh.SSHClientConnection, node: str, facts: NodeFacts) -> bool:
    python = shlex.quote(facts.agent_command(build_id())[0])
    result = await _run(conn, node, f"test -x {python}", "checking the installed agent")
    return result.exit_status == 0


async def ensure_installed(
    conn: asyncssh.SSHClientConnection, node: str, bundles_dir: Path
) -> list[str]:
    """Probe the node, install this build's agent if it is missing; its command."""
    facts = await probe(conn, node)
    build = build_id()
    if await is_installed(conn, node, facts):
        return facts.agent_command(build)
    await _check_glibc(conn, node, facts)
    bundle = await get_bundle(bundles_dir, facts.version[:2], facts.arch)
    needed = await asyncio.to_thread(bundle.space_needed)
    if space := await _space(conn, node, facts):
        check_space(node, facts, space, needed)
    log.info("node %s: installing agent %s in %s", node, build, facts.install_dir(build))
    await _install(conn, node, facts, bundle, needed)
    log.info("node %s: agent %s installed", node, build)
    return facts.agent_command(build)


async def _check_glibc(conn: asyncssh.SSHClientConnection, node: str, facts: NodeFacts) -> None:
    script = f"{shlex.quote(facts.python)} -c 'import platform; print(*platform.libc_ver())'"
    out = str((await _run(conn, node, script, "probing the C library")).stdout or "").split()
    lib, version = [*out, "", ""][:2]
    nums = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if lib != "glibc" or nums < MIN_GLIBC:
        raise FailedPreconditionError(
            f"node {node!r} has {lib or 'an unknown C library'} {version}: the agent's "
            f"wheels need glibc {'.'.join(map(str, MIN_GLIBC))} or newer. {_BY_HAND}"
        )


# The nearest existing folder of the install's base: bytes free there, writable or not.
_SPACE = """\
import os, shutil, sys
d = sys.argv[1]
while not os.path.isdir(d):
    d = os.path.dirname(d)
print(shutil.disk_usage(d).free, int(os.access(d, os.W_OK | os.X_OK)), d)
"""
_NO_SPACE = ("No space left on device", "[Errno 28]", "ENOSPC")


@dataclass(frozen=True)
class Space:
    where: str  # the install's base, or its nearest existing parent folder
    free: int | None  # bytes; None when unknown
    writable: bool


def parse_space(out: str) -> Space | None:
    free, writable, where = [*out.strip().split(" ", 2), "", "", ""][:3]
    if not free.isdigit() or not where.startswith("/"):
        return None
    return Space(where, int(free), writable == "1")


async def _space(conn: asyncssh.SSHClientConnection, node: str, facts: NodeFacts) -> Space | None:
    script = shlex.join([facts.python, "-c", _SPACE, facts.base])
    result = await _run(conn, node, script, "checking the node's free space")
    return parse_space(str(result.stdout or "")) if result.exit_status == 0 else None


def _mb(n: int) -> int:
    return -(-n // 1_000_000)


def disk_full(node: str, space: Space, needed: int) -> FailedPreconditionError:
    free = "" if space.free is None else f"{_mb(space.free)} MB free, "
    return FailedPreconditionError(
        f"node {node!r}: no space left on the node's disk at {space.where} ({free}the "
        f"agent needs about {_mb(needed)} MB): free some space there and retry (or set "
        "XDG_DATA_HOME to a folder on a bigger disk for the SSH user's sessions); nothing "
        "was installed"
    )


def check_space(node: str, facts: NodeFacts, space: Space, needed: int) -> None:
    """Refuse an install that cannot fit or cannot be written, before sending anything."""
    if not space.writable:
        raise FailedPreconditionError(
            f"node {node!r}: the SSH user cannot write to {space.where}, where the agent is "
            f"installed ({facts.base}): make it writable for that user, or set XDG_DATA_HOME "
            "to a writable folder for its SSH sessions (e.g. in its ~/.bashrc), and retry"
        )
    if space.free is not None and space.free < needed:
        raise disk_full(node, space, needed)


async def _failure(
    conn: asyncssh.SSHClientConnection,
    node: str,
    facts: NodeFacts,
    needed: int,
    output: str,
    otherwise: str,
) -> FailedPreconditionError:
    """Why an upload or install failed: the disk (its output says so, or there is not
    room for the agent now its leftovers are gone), rights, or else ``otherwise``."""
    try:
        space = await _space(conn, node, facts)
    except NodeUnreachableError:
        space = None
    if any(sign in output for sign in _NO_SPACE):
        return disk_full(node, space or Space(facts.base, None, True), needed)
    if space is not None:
        try:
            check_space(node, facts, space, needed)
        except FailedPreconditionError as exc:
            return exc
    return FailedPreconditionError(otherwise)


async def _install(
    conn: asyncssh.SSHClientConnection, node: str, facts: NodeFacts, bundle: Bundle, needed: int
) -> None:
    token = secrets.token_hex(4)
    base = facts.base
    upload = f"{base}/.upload-{token}"
    try:
        async with conn.start_sftp_client() as sftp:
            for part, files in (
                ("wheels", bundle.wheels),
                ("tools", bundle.tools),
                ("optional", bundle.optional),
            ):
                await sftp.makedirs(f"{upload}/{part}", exist_ok=True)
                if files:
                    await sftp.put([str(f) for f in files], f"{upload}/{part}")
    except (asyncssh.Error, OSError) as exc:
        lost = isinstance(
            exc, (asyncssh.DisconnectError, asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection)
        )
        try:
            await _run(conn, node, f"rm -rf {shlex.quote(upload)}", "cleaning up", timeout=30)
        except NodeUnreachableError:  # the connection is gone: the next install removes it
            lost = True
        if lost:
            raise NodeUnreachableError(
                f"node {node!r}: the SSH connection dropped while sending the agent bundle "
                f"({exc.reason if isinstance(exc, asyncssh.Error) else exc}); nothing was "
                "installed, retry when the node can be reached"
            ) from exc
        raise await _failure(
            conn, node, facts, needed, str(exc),
            f"node {node!r}: sending the agent bundle to {upload} failed: {exc}; nothing "
            "was installed",
        ) from exc  # fmt: skip
    script = _install_script(facts, bundle, upload, token)
    result = await _run(conn, node, script, "installing the agent", timeout=INSTALL_TIMEOUT)
    if result.exit_status != 0:
        err = (str(result.stderr or "") + str(result.stdout or "")).strip()[-1200:]
        raise await _failure(
            conn, node, facts, needed, err,
            f"node {node!r}: installing the agent in {facts.install_dir(bundle.build)} failed "
            f"(exit {result.exit_status}): {err}; nothing was installed, a retry starts afresh",
        )  # fmt: skip
    for line in str(result.stdout or "").splitlines():
        if line.startswith("optional:"):
            log.warning("node %s: %s", node, line)


def _install_script(facts: NodeFacts, bundle: Bundle, upload: str, token: str) -> str:
    q = shlex.quote
    build = bundle.build
    final = facts.install_dir(build)
    partial = f"{facts.base}/.partial-{token}"
    pip = f"{upload}/tools/{bundle.pip_wheel.name}/pip"
    return f"""\
set -eu
umask 077
base={q(facts.base)}; up={q(upload)}; tmp={q(partial)}; final={q(final)}
trap 'rm -rf "$tmp" "$up"' EXIT
# Leftovers of installs cut off earlier (a dropped connection).
find "$base" -mindepth 1 -maxdepth 1 \\( -name '.partial-*' -o -name '.upload-*' \\) \\
  -mmin +5 -exec rm -rf {{}} + 2>/dev/null || true
{q(facts.python)} -m venv --without-pip "$tmp" >"$up/venv.log" 2>&1 || {{
  rc=$?
  if [ $rc -gt 128 ]; then echo "python3 -m venv was killed (signal $((rc - 128)))" >&2
  elif grep -q "No module named venv" "$up/venv.log"; then
    echo "this python3 has no venv module: install it (Debian/Ubuntu: apt install python3-venv)" >&2
  else echo "python3 -m venv failed: $(tail -n 3 "$up/venv.log")" >&2
  fi
  exit 4
}}
export PIP_CONFIG_FILE=/dev/null
pip() {{ "$tmp/bin/python" {q(pip)} --isolated --disable-pip-version-check --no-input \\
  install --no-index --no-cache-dir --quiet "$@"; }}
pip --no-deps "$up"/wheels/*.whl
for sdist in "$up"/optional/*; do
  [ -e "$sdist" ] || continue
  name=$(basename "$sdist")
  if ! pip --no-deps --find-links "$up/tools" "$sdist" >"$tmp/optional-$name.log" 2>&1; then
    echo "optional: $name could not be built on this node (see $final/optional-$name.log)"
  fi
done
got=$("$tmp/bin/python" -c 'from common.version import build_id; print(build_id())')
if [ "$got" != {q(build)} ]; then
  echo "the installed agent is build $got, expected {build}" >&2
  exit 5
fi
if [ -d "$final" ]; then exit 0; fi
mv -T "$tmp" "$final"
"""


# The agent's state folder when its `ensure` did not say (common.paths.default_agent_dir).
DEFAULT_STATE = '"${VENDETTA_AGENT_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/vendetta-agent}"'


async def stop(
    conn: asyncssh.SSHClientConnection, node: str, agent_command: list[str] | None
) -> None:
    """Stop the agent with its own `stop`: ``agent_command``, or (not known since this
    coordinator started) through the newest build installed on the node, if any."""
    if agent_command is not None:
        script = what = shlex.join([*agent_command, "stop"])
    else:
        what = "the installed agent's stop"
        facts = await probe(conn, node)
        script = f"""\
cd {shlex.quote(facts.base)} 2>/dev/null || exit 0
for d in $(ls -1t); do
  [ -x "$d/bin/python" ] && exec "$d/bin/python" -m nodeagent.main stop
done
"""
    result = await _run(conn, node, script, "stopping the agent")
    if result.exit_status != 0:
        err = (str(result.stderr or "") + str(result.stdout or "")).strip()[-800:]
        raise FailedPreconditionError(
            f"node {node!r}: stopping the agent with {what} failed "
            f"(exit {result.exit_status}): {err}"
        )


async def purge(conn: asyncssh.SSHClientConnection, node: str, state_dir: str | None) -> None:
    """Remove the installed agents (<data>/vendetta/agent) and the agent's state folder
    (``state_dir``, where its `ensure` said it listens, else the default); the agent's
    `stop` has removed its systemd unit already."""
    facts = await probe(conn, node)
    state = shlex.quote(state_dir) if state_dir else DEFAULT_STATE
    script = f"""\
set -u
base={shlex.quote(facts.base)}; state={state}
case "$state" in /?*) ;; *) echo "not an absolute folder: '$state'" >&2; exit 3 ;; esac
[ "$state" != "$HOME" ] || {{ echo "the agent's state folder is the home folder" >&2; exit 3; }}
# Lingering that vendetta turned on for the agent's unit goes off with it.
if [ -e "$state/{LINGER_MARK}" ]; then loginctl disable-linger >/dev/null 2>&1 || true; fi
rm -rf -- "$base" "$state" || exit 1
rmdir -- "$(dirname -- "$base")" 2>/dev/null
exit 0
"""
    result = await _run(conn, node, script, "removing the agent")
    if result.exit_status != 0:
        err = (str(result.stderr or "") + str(result.stdout or "")).strip()[-800:]
        raise FailedPreconditionError(
            f"node {node!r}: removing the agent ({facts.base}) and its state failed: {err}"
        )


async def prune(conn: asyncssh.SSHClientConnection, node: str, agent_command: list[str]) -> None:
    """Keep the running build and the newest other one (rollback); remove older ones."""
    final = PurePosixPath(agent_command[0]).parent.parent
    script = f"""\
cd {shlex.quote(str(final.parent))} || exit 0
n=0
for d in $(ls -1t); do
  [ "$d" = {shlex.quote(final.name)} ] && continue
  n=$((n+1))
  [ $n -le 1 ] || rm -rf -- "$d"
done
"""
    result = await _run(conn, node, script, "removing old agent builds")
    if result.exit_status != 0:
        log.warning("node %s: removing old agent builds: %s", node, result.stderr)
