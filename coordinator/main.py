"""`python -m coordinator.main --home DIR`: the coordinator process (see `vendetta server`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from common.paths import vendetta_home
from coordinator.server import serve


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vendetta-coordinator")
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--docker-host", default=None, help="Docker engine URL for the local node")
    p.add_argument(
        "--node-grace",
        type=float,
        default=None,
        help="seconds without an answer before a node is disconnected (default 15)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    agent_args = ["--docker-host", args.docker_host] if args.docker_host else []
    asyncio.run(serve((args.home or vendetta_home()).absolute(), agent_args, args.node_grace))


if __name__ == "__main__":
    main()
