"""`python -m coordinator.main --home DIR`: the coordinator process (see `vendetta server`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from common.errors import InvalidArgumentError, VendettaError
from common.paths import vendetta_home
from coordinator.listener import check_config
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
    p.add_argument("--listen", default=None, help="also serve over TLS on HOST:PORT (tokens)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate (chain)")
    p.add_argument("--tls-key", type=Path, default=None, help="its PEM key (mode 0600)")
    args = p.parse_args(argv)
    try:
        listen = check_config(args.listen, args.tls_cert, args.tls_key)
    except InvalidArgumentError as exc:
        p.error(exc.message)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    agent_args = ["--docker-host", args.docker_host] if args.docker_host else []
    home = (args.home or vendetta_home()).absolute()
    try:
        asyncio.run(serve(home, agent_args, args.node_grace, listen))
    except VendettaError as exc:  # e.g. the listener's address taken since it was checked
        logging.getLogger("vendetta.coordinator").error("%s", exc.message)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
