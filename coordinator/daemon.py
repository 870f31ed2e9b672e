"""Run the coordinator in the background: pid file, log file, readiness wait."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc.aio

from common.paths import coordinator_log, coordinator_pid, coordinator_socket, private_dir
from common.process import read_pid, start_detached, terminate
from common.version import build_id
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import coordinator_pb2_grpc

if TYPE_CHECKING:
    from coordinator.listener import ListenConfig


async def probe(home: Path, timeout: float = 2.0) -> pb.ServerInfo | None:
    sock = coordinator_socket(home)
    if not os.path.exists(sock):
        return None
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        try:
            return await coordinator_pb2_grpc.CoordinatorStub(channel).GetServerInfo(
                pb.GetServerInfoRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return None


def listen_config(listen: str | None, cert: Path | None, key: Path | None) -> ListenConfig | None:
    """The TLS listener's settings, checked here first so that bad input is one line,
    not a failed start and a log to read."""
    if listen is None and cert is None and key is None:
        return None
    from coordinator.listener import check_config  # loads TLS and gRPC extras: only here

    return check_config(listen, cert, key)


def listen_args(config: ListenConfig | None) -> list[str]:
    """The coordinator process's arguments for ``config``."""
    if config is None:
        return []
    host = f"[{config.host}]" if ":" in config.host else config.host
    args = ["--listen", f"{host}:{config.port}"]
    if config.cert_file is not None and config.key_file is not None:
        args += ["--tls-cert", str(config.cert_file.absolute())]
        args += ["--tls-key", str(config.key_file.absolute())]
    return args


async def start(
    home: Path, extra_args: list[str], timeout: float = 30.0
) -> tuple[pb.ServerInfo, bool]:
    """Start the coordinator unless it answers already; (info, started_now)."""
    await asyncio.to_thread(private_dir, home)
    info = await probe(home)
    if info is not None and info.version == build_id():
        return info, False
    if info is not None:  # another build is running (vendetta was upgraded): replace it
        await stop(home)
    argv = [sys.executable, "-m", "coordinator.main", "--home", str(home), *extra_args]
    started, _ = await start_detached(
        "coordinator", argv, coordinator_log(home), lambda: probe(home, 1.0), timeout
    )
    return started, True


async def stop(home: Path, timeout: float = 20.0) -> bool:
    pid = await asyncio.to_thread(read_pid, coordinator_pid(home))
    stopped = await terminate(pid, timeout)
    if not stopped:
        with contextlib.suppress(FileNotFoundError):
            coordinator_pid(home).unlink()
    return stopped
