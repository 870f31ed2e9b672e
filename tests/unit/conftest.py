"""Fixtures of the unit tests: an in-process cluster of fake agents and a real coordinator."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import pytest

from coordinator import nodes
from tests.support.fakes import Cluster, running_cluster

# The grace period of nodes under `fast_reconnect`.
GRACE = 1.0


@pytest.fixture
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make node supervision quick: short backoff, frequent heartbeats, a short grace
    period before `disconnected`, short client wait."""
    monkeypatch.setattr(nodes, "BACKOFF_INITIAL", 0.02)
    monkeypatch.setattr(nodes, "BACKOFF_MAX", 0.1)
    monkeypatch.setattr(nodes, "HEARTBEAT_INTERVAL", 0.1)
    monkeypatch.setattr(nodes, "HEARTBEAT_TIMEOUT", 1.0)
    # Long enough for a loaded machine's hiccups (many heartbeats), short for the tests.
    monkeypatch.setattr(nodes, "DEFAULT_GRACE", GRACE)
    # NodeConnection.client waits up to 5 s (a default argument, not a module
    # constant) for a reconnect before failing; a disconnected node's RPCs would
    # each take that long.
    monkeypatch.setattr(
        nodes.NodeConnection,
        "client",
        functools.partialmethod(nodes.NodeConnection.client, wait=0.2),
    )


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """Nodes "local" and "node1", each with its own fake agent; all READY."""
    async with running_cluster() as c:
        yield c
