"""Rule files for AI coding agents, from the project's templates (`agents: {rules: [...]}`):
`workspace up` renders each with the workspace's facts into its workdir, so an agent
working inside knows its environment (services and URLs, ports, how to run commands,
the MCP endpoint).

A template is text with ``{{ fact }}`` placeholders (FACTS below); its file name less
``.tmpl``/``.template``/``.j2``/``.in`` is what is written (``AGENTS.md.tmpl`` ->
``WORKDIR/AGENTS.md``). Templates are read and checked before the workspace starts, so
a wrong one changes nothing.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, FailedPreconditionError
from common.rpc_errors import mapped_rpc_errors
from vendetta.v1 import common_pb2 as cpb
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import coordinator_pb2_grpc

FACTS = {
    "workspace": "the workspace's name",
    "node": "the node it runs on",
    "provider": "docker, lxd or qemu",
    "image": "its image",
    "workdir": "the folder inside where the code is and commands start",
    "services": "a list of its services with their ports and URLs",
    "ports": "each service port inside -> where it is on the coordinator's machine",
    "exec": "how to run a command in it from outside",
    "ssh": "how to reach it with ssh",
    "logs": "how to read its logs",
    "mcp": "how an agent reaches it through MCP",
}
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
SUFFIXES = (".tmpl", ".template", ".j2", ".in")
MAX_TEMPLATE = 64 * 1024


@dataclass(frozen=True)
class Rule:
    template: Path
    target: str  # a file name in the workdir
    text: str


def project_folder(config_path: Path) -> Path:
    """The folder holding .vendetta/ (or the config's own folder)."""
    folder = config_path.parent
    return folder.parent if folder.name == ".vendetta" else folder


def target_of(template: Path) -> str:
    name = template.name
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def read_rules(config_path: Path) -> list[Rule]:
    """The templates the config at ``config_path`` names, read and checked; [] when it
    names none (or is not on this machine: a workspace made elsewhere)."""
    try:
        text = config_path.read_text(errors="replace")
    except OSError:
        return []
    if "agents" not in text:  # the common case: no parse at all
        return []
    from common.config import parse_config

    cfg = parse_config(text, str(config_path))
    rules: list[Rule] = []
    for rel in cfg.agents.rules:
        template = project_folder(config_path) / rel
        try:
            if template.stat().st_size > MAX_TEMPLATE:
                raise ConfigError(f"agents.rules: {template} is over {MAX_TEMPLATE} bytes")
            body = template.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(
                f"agents.rules: cannot read {template} ({reason}); paths are from the "
                f"project folder {project_folder(config_path)}"
            ) from None
        unknown = sorted({m for m in PLACEHOLDER.findall(body) if m not in FACTS})
        if unknown:
            raise ConfigError(
                f"agents.rules: {template} uses {', '.join('{{ ' + u + ' }}' for u in unknown)}; "
                f"known: {', '.join(FACTS)}"
            )
        rules.append(Rule(template, target_of(template), body))
    targets = [r.target for r in rules]
    if len(set(targets)) != len(targets):
        raise ConfigError(f"agents.rules: two templates would write the same file: {targets}")
    return rules


def facts(ws: pb.Workspace, workdir: str) -> dict[str, str]:
    name = ws.name
    services, ports = [], []
    for s in ws.services:
        state = cpb.ServiceState.Name(s.state).removeprefix("SERVICE_STATE_").lower()
        where = f"http://{s.local_address}" if s.local_address else "not forwarded"
        if s.port:
            services.append(f"- {s.name} ({state}): port {s.port} inside; {where}")
            ports.append(f"- {s.port} ({s.name}) -> {s.local_address or 'not forwarded'}")
        else:
            services.append(f"- {s.name} ({state}): no port")
    return {
        "workspace": name,
        "node": ws.node,
        "provider": ws.provider,
        "image": ws.image,
        "workdir": workdir,
        "services": "\n".join(services) or "(no services)",
        "ports": "\n".join(ports) or "(no ports)",
        "exec": f"inside: run commands in {workdir}; from outside: "
        f"`vendetta workspace exec {name} -- CMD`",
        "ssh": f"ssh {name}.vendetta",
        "logs": f"vendetta workspace logs {name} -f",
        "mcp": f"`vendetta mcp --workspace {name}` (stdio), or `vendetta mcp --http HOST:PORT` "
        "with a token",
    }


def render(text: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


async def install(
    stub: coordinator_pb2_grpc.CoordinatorAsyncStub, ws: pb.Workspace, rules: list[Rule]
) -> list[str]:
    """Render ``rules`` for ``ws`` and write them into its workdir; what was written."""
    if not rules:
        return []
    workdir = ws.source.workdir or "/workspace"
    values = facts(ws, workdir)
    written: list[str] = []
    for rule in rules:
        data = base64.b64encode(render(rule.text, values).encode()).decode()
        script = 'mkdir -p -- "$1" && cd -- "$1" && printf %s "$3" | base64 -d > "$2"'
        argv = ["sh", "-c", script, "sh", workdir, rule.target, data]
        request = pb.ExecWorkspaceRequest(name=ws.name, argv=argv)
        code, err = -1, b""
        with mapped_rpc_errors():
            async for msg in stub.ExecWorkspace(request, timeout=60):
                if msg.WhichOneof("output") == "exit_code":
                    code = msg.exit_code
                elif msg.WhichOneof("output") == "stderr":
                    err += msg.stderr
        if code != 0:
            raise FailedPreconditionError(
                f"agents.rules: could not write {workdir}/{rule.target} inside "
                f"{ws.name}: {err.decode(errors='replace').strip()[:300]}"
            )
        written.append(f"{workdir}/{rule.target} (from {rule.template.name})")
    return written
