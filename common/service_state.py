"""The life of a service: what the agent's supervisor reports and the coordinator shows."""

from __future__ import annotations

import enum


class ServiceState(enum.Enum):
    UNSPECIFIED = "unspecified"  # not reported yet (the supervisor never says this)
    PENDING = "pending"  # waiting for its dependencies
    STARTING = "starting"  # running, health not yet passed
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # was healthy, checks now fail
    EXITED = "exited"  # ended (stopped, or no restart wanted)
    FAILED = "failed"  # never became healthy, or gave up restarting
    STOPPED = "stopped"  # stopped by `down`
