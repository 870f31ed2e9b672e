"""Which providers this agent offers, and dispatch of requests to them."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable, Mapping

from common.errors import InvalidArgumentError
from providers.base import Provider, Readiness

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
                f"provider {name!r} is not available on this node (available: {known})"
            ) from None

    def all(self) -> list[Provider]:
        return list(self._providers.values())

    async def readiness(self) -> list[tuple[Provider, Readiness]]:
        providers = self.all()
        results = await asyncio.gather(*(p.readiness() for p in providers))
        return list(zip(providers, results, strict=True))

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self._providers.values()))


# name -> (module, class). Imported at agent start: a provider whose SDK is not
# installed is left out (and logged) instead of taking the agent down.
PROVIDERS: dict[str, tuple[str, str]] = {
    "docker": ("providers.docker", "DockerProvider"),
    "qemu": ("providers.qemu", "QemuProvider"),
    "lxd": ("providers.lxd", "LxdProvider"),
}


def build_providers(
    agent_id: str,
    docker_host: str | None,
    options: Mapping[str, Callable[[type[Provider]], Provider]] | None = None,
) -> ProviderSet:
    built: dict[str, Provider] = {}
    factories: dict[str, Callable[[type[Provider]], Provider]] = {
        "docker": lambda cls: cls(agent_id, base_url=docker_host),  # type: ignore[call-arg]
        **(options or {}),
    }
    for name, (module, attr) in PROVIDERS.items():
        try:
            cls: type[Provider] = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            log.warning("provider %s unavailable: %s", name, exc)
            continue
        make = factories.get(name)
        built[name] = make(cls) if make else cls(agent_id)
    return ProviderSet(built)
