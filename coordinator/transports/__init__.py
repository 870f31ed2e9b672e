"""How a gRPC channel reaches a node's agent, and nothing else."""

from coordinator.transports.base import Transport
from coordinator.transports.local import LocalTransport
from coordinator.transports.ssh import SshTransport, scan_host_key

__all__ = ["LocalTransport", "SshTransport", "Transport", "scan_host_key"]
