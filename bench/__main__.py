"""`python -m bench [--quick]`: what users feel, against baselines in the same run.

Every figure is measured against a baseline in the same run, interleaved
round by round, so the ratios hold on a noisy machine (issue 7). Results are
printed as tables, written as JSON under bench-results/, and plotted there as
PNGs. Figures are for reading, never pass/fail in tests.

Sections (--only to pick some):
  cli          `vendetta workspace list|status`, `node list`, `workspace up` as commands
               vs `docker -H ssh://node ps|start` on the same node
  rpc          unary call through the SSH tunnel vs the agent's socket vs loopback echo
  lifecycle    up/down through coordinator/tunnel/agent vs the engine's SDK
               (docker-py, pylxd, libvirt) on the same image
  logs         `workspace logs -f` vs `ssh node docker logs -f`: lines/s, MB/s, latency
  tunnel       forwarded service port vs `ssh -L`: MB/s
  editor       `scp` of 100 MB into a workspace through NAME.vendetta vs `scp` to the node,
               and keystroke echo in `ssh -tt NAME.vendetta` vs `ssh -tt node`
  concurrency  50 workspaces up at once on 3 nodes vs 50 docker-py threads
  source       a git repository's first upload to a remote workspace vs tar | ssh;
               `workspace push` of 10 changed files vs rsync -a over ssh
  scale        one coordinator, N simulated nodes: list latency, RSS, heartbeat CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import cli as cli_bench
from bench import concurrency, editor, lifecycle, logs, plots, rpc, scale, tunnel
from bench import source as source_bench
from bench.cluster import bench_cluster

SECTIONS = ("cli", "rpc", "lifecycle", "logs", "tunnel", "editor", "concurrency", "source", "scale")
console = Console(width=None if sys.stdout.isatty() else 150)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sections = [s for s in SECTIONS if s in args.only]
    results: dict[str, Any] = {"errors": {}, "section_seconds": {}}

    async def section(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        if name not in sections:
            return
        console.print(f"[bold]{name}[/bold] ...")
        t0 = time.perf_counter()
        try:
            results[name] = await fn()
        except Exception as exc:
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        results["section_seconds"][name] = time.perf_counter() - t0
        console.print(f"  {name}: {results['section_seconds'][name]:.0f} s")

    needs_cluster = [s for s in sections if s != "scale"]
    if needs_cluster:
        root = Path(tempfile.mkdtemp(prefix="vd-bench-", dir="/tmp"))
        try:
            nodes = 3 if "concurrency" in sections else 1
            async with bench_cluster(root, nodes=nodes) as cl:
                await section("cli", lambda: cli_bench.run(cl, args.quick))
                await section("rpc", lambda: rpc.run(cl, args.quick))
                await section(
                    "lifecycle", lambda: lifecycle.run(cl, args.quick, args.providers.split(","))
                )
                await section("logs", lambda: logs.run(cl, args.quick))
                await section("tunnel", lambda: tunnel.run(cl, args.quick))
                await section("editor", lambda: editor.run(cl, args.quick))
                await section("concurrency", lambda: concurrency.run(cl, args.quick))
                await section("source", lambda: source_bench.run(cl, args.quick))
        except Exception as exc:  # setup or teardown: keep what was measured
            results["errors"]["cluster"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    sizes = (
        [int(x) for x in args.nodes.split(",")]
        if args.nodes
        else ([10, 100] if args.quick else [10, 100, 1000])
    )
    await section("scale", lambda: scale.run(args.quick, sizes))
    return results


# --------------------------------------------------------------------------- output


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}"


def _met(r: dict[str, Any]) -> list[str]:
    if "goal" not in r:
        return ["", ""]
    return [r["goal"], "yes" if r["met"] else "[red]no[/red]"]


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    goals = any("goal" in r for r in rows)
    cols = ("measure", "n", "median", "p95 / min", "p99 / max", "vs baseline", "added ms")
    for col in cols + (("goal", "met") if goals else ()):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "baseline"
        tail = _met(r) if goals else []
        if "median_ms" in r:
            table.add_row(
                r["name"],
                str(r["n"]),
                f"{_fmt(r['median_ms'])} ms",
                f"{_fmt(r['p95_ms'])} ms",
                f"{_fmt(r['p99_ms'])} ms",
                ratio,
                f"{r['added_ms']:+.1f}" if "added_ms" in r else "",
                *tail,
            )
        else:
            unit = r.get("unit", "")
            table.add_row(
                r["name"],
                str(r["n"]),
                f"{_fmt(r['median'])} {unit}",
                f"{_fmt(r['min'])} {unit}",
                f"{_fmt(r['max'])} {unit}",
                ratio,
                "",
                *tail,
            )
    return table


def mark_goals(results: dict[str, Any]) -> None:
    """Issue 16's goals on the rows they apply to (the cli section marks its own)."""

    def mark(r: dict[str, Any], goal: str, met: bool) -> None:
        r["goal"], r["met"] = goal, met

    for r in results.get("rpc") or []:
        if r["name"].startswith("agent Heartbeat, through the SSH tunnel") and "added_ms" in r:
            mark(r, "<= +0.3 ms", r["added_ms"] <= 0.3)
    for r in results.get("logs", {}).get("rows", []):
        if r["name"].startswith("workspace logs -f") and "ratio" in r:
            if "latency" in r["name"]:
                mark(r, "p50 < 5 ms", r["median_ms"] < 5)
            else:  # seconds for the same lines: 2x the lines/s is half the time
                mark(r, "<= 0.5x (2x lines/s)", r["ratio"] <= 0.5)
    for r in results.get("scale", {}).get("rows", []):
        if r.get("nodes") == 1000:
            mark(r, "p99 < 50 ms", r["p99_ms"] < 50)


Add = Callable[[str, float, str, str, bool], None]


def _of_hop(add: Add, what: str, r: dict[str, Any]) -> None:
    """Our own bar for a path through `NAME.vendetta`: no slower than OpenSSH alone
    through the same two SSH legs (bench/cluster.py's hop_options)."""
    if "of_hop" in r:
        x = r["of_hop"]
        add(f"{what} vs OpenSSH through one more hop", x, "x", ">= 1.0x", x >= 1.0)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issues 7 and 16's targets against this run's figures (information, not pass/fail)."""
    out: list[dict[str, Any]] = []

    def add(what: str, value: float, unit: str, target: str, met: bool) -> None:
        out.append({"target": what, "value": value, "unit": unit, "goal": target, "met": met})

    for r in results.get("cli", {}).get("rows", []):
        if "goal" in r:
            add(f"cli: {r['name']}", r["ratio"], "x", r["goal"], r["met"])
    for r in results.get("rpc") or []:
        if "goal" in r:
            add("tunnel adds to a unary call (p50)", r["added_ms"], "ms", r["goal"], r["met"])
    for r in results.get("lifecycle", {}).get("rows", []):
        if "added_ms" in r:
            add(f"overhead: {r['name']}", r["added_ms"], "ms", "< 100 ms", r["added_ms"] < 100)
    lg = results.get("logs", {})
    for t in lg.get("throughput", []):
        if t["side"] != "vendetta":
            continue
        lps, mbs = t["lines_per_s"]["median"], t["mb_per_s"]["median"]
        add(f"logs lines/s, {t['case']}", lps, "lines/s", ">= 100,000", lps >= 100_000)
        add(f"logs MB/s, {t['case']}", mbs, "MB/s", ">= 50", mbs >= 50)
    for r in lg.get("rows", []):
        if "goal" in r and "latency" not in r["name"]:
            x = 1 / r["ratio"]
            add(f"logs lines/s vs ssh, {r['name'].split(', ')[1]}", x, "x", ">= 2x", x >= 2)
    for r in lg.get("rows", []):
        if r["name"].startswith("workspace logs -f: line latency"):
            add("log line latency p50", r["median_ms"], "ms", "< 5 ms", r["median_ms"] < 5)
    for r in results.get("tunnel", {}).get("rows", []):
        if r["name"].startswith("forwarded service port"):
            add("tunnel MB/s vs ssh -L", r["ratio"], "x", ">= 1.0x", r["ratio"] >= 1.0)
        elif "goal" in r:  # issue 13
            add("ssh -L via NAME.vendetta vs ssh -L", r["ratio"], "x", r["goal"], r["met"])
            _of_hop(add, "ssh -L via NAME.vendetta", r)
    for r in results.get("editor", {}).get("rows", []):
        if "goal" in r and "added_ms" in r:
            what = "keystroke echo p50 vs ssh to the node"
            add(what, r["added_ms"], "ms", r["goal"], r["met"])
        elif "goal" in r:
            add("scp into a workspace vs scp to the node", r["ratio"], "x", r["goal"], r["met"])
            _of_hop(add, "scp into a workspace", r)
    for r in results.get("source", {}).get("rows", []):
        if r["name"].startswith("workspace create") and "ratio" in r:
            add("source upload vs tar | ssh", r["ratio"], "x", "<= 1.2x", r["ratio"] <= 1.2)
        if r["name"].startswith("workspace push") and "ratio" in r:
            add("push of 10 files vs rsync", r["ratio"], "x", "<= 1.5x", r["ratio"] <= 1.5)
            secs = r["median_ms"] / 1e3
            add("push of 10 files", r["median_ms"], "ms", "< 1 s", secs < 1)
    for p in results.get("scale", {}).get("points", []):
        for key in ("list_nodes_ms", "list_workspaces_ms"):
            p99 = p[key]["p99_ms"]
            add(f"{key[:-3]} p99 at {p['nodes']} nodes", p99, "ms", "< 50 ms", p99 < 50)
        if p["nodes"] == 1000:
            rss, cpu = p["rss_mb"], p["cpu_ms_per_heartbeat"]
            add("coordinator RSS at 1000 nodes", rss, "MB", "< 100 MB", rss < 100)
            # Halved from 0.7 ms, the 2026-11-22 full run's figure (README).
            add("CPU per heartbeat at 1000 nodes", cpu, "ms", "<= 0.35 ms", cpu <= 0.35)
    return out


def show(results: dict[str, Any]) -> None:
    if results.get("cli", {}).get("rows"):
        console.print(
            _table("CLI commands vs docker -H ssh:// (whole processes)", results["cli"]["rows"])
        )
    if results.get("rpc"):
        console.print(_table("RPC latency", results["rpc"]))
    life = results.get("lifecycle", {})
    if life.get("rows"):
        console.print(_table("Control-plane overhead (up/down vs the engine's SDK)", life["rows"]))
    for name, why in life.get("skipped", {}).items():
        console.print(f"  lifecycle {name}: skipped ({why})")
    lg = results.get("logs", {})
    if lg.get("rows"):
        console.print(_table("Log streaming (throughput rows: seconds per burst)", lg["rows"]))
        t = Table(title="Log streaming throughput", title_justify="left")
        cols = ("side", "lines", "median lines/s", "median MB/s", "min MB/s", "max MB/s", "vs ssh")
        for col in cols:
            t.add_column(col, justify="left" if col == "side" else "right")
        ssh = {
            x["case"]: x["mb_per_s"]["median"] for x in lg["throughput"] if x["side"] == "openssh"
        }
        for x in lg["throughput"]:
            base = ssh.get(x["case"])
            t.add_row(
                f"{x['side']}, {x['case']}",
                f"{x['lines']:,}",
                _fmt(x["lines_per_s"]["median"]),
                _fmt(x["mb_per_s"]["median"]),
                _fmt(x["mb_per_s"]["min"]),
                _fmt(x["mb_per_s"]["max"]),
                f"{x['mb_per_s']['median'] / base:.2f}x" if base else "",
            )
        console.print(t)
    if results.get("tunnel", {}).get("rows"):
        console.print(_table("Tunnel throughput", results["tunnel"]["rows"]))
    if results.get("editor", {}).get("rows"):
        console.print(_table("Editors: file copies, keystroke echo", results["editor"]["rows"]))
    if results.get("source", {}).get("rows"):
        console.print(_table("Source: upload and push vs OpenSSH tools", results["source"]["rows"]))
    if results.get("concurrency", {}).get("rows"):
        console.print(_table("Concurrency (seconds shown as ms)", results["concurrency"]["rows"]))
    sc = results.get("scale", {})
    if sc.get("rows"):
        console.print(_table("Scale: list latency (ratio vs the smallest N)", sc["rows"]))
        t = Table(title="Scale: coordinator vs N nodes", title_justify="left")
        for col in (
            "nodes",
            "all READY s",
            "create N ws s",
            "heartbeat CPU % core",
            "CPU ms/heartbeat",
            "RSS MB",
        ):
            t.add_column(col, justify="right")
        for p in sc["points"]:
            t.add_row(
                str(p["nodes"]),
                f"{p['all_ready_s']:.2f}",
                f"{p['create_workspaces_s']:.2f}",
                f"{100 * p['idle_cpu_core_fraction']:.1f}",
                f"{p['cpu_ms_per_heartbeat']:.2f}",
                f"{p['rss_mb']:.0f}",
            )
        console.print(t)
    tg = results.get("targets", [])
    if tg:
        t = Table(
            title="Issue 7, 13 and 16 targets (information, not pass/fail)", title_justify="left"
        )
        for col in ("target", "this run", "goal", "met"):
            t.add_column(col, justify="left" if col == "target" else "right")
        for x in tg:
            t.add_row(
                x["target"],
                f"{_fmt(x['value'])} {x['unit']}",
                x["goal"],
                "yes" if x["met"] else "[red]no[/red]",
            )
        console.print(t)
    for name, err in results["errors"].items():
        console.print(f"[red]{name} failed:[/red] {err}")


def main() -> None:
    p = argparse.ArgumentParser(prog="make bench")
    p.add_argument("--quick", action="store_true", help="fewer rounds and sizes (~3 minutes)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections: {','.join(SECTIONS)}"
    )
    p.add_argument(
        "--providers", default="docker,lxd,qemu", help="lifecycle providers (default: all)"
    )
    p.add_argument("--nodes", default="", help="scale sizes, e.g. 10,100,1000")
    args = p.parse_args()
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections: {', '.join(sorted(unknown))}")
    started = time.time()
    results = asyncio.run(run(args))
    mark_goals(results)
    results["targets"] = targets(results)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
    }
    results["quick"] = args.quick
    results["sections"] = args.only.split(",")
    results["seconds"] = time.time() - started
    show(results)
    args.out.mkdir(exist_ok=True)
    stem = time.strftime("bench-%Y%m%d-%H%M%S")
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(results, indent=2))
    pngs = plots.write(results, args.out, stem)
    console.print(f"raw results: {path} ({results['seconds']:.0f} s)")
    for png in pngs:
        console.print(f"plot: {png}")
    if results["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
