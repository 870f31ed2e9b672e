"""HTTP/2 keepalive between the CLI and the coordinator.

The CLI pings the coordinator while it waits on a call: a coordinator that is
wedged (stopped, or its process stuck) fails the call with UNAVAILABLE within
about ``PING_EVERY + PING_TIMEOUT`` instead of leaving the user's command hanging,
however long the call itself may rightly take (an `up` running a setup hook).
The coordinator must allow those pings, also while a call sends nothing (a quiet
`logs -f`), or it would answer them with GOAWAY "too_many_pings".

Between the coordinator and its agents the node's heartbeat plays this role: when
it falls silent past the node's grace the channel is closed, ending every call.
"""

from __future__ import annotations

PING_EVERY_MS = 10_000
PING_TIMEOUT_MS = 10_000

CLIENT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", PING_EVERY_MS),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
    # What gRPC 1.5x+ actually waits for a ping's answer (else 60 s, whatever the above).
    ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging through a quiet stream
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", PING_EVERY_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]
