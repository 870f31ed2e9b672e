"""The agent bundle: a pip wheelhouse the coordinator sends to a node over SSH.

One bundle per build, node Python (3.X) and CPU architecture, made with pip on
the coordinator's machine and kept under ``$VENDETTA_HOME/bundles/``:

    <build>-cp3XX-<arch>/
        wheels/     vendetta's own wheel and its runtime dependencies (binary wheels
                    for that Python and architecture): installed with pip --no-index
        tools/      pip's wheel (runs from the wheel: the node needs no ensurepip) and
                    setuptools' (to build the optional sdists)
        optional/   libvirt-python's sdist: it has no wheels, the node builds it if it
                    can (libvirt's headers and a compiler); the agent runs without it

The node needs no package index: the coordinator's machine fetches everything
(PyPI or whatever index its pip is configured with). A bundle is built into a
temporary folder and renamed when complete, so a cached bundle is always whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common.errors import FailedPreconditionError
from common.version import PACKAGES, build_id, build_id_of, source_root

# The Pythons the agent runs on: our code needs 3.11 (pyproject's requires-python);
# grpcio 1.85 and pydantic-core publish binary wheels up to 3.14.
SUPPORTED_PYTHONS: tuple[tuple[int, int], ...] = ((3, 11), (3, 12), (3, 13), (3, 14))
# CPU architectures (uname -m) with manylinux wheels for every dependency.
SUPPORTED_ARCHES = ("x86_64", "aarch64")
# Wheels tagged up to manylinux_2_28: a node needs glibc 2.28 or newer.
MIN_GLIBC = (2, 28)
# Dependencies without wheels: shipped as sdists, built on the node if possible.
OPTIONAL_SDISTS = ("libvirt-python",)
PIP_TIMEOUT = 600.0


def supported_pythons() -> str:
    return ", ".join(f"{major}.{minor}" for major, minor in SUPPORTED_PYTHONS)


@dataclass(frozen=True)
class Bundle:
    path: Path
    build: str

    @property
    def wheels(self) -> list[Path]:
        return sorted((self.path / "wheels").glob("*.whl"))

    @property
    def tools(self) -> list[Path]:
        return sorted((self.path / "tools").glob("*"))

    @property
    def optional(self) -> list[Path]:
        return sorted((self.path / "optional").glob("*"))

    @property
    def pip_wheel(self) -> Path:
        (pip,) = (self.path / "tools").glob("pip-*.whl")
        return pip

    def space_needed(self) -> int:
        """Bytes an install takes on the node at its peak (reads the wheels: call it in a
        thread): the upload, plus the venv: the wheels unpacked, and the .pyc files pip
        compiles, about half as much again (measured: 60 MB unpacked, an 87 MB venv)."""
        sent = sum(f.stat().st_size for f in (*self.wheels, *self.tools, *self.optional))
        unpacked = 0
        for wheel in self.wheels:
            with zipfile.ZipFile(wheel) as zf:
                unpacked += sum(info.file_size for info in zf.infolist())
        return sent + unpacked * 3 // 2 + (8 << 20)


def bundle_key(python: tuple[int, int], arch: str) -> str:
    return f"{build_id()}-cp{python[0]}{python[1]}-{arch}"


_locks: dict[str, asyncio.Lock] = {}


async def get_bundle(bundles_dir: Path, python: tuple[int, int], arch: str) -> Bundle:
    """The cached bundle for ``python`` and ``arch``, built first if missing."""
    key = bundle_key(python, arch)
    async with _locks.setdefault(key, asyncio.Lock()):
        path = bundles_dir / key
        if not await asyncio.to_thread(path.is_dir):
            await _build(bundles_dir, path, python, arch)
        return Bundle(path, build_id())


async def _pip(*args: str, what: str) -> None:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), PIP_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise FailedPreconditionError(
            f"building the agent bundle: {what} took more than {PIP_TIMEOUT:.0f} s"
        ) from None
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip()[-1500:]
        raise FailedPreconditionError(
            f"building the agent bundle on this machine failed ({what}): {tail}. The "
            "coordinator's machine needs pip and a reachable package index (PyPI or the "
            "index pip is configured with); the node needs neither"
        )


def _copy_sources(dest: Path) -> str:
    """Copy vendetta's project (pyproject and packages) to ``dest``; its build id."""
    root = source_root()
    if not (root / "pyproject.toml").is_file():
        raise FailedPreconditionError(
            f"cannot build the agent bundle: vendetta's sources (pyproject.toml) are not in "
            f"{root}. Run the coordinator from a source checkout or an install of one, or "
            "install vendetta on the node yourself and add it with --agent-command"
        )
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        if (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    for package in PACKAGES:
        shutil.copytree(root / package, dest / package, ignore=ignore)
    return build_id_of(dest)


def _requirements(wheel: Path) -> tuple[list[str], list[str]]:
    """The runtime requirements of ``wheel`` (its METADATA): (with wheels, optional sdists)."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(name).decode()
    reqs: list[str] = []
    optional: list[str] = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        project = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]
        (optional if project.lower() in OPTIONAL_SDISTS else reqs).append(req)
    return reqs, optional


async def _build(bundles_dir: Path, path: Path, python: tuple[int, int], arch: str) -> None:
    await asyncio.to_thread(bundles_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".build-", dir=bundles_dir))
    try:
        src, out = work / "src", work / "bundle"
        for d in (src, out / "wheels", out / "tools", out / "optional"):
            await asyncio.to_thread(d.mkdir, parents=True)
        copied = await asyncio.to_thread(_copy_sources, src)
        if copied != build_id():
            raise FailedPreconditionError(
                f"vendetta's sources changed since the coordinator started (it runs build "
                f"{build_id()}, the sources are now {copied}): restart the coordinator "
                "(`vendetta server stop && vendetta server start`) so the agent it installs "
                "is the code it speaks"
            )
        # Without build isolation when setuptools is at hand (no download, faster).
        no_isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
        await _pip(
            "wheel", "--no-deps", *no_isolation, "-w", str(out / "wheels"), str(src),
            what="vendetta's own wheel",
        )  # fmt: skip
        (own,) = (out / "wheels").glob("vendetta-*.whl")
        required, optional = await asyncio.to_thread(_requirements, own)
        tag = f"cp{python[0]}{python[1]}"
        platforms = [f"manylinux2014_{arch}"] + [
            f"manylinux_2_{minor}_{arch}" for minor in range(17, MIN_GLIBC[1] + 1)
        ]
        target = ["--python-version", f"{python[0]}.{python[1]}", "--implementation", "cp"]
        target += ["--abi", tag, "--abi", "abi3", "--abi", "none"]
        for platform in platforms:
            target += ["--platform", platform]
        binary = ["download", "--only-binary=:all:", *target]
        await _pip(
            *binary, "-d", str(out / "wheels"), *required,
            what=f"the dependencies for Python {python[0]}.{python[1]} on {arch}",
        )  # fmt: skip
        await _pip(*binary, "-d", str(out / "tools"), "pip", "setuptools", what="pip")
        if optional:
            await _pip(
                "download", "--no-deps", "--no-binary=:all:", "-d", str(out / "optional"),
                *optional, what="the sdists built on the node (libvirt-python)",
            )  # fmt: skip
        with contextlib.suppress(FileExistsError, OSError):
            await asyncio.to_thread(out.rename, path)
        if not await asyncio.to_thread(path.is_dir):
            raise FailedPreconditionError(f"could not store the agent bundle in {path}")
    finally:
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
