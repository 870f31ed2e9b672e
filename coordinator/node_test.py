"""`vendetta node test`: measure a node and check what it reports, one row per check.

Measured from the coordinator: a fresh SSH connection (connect, host key against
the pinned one, authentication), the agent's build and how it runs (a
``systemd --user`` unit or a detached process), the round trip of
heartbeats through the tunnel, and a few MB sent through the tunnel to the
agent. Then each provider's checks, in the order the agent tried them
(``providers.base.CHECKS``): those before the failing one passed, those after it
were not checked. A failing row says what to do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from common.errors import HostKeyMismatchError, PermissionDeniedError, VendettaError
from coordinator.agent_client import AgentClient
from coordinator.nodes import NodeConnection
from coordinator.transports.ssh import SshTransport
from vendetta.v1 import common_pb2

HEARTBEATS = 20
SINK_BYTES = 4 * 2**20

# The provider checks, in order (as ``providers.base.CHECKS``, which the coordinator
# may not import: the agent names them in ``ProviderInfo.failed_check``).
PROVIDER_CHECKS = ("installed", "reachable", "permitted", "usable", "images")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    value: str
    fix: str = ""
    provider: str = ""
    skipped: bool = False


def skipped(name: str, provider: str = "") -> Check:
    return Check(name, ok=False, value="not checked", provider=provider, skipped=True)


@dataclass
class NodeTestResult:
    checks: list[Check] = field(default_factory=list)
    ssh_seconds: float = 0.0
    rtt_p50: float = 0.0
    rtt_p99: float = 0.0
    heartbeats: int = 0
    throughput: float = 0.0  # bytes a second through the tunnel

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if not c.skipped)


def percentile(samples: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ``samples``."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def ssh_checks(
    node: str, fingerprint: str, probe: Callable[[], Awaitable[float]]
) -> tuple[list[Check], float]:
    """The rows "ssh connect" and "host key", and the connect time (0 if it failed)."""
    try:
        seconds = await probe()
    except HostKeyMismatchError as exc:
        return [
            Check(
                "ssh connect",
                False,
                "refused: the host key changed",
                fix=f"see the host key row; after checking, `vendetta node trust {node}`",
            ),
            Check("host key", False, f"pinned {fingerprint}: does not match", fix=exc.message),
        ], 0.0
    except PermissionDeniedError as exc:
        # The host key is checked before authentication: it matched.
        return [
            Check("ssh connect", False, "authentication refused", fix=exc.message),
            Check("host key", True, f"{fingerprint} (pinned, matches)"),
        ], 0.0
    except VendettaError as exc:
        return [
            Check("ssh connect", False, "cannot connect", fix=exc.message),
            skipped("host key"),
        ], 0.0
    return [
        Check("ssh connect", True, f"{ms(seconds)} (connect and authenticate)"),
        Check("host key", True, f"{fingerprint} (pinned, matches)"),
    ], seconds


def version_check(node: str, agent: str, coordinator: str, hand_installed: bool) -> Check:
    if agent == coordinator:
        return Check("agent version", True, agent)
    if hand_installed:
        fix = (
            f"the agent on {node} was installed by hand (--agent-command): install the "
            f"coordinator's build ({coordinator}) there, or add the node again without "
            "--agent-command so the coordinator installs its own"
        )
    else:
        fix = (
            f"the coordinator installs its own build at the next connect: reconnect {node} "
            f"(`vendetta node remove {node}`, then `vendetta node add` it again)"
        )
    return Check("agent version", False, f"{agent or 'unknown'}, coordinator {coordinator}", fix)


async def round_trip(client: AgentClient, count: int, result: NodeTestResult) -> Check:
    samples: list[float] = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            await client.heartbeat()
            samples.append(time.perf_counter() - t0)
    except VendettaError as exc:
        return Check(
            "round trip",
            False,
            f"failed after {len(samples)} of {count} heartbeats",
            fix=f"{exc.message}; check the node's network and load, then test it again",
        )
    result.heartbeats = len(samples)
    result.rtt_p50 = percentile(samples, 50)
    result.rtt_p99 = percentile(samples, 99)
    return Check(
        "round trip",
        True,
        f"p50 {ms(result.rtt_p50)}, p99 {ms(result.rtt_p99)} over {count} heartbeats",
    )


async def throughput(
    client: AgentClient, total: int, result: NodeTestResult, carrier: str = ""
) -> Check:
    t0 = time.perf_counter()
    try:
        received = await client.sink(total)
    except VendettaError as exc:
        return Check(
            "tunnel throughput",
            False,
            "failed",
            fix=f"{exc.message}; check the node's network, then test it again",
        )
    elapsed = time.perf_counter() - t0
    if received != total:
        return Check(
            "tunnel throughput",
            False,
            f"the agent received {received} of {total} bytes",
            fix="the tunnel lost data: reconnect the node and test it again",
        )
    result.throughput = total / elapsed if elapsed > 0 else 0.0
    return Check(
        "tunnel throughput",
        True,
        f"{result.throughput / 1e6:.1f} MB/s ({total // 2**20} MiB to the agent)"
        + (f", {carrier}" if carrier else ""),
    )


def provider_checks(p: common_pb2.ProviderInfo) -> list[Check]:
    """One row per check of ``PROVIDER_CHECKS``, from what the agent reports."""
    failed = "" if p.ready else (p.failed_check or "usable")  # an older agent says no more
    if failed and failed not in PROVIDER_CHECKS:  # a check this coordinator does not know
        failed = "usable"
    rows: list[Check] = []
    for name in PROVIDER_CHECKS:
        if failed and PROVIDER_CHECKS.index(name) > PROVIDER_CHECKS.index(failed):
            rows.append(skipped(name, p.name))
        elif name == failed:
            rows.append(Check(name, False, "no", fix=p.detail, provider=p.name))
        else:
            rows.append(Check(name, True, _passed_value(p, name), provider=p.name))
    return rows


def _passed_value(p: common_pb2.ProviderInfo, check: str) -> str:
    if check == "installed":
        return p.version or "yes"
    if check == "usable":
        return p.mode or "yes"
    if check == "images":
        if not p.images:
            return "none on the node yet"
        shown = ", ".join(p.images[:5])
        more = f" and {len(p.images) - 5} more" if len(p.images) > 5 else ""
        return f"{len(p.images)}: {shown}{more}"
    return "yes"


async def run(
    conn: NodeConnection,
    coordinator_version: str,
    *,
    heartbeats: int = HEARTBEATS,
    sink_bytes: int = SINK_BYTES,
) -> NodeTestResult:
    """Every row of `node test` for ``conn``; refreshes what the node reports."""
    result = NodeTestResult()
    transport = conn.transport
    ssh = isinstance(transport, SshTransport)
    if isinstance(transport, SshTransport):
        rows, result.ssh_seconds = await ssh_checks(
            conn.name, conn.record.host_key_fingerprint, transport.probe_connect
        )
        result.checks += rows
    try:
        client = await conn.client()
        conn.info = info = await client.info()
    except VendettaError as exc:
        result.checks.append(
            Check(
                "agent version",
                False,
                "no answer from the agent",
                fix=f"{exc.message}; the coordinator keeps reconnecting: `vendetta node status "
                f"{conn.name}` shows why it cannot",
            )
        )
        result.checks += [skipped("round trip")] + ([skipped("tunnel throughput")] if ssh else [])
        return result
    hand = isinstance(transport, SshTransport) and transport.agent_command is not None
    result.checks.append(version_check(conn.name, info.version, coordinator_version, hand))
    if isinstance(transport, SshTransport) and transport.agent_run_as:
        result.checks.append(Check("agent runs as", True, transport.agent_run_as))
    result.checks.append(await round_trip(client, heartbeats, result))
    if isinstance(transport, SshTransport):  # the local node's agent is here: no tunnel
        carrier = (
            "carried by OpenSSH (ssh -L)"
            if transport.tunnel_pid is not None
            else "carried by the coordinator (asyncssh; no usable `ssh` client here)"
        )
        result.checks.append(await throughput(client, sink_bytes, result, carrier))
    for p in info.providers:
        result.checks += provider_checks(p)
    return result
