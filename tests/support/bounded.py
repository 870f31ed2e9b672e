"""A child process with bounded memory, started without running Python in the
forked child (no ``preexec_fn``): a test process that has used gRPC has its
threads, and a plain fork()ed child ran gRPC's fork handling, whose error
lines then led the child's output (seen on two test workers)."""

from __future__ import annotations

MEMORY = 1 << 30  # 1 GiB of address space: an unbounded read fails, not the machine


def bounded(argv: list[str], memory: int = MEMORY) -> list[str]:
    """``argv`` run under util-linux's prlimit with at most ``memory`` bytes of
    address space."""
    return ["prlimit", f"--as={memory}", "--", *argv]
