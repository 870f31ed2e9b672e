"""Which providers this agent offers, and dispatch of requests to them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from common.errors import InvalidArgumentError
from providers.base import Provider, Readiness


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


def build_providers(agent_id: str, docker_host: str | None) -> ProviderSet:
    from providers.docker import DockerProvider

    return ProviderSet({"docker": DockerProvider(agent_id, base_url=docker_host)})
