"""The bytes `workspace logs` prints for one LogBatch, in either of its forms."""

from __future__ import annotations

from vendetta.v1 import common_pb2


def log_text(batch: common_pb2.LogBatch, *, prefix: bool) -> bytes:
    """Each line of ``batch`` ending in a newline; with ``prefix``, a service's lines
    start with "SERVICE | ". A compact block of the environment's own output is
    written as the agent sent it: no work per line on the way to the terminal."""
    if batch.lines:
        parts = [
            f"{ln.service} | {ln.text}" if prefix and ln.service else ln.text for ln in batch.lines
        ]
        parts.append("")
        return "\n".join(parts).encode("utf-8", "replace")
    if not (prefix and batch.service and batch.text):
        return batch.text
    head = f"{batch.service} | ".encode("utf-8", "replace")
    lines = batch.text.removesuffix(b"\n").split(b"\n")  # not splitlines: a lone \r stays
    return b"".join(head + line + b"\n" for line in lines)
