"""Which providers this agent offers, and dispatch of requests to them."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

from common.errors import FailedPreconditionError, InvalidArgumentError
from providers.base import INSTALLED, Capabilities, Provider, Readiness

log = logging.getLogger("vendetta.agent")


class ProviderSet:
    """The providers of one agent, by name. Built at start-up, never at import."""

    def __init__(self, providers: Mapping[str, Provider]) -> None:
        self._providers = dict(providers)

    def get(self, name: str) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            known = ", ".join(sorted(self._providers)) or "none"
            raise InvalidArgumentError(
                f"provider {name[:40]!r} is not available on this node (available: {known})"
            ) from None

    def all(self) -> list[Provider]:
        return list(self._providers.values())

    async def readiness(self) -> list[tuple[Provider, Readiness]]:
        providers = self.all()
        results = await asyncio.gather(*(p.readiness() for p in providers))
        return list(zip(providers, results, strict=True))

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self._providers.values()))


# What to do when a provider's SDK cannot be imported (the agent runs without it).
_SDK_FIXES: dict[str, str] = {
    "qemu": "libvirt-python (the libvirt binding, which has no wheels and is built on the "
    "node) is missing: install libvirt's development files, pkg-config, a C compiler and "
    "Python's headers on the node (Debian: `apt install libvirt-dev pkg-config gcc "
    "python3-dev`), then remove {prefix} on the node and reconnect it (`vendetta node "
    "remove NAME` and `vendetta node add ...`): the coordinator installs the agent again and "
    "builds it",
}


def _import_failure(name: str, exc: ImportError) -> str:
    fix = _SDK_FIXES.get(name, "reinstall the agent on this node")
    return f"cannot import {exc.name or 'its SDK'} ({exc}): " + fix.format(prefix=sys.prefix)


def unavailable(name: str, reason: str) -> type[Provider]:
    """A stand-in for a provider whose SDK failed to import: listed, never ready, says why."""

    def refuse(self: Provider, *args: object, **kwargs: object) -> NoReturn:
        raise FailedPreconditionError(f"the {name} provider cannot run on this node: {reason}")

    async def readiness(self: Provider) -> Readiness:
        return Readiness(ready=False, detail=reason, failed=INSTALLED)

    hooks = [*Provider.__abstractmethods__, "_images", "_import_image"]
    members: dict[str, object] = {hook: refuse for hook in hooks}
    members.update(name=name, capabilities=Capabilities(), readiness=readiness)
    return type(f"Unavailable{name.title()}Provider", (Provider,), members)


# name -> (module, class). Imported at agent start: a provider whose SDK is not
# installed is replaced by a stand-in that is never ready and says why and what to
# do, instead of taking the agent down.
PROVIDERS: dict[str, tuple[str, str]] = {
    "docker": ("providers.docker", "DockerProvider"),
    "qemu": ("providers.qemu", "QemuProvider"),
    "lxd": ("providers.lxd", "LxdProvider"),
}


def build_providers(
    agent_id: str,
    docker_host: str | None,
    options: Mapping[str, Callable[[type[Provider]], Provider]] | None = None,
    *,
    io_root: Path | None = None,
) -> ProviderSet:
    """``io_root``: the agent's folder for the FIFOs of Docker's commands on pipes."""
    built: dict[str, Provider] = {}
    factories: dict[str, Callable[[type[Provider]], Provider]] = {
        "docker": lambda cls: cls(agent_id, base_url=docker_host, io_root=io_root),  # type: ignore[call-arg]
        **(options or {}),
    }
    for name, (module, attr) in PROVIDERS.items():
        try:
            cls: type[Provider] = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            log.warning("provider %s unavailable: %s", name, exc)
            built[name] = unavailable(name, _import_failure(name, exc))(agent_id)
            continue
        make = factories.get(name)
        built[name] = make(cls) if make else cls(agent_id)
    return ProviderSet(built)
