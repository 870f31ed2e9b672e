"""Whether KVM actually runs guests on this node: probed once per boot. Blocking.

/dev/kvm can exist and still fail: at the first vCPU run (nested virtualisation
without the MSRs QEMU needs), or only once a guest kernel runs an instruction
the hypervisor must emulate and cannot (kvm-pvm, on some nested hosts: the
kernel crawls for a minute, then QEMU reports "KVM internal error" and pauses
the guest for ever). So the probe boots a guest's own kernel under KVM with no
root disk: a working KVM runs it to its panic in a second or two and QEMU exits
(``-no-reboot``). Without a kernel at hand, a bare QEMU that stays up for a
second is taken to work. The answer is kept for the host's boot in
``~/.cache/vendetta/kvm-probe.json``, so agents after the first skip the test boot.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import stat
import subprocess
import threading
import time
from pathlib import Path

from providers.access import group_fix, permission_hint

# A working KVM boots a kernel to its panic in a second or two (TCG in about as long).
BOOT_SECONDS = 10.0
_FAILED = b"internal error"

_lock = threading.Lock()
# Keyed by whether a kernel was booted: that answer, once known, is the one given.
_probed: dict[bool, tuple[bool, str]] = {}


def known(kernel: Path | None = None) -> tuple[bool, str] | None:
    """What ``probe_kvm(kernel)`` would answer, if it has been probed; never blocks on one."""
    if True in _probed:
        return _probed[True]
    return _probed.get(False) if kernel is None else None


def probe_kvm(kernel: Path | None = None) -> tuple[bool, str]:
    """(usable, why): does KVM run guests here? ``kernel``: a guest kernel to boot."""
    with _lock:
        if True in _probed:
            return _probed[True]
        if kernel is None and False in _probed:
            return _probed[False]
        if not os.path.exists("/dev/kvm"):
            result = (False, "/dev/kvm does not exist")
        elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
            result = (False, _denied())
        elif (remembered := _remembered(kernel)) is not None:
            result = remembered
        else:
            result = _run_kvm_probe(kernel)
            _remember(kernel, result)
        _probed[kernel is not None] = result
        return result


def _denied() -> str:
    """What keeps this user from /dev/kvm, and the fix."""
    try:
        st = os.stat("/dev/kvm")
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    if st.st_gid == 0 or not st.st_mode & stat.S_IRWXG:
        # No udev here: the node has never given /dev/kvm to its group.
        return (
            f"/dev/kvm is root's only (mode {stat.S_IMODE(st.st_mode):04o}): give it to the kvm "
            "group as udev does (`sudo chgrp kvm /dev/kvm && sudo chmod 660 /dev/kvm`), "
            f"then {group_fix('kvm')}"
        )
    return permission_hint("/dev/kvm", "kvm")


def _cache_key(kernel: Path | None) -> str:
    """What the answer depends on: this boot of the host, the kernel booted, QEMU."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    for path in (kernel, Path(_find_qemu() or "/nonexistent")):
        if path is not None:
            with contextlib.suppress(OSError):
                st = path.stat()
                parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vendetta" / "kvm-probe.json"


def _remembered(kernel: Path | None) -> tuple[bool, str] | None:
    """The answer of an earlier probe on this boot (every agent on a host shares it:
    the test boot costs a CPU for up to 10 s)."""
    try:
        saved = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != _cache_key(kernel):
        return None
    return bool(saved.get("usable")), str(saved.get("why", ""))


def _remember(kernel: Path | None, result: tuple[bool, str]) -> None:
    path = _cache_file()
    record = {"key": _cache_key(kernel), "usable": result[0], "why": result[1]}
    with contextlib.suppress(OSError):  # a cache: without it, the next agent probes again
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        temp.write_text(json.dumps(record))
        os.replace(temp, path)


def _run_kvm_probe(kernel: Path | None) -> tuple[bool, str]:
    qemu = _find_qemu()
    if not qemu:
        return False, "qemu-system-x86_64 not found"
    argv = [qemu, "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-nodefaults"]
    argv += ["-no-user-config", "-display", "none", "-monitor", "none", "-serial", "none"]
    if kernel is None:
        return _stays_up([*argv, "-m", "32"])
    argv += ["-m", "128", "-no-reboot", "-kernel", str(kernel)]
    argv += ["-append", "panic=-1 root=/dev/nonexistent"]
    return _boots(argv)


def _stays_up(argv: list[str]) -> tuple[bool, str]:
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _, err = proc.communicate(timeout=1.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return True, "KVM works"
    return False, _failure(err, proc.returncode)


def _boots(argv: list[str]) -> tuple[bool, str]:
    """Boot the kernel until QEMU exits, reports an internal error, or BOOT_SECONDS pass."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    err = b""
    deadline = time.monotonic() + BOOT_SECONDS
    try:
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([proc.stderr], [], [], left)
            if not readable:
                break
            data = os.read(proc.stderr.fileno(), 4096)
            if not data:  # QEMU exited
                break
            err += data
            if _FAILED in err.lower():
                return False, _failure(err, None)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    if time.monotonic() >= deadline:
        return False, (
            f"KVM did not boot a guest kernel within {BOOT_SECONDS:.0f}s (a working KVM takes "
            "a second or two)"
        )
    if proc.returncode != 0:
        return False, _failure(err, proc.returncode)
    return True, "KVM works"


def _failure(err: bytes, code: int | None) -> str:
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return f"KVM does not run guests here ({lines[0] if lines else code})"


def _find_qemu() -> str:
    for path in ("/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm"):
        if os.access(path, os.X_OK):
            return path
    return ""


__all__ = ["known", "probe_kvm"]
