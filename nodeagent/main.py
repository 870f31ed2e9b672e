"""`vendetta-agent`: the node agent's own small command line.

vendetta-agent [--dir D] [--docker-host URL] run      # foreground
vendetta-agent [--dir D] [--docker-host URL] ensure   # start if not answering; prints JSON
                                                      # (a systemd --user unit where lingering
                                                      # is on, else detached: common.agent_unit)
vendetta-agent [--dir D] stop | status
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from common import agent_process, agent_unit
from common.errors import VendettaError
from common.paths import agent_pid, agent_socket, default_agent_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vendetta-agent", description="vendetta node agent")
    p.add_argument("--dir", type=Path, default=None, help="state folder (socket, log, id)")
    p.add_argument("--docker-host", default=None, help="Docker engine URL (default: DOCKER_HOST)")
    p.add_argument("command", choices=["run", "ensure", "stop", "status"])
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    agent_dir: Path = (args.dir or default_agent_dir()).expanduser().absolute()
    run_args = ["--docker-host", args.docker_host] if args.docker_host else []
    try:
        if args.command == "run":
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
            from nodeagent.server import serve  # the agent and its providers: only when serving

            asyncio.run(serve(agent_dir, docker_host=args.docker_host))
        elif args.command == "ensure":
            status = asyncio.run(agent_process.ensure(agent_dir, run_args, unit=True))
            print(json.dumps(asdict(status)))
        elif args.command == "stop":
            stopped = asyncio.run(agent_process.stop(agent_dir))
            print("stopped" if stopped else "not running")
        else:
            info = asyncio.run(agent_process.probe(agent_socket(agent_dir)))
            if info is None:
                print(f"not running ({agent_socket(agent_dir)})")
                sys.exit(1)
            unit_pid = asyncio.run(agent_unit.main_pid(agent_dir))
            how = agent_unit.describe(agent_dir, unit_pid > 0, agent_pid(agent_dir))
            print(
                f"running: agent {info.agent_id} version {info.version} at {info.socket_path}, "
                f"as a {how}"
            )
    except VendettaError as exc:
        print(f"vendetta-agent: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
