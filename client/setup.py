"""Stages the wheel's contents from the repository before setuptools builds it: the client
package, the generated stubs of the Coordinator service (vendetta.v1, with their .pyi and
py.typed) and the .proto files they came from. Nothing here is edited by hand."""

import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGE = HERE / "src"
GENERATED = ("__init__.py", "py.typed", "common_pb2", "coordinator_pb2")


def stage() -> None:
    if not (ROOT / "vendetta_client").is_dir():  # built from an sdist: already staged
        return
    shutil.rmtree(STAGE, ignore_errors=True)
    shutil.copytree(
        ROOT / "vendetta_client",
        STAGE / "vendetta_client",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    (STAGE / "vendetta" / "v1").mkdir(parents=True)
    for name in ("__init__.py", "py.typed"):
        shutil.copy(ROOT / "vendetta" / name, STAGE / "vendetta" / name)
    for path in sorted((ROOT / "vendetta" / "v1").iterdir()):
        if path.name.startswith(GENERATED):
            shutil.copy(path, STAGE / "vendetta" / "v1" / path.name)
    protos = STAGE / "vendetta_client" / "protos" / "vendetta" / "v1"
    protos.mkdir(parents=True)
    for name in ("common.proto", "coordinator.proto"):
        shutil.copy(ROOT / "protos" / "vendetta" / "v1" / name, protos / name)


stage()
setup()
