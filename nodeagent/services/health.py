"""Health checks: HTTP and TCP from the node to the published port, or a command inside."""

from __future__ import annotations

import asyncio

from common.errors import VendettaError
from nodeagent.services.process import Env, run
from nodeagent.services.spec import ServiceDef


async def _http(host: str, port: int, path: str) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        status = (await reader.readline()).decode(errors="replace").strip()
    finally:
        writer.close()
    parts = status.split()
    if len(parts) >= 2 and parts[1].isdigit():
        code = int(parts[1])
        return code < 400, f"GET {path} answered {code}"
    return False, f"GET {path}: not an HTTP answer ({status[:60]!r})"


async def _inside(env: Env, port: int, path: str) -> tuple[bool, str]:
    """The node cannot reach the port: check from inside, with what the image has."""
    if path:
        argv = ["wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{port}{path}"]
        code, _, err = await run(env, argv)
        return code == 0, f"GET {path} (inside): " + ("ok" if code == 0 else err.decode()[-120:])
    script = (
        f"(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null "
        f"|| nc 127.0.0.1 {port} </dev/null >/dev/null 2>&1"
    )
    code, _, _ = await run(env, ["sh", "-c", script])
    ok = code == 0
    return ok, f"port {port} (inside) " + ("accepts connections" if ok else "refuses connections")


async def check(env: Env, svc: ServiceDef) -> tuple[bool, str]:
    """(healthy, what was seen). Never raises for an unhealthy service."""
    h = svc.health
    if h is None:
        return True, "started (no health check)"
    try:
        async with asyncio.timeout(h.timeout):
            if h.command:
                code, out, err = await run(env, h.command)
                text = (out + err).decode(errors="replace").strip()[-200:]
                return code == 0, f"check command exited {code}" + (f": {text}" if text else "")
            port = h.tcp or svc.port
            endpoint = await env.endpoint(port)
            if endpoint is None:
                return await _inside(env, port, h.http)
            host, node_port = endpoint
            if h.http:
                return await _http(host, node_port, h.http)
            _, writer = await asyncio.open_connection(host, node_port)
            writer.close()
            return True, f"port {port} accepts connections"
    except TimeoutError:
        return False, f"health check timed out after {h.timeout:g}s"
    except OSError as exc:
        return False, f"port {h.tcp or svc.port}: {exc.strerror or exc}"
    except VendettaError as exc:  # the engine failed the check's exec or lookup: try again
        return False, f"could not run the check: {exc}"
