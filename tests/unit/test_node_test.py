"""`node test`: the rows and their fixes, from fakes; and through the coordinator's wire."""

from __future__ import annotations

import pytest

from common.errors import (
    HostKeyMismatchError,
    NodeUnreachableError,
    PermissionDeniedError,
    VendettaError,
)
from common.version import build_id
from coordinator import node_test
from coordinator.node_test import Check, percentile, provider_checks, ssh_checks, version_check
from providers.base import CHECKS, Readiness
from tests.support.fakes import Cluster
from vendetta.v1 import common_pb2
from vendetta.v1 import coordinator_pb2 as pb

FP = "SHA256:abc"


def test_the_coordinator_knows_the_providers_checks_in_their_order() -> None:
    assert node_test.PROVIDER_CHECKS == CHECKS


def test_percentiles_are_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 21)]  # 1..20
    assert percentile(samples, 50) == 10.0
    assert percentile(samples, 99) == 20.0
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


async def _probe_ok() -> float:
    return 0.042


def _raising(exc: VendettaError):  # type: ignore[no-untyped-def]
    async def probe() -> float:
        raise exc

    return probe


async def test_ssh_rows_when_the_connect_works() -> None:
    rows, seconds = await ssh_checks("n1", FP, _probe_ok)
    assert seconds == 0.042
    assert [(r.name, r.ok) for r in rows] == [("ssh connect", True), ("host key", True)]
    assert rows[0].value.startswith("42.0 ms")
    assert rows[1].value == f"{FP} (pinned, matches)"


async def test_a_changed_host_key_fails_both_rows_and_says_to_trust_after_checking() -> None:
    mismatch = HostKeyMismatchError("the SSH host key has changed: `vendetta node trust n1`")
    rows, seconds = await ssh_checks("n1", FP, _raising(mismatch))
    assert seconds == 0.0
    assert [(r.name, r.ok) for r in rows] == [("ssh connect", False), ("host key", False)]
    assert "does not match" in rows[1].value
    assert "vendetta node trust n1" in rows[0].fix and "vendetta node trust n1" in rows[1].fix


async def test_a_refused_key_fails_the_connect_but_the_host_key_matched() -> None:
    rows, _ = await ssh_checks("n1", FP, _raising(PermissionDeniedError("add the key")))
    assert [(r.name, r.ok) for r in rows] == [("ssh connect", False), ("host key", True)]
    assert rows[0].fix == "add the key"


async def test_an_unreachable_node_leaves_the_host_key_unchecked() -> None:
    rows, _ = await ssh_checks("n1", FP, _raising(NodeUnreachableError("is sshd up?")))
    assert rows[0] == Check("ssh connect", False, "cannot connect", fix="is sshd up?")
    assert rows[1].skipped and not rows[1].ok


def test_agent_version_rows() -> None:
    assert version_check("n1", "1+a", "1+a", hand_installed=False).ok
    other = version_check("n1", "1+b", "1+a", hand_installed=False)
    assert not other.ok and "1+b" in other.value and "1+a" in other.value
    assert "vendetta node remove n1" in other.fix
    hand = version_check("n1", "1+b", "1+a", hand_installed=True)
    assert "--agent-command" in hand.fix and "1+a" in hand.fix


def _info(r: Readiness, name: str = "docker") -> common_pb2.ProviderInfo:
    return common_pb2.ProviderInfo(
        name=name,
        ready=r.ready,
        detail=r.detail,
        version=r.version,
        images=list(r.images),
        failed_check=r.failed,
        mode=r.mode,
    )


def test_a_ready_provider_passes_every_check() -> None:
    rows = provider_checks(
        _info(Readiness(True, "ok", version="9.0", images=("a", "b"), mode="KVM"), "qemu")
    )
    assert [(r.name, r.ok, r.skipped) for r in rows] == [(c, True, False) for c in CHECKS]
    values = {r.name: r.value for r in rows}
    assert values["installed"] == "9.0"
    assert values["usable"] == "KVM"
    assert values["images"] == "2: a, b"
    assert all(r.provider == "qemu" for r in rows)


@pytest.mark.parametrize("failed", CHECKS)
def test_the_failing_check_says_what_to_do_and_later_ones_are_unchecked(failed: str) -> None:
    fix = f"what to do about {failed}"
    rows = provider_checks(_info(Readiness(False, fix, failed=failed)))
    at = CHECKS.index(failed)
    assert all(r.ok and not r.skipped for r in rows[:at])
    assert rows[at] == Check(failed, False, "no", fix=fix, provider="docker")
    assert all(r.skipped and r.value == "not checked" for r in rows[at + 1 :])


def test_a_not_ready_provider_from_an_older_agent_fails_usable() -> None:
    rows = provider_checks(_info(Readiness(False, "broken")))
    assert [r.name for r in rows if not r.ok and not r.skipped] == ["usable"]


async def test_test_node_through_the_wire_for_a_node_without_ssh(cluster: Cluster) -> None:
    cluster.provider("node1").readiness_value = Readiness(
        False, "Docker daemon not reachable: start it", failed="reachable"
    )
    resp = await cluster.stub.TestNode(pb.GetNodeRequest(name="node1"))
    rows = {(c.provider, c.name): c for c in resp.checks}
    # A fake transport is no SSH: no connect, host key or tunnel rows.
    assert ("", "ssh connect") not in rows and ("", "tunnel throughput") not in rows
    assert rows[("", "agent version")].ok and rows[("", "agent version")].value == build_id()
    assert rows[("", "round trip")].ok
    assert resp.heartbeats == node_test.HEARTBEATS
    assert 0 < resp.rtt_p50_seconds <= resp.rtt_p99_seconds
    assert resp.agent_rtt_seconds == resp.rtt_p50_seconds
    provider = resp.node.providers[0].name
    assert rows[(provider, "installed")].ok
    reachable = rows[(provider, "reachable")]
    assert not reachable.ok and reachable.fix == "Docker daemon not reachable: start it"
    assert rows[(provider, "images")].skipped
    assert not resp.ok


async def test_the_agent_sink_counts_what_it_is_sent(cluster: Cluster) -> None:
    conn = cluster.coordinator.nodes.get("node1")
    client = await conn.client()
    assert await client.sink(1_000_000, chunk=64 * 1024) == 1_000_000
