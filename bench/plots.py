"""PNG plots of a run's results (matplotlib, Agg backend): distributions and scaling curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt


def _boxes(rows: list[dict[str, Any]], title: str, path: Path, scale: float, unit: str) -> None:
    rows = [r for r in rows if r.get("samples")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.5))
    data = [[x * scale for x in r["samples"]] for r in rows]
    ax.boxplot(data, vert=False, showfliers=True, whis=(5, 95))
    ax.set_yticks(range(1, len(rows) + 1), [r["name"] for r in rows], fontsize=8)
    ax.set_xlabel(f"{unit} (box: quartiles, whiskers: p5-p95)")
    ax.set_title(title)
    if unit == "ms" and max(max(d) for d in data) / max(min(min(d) for d in data), 1e-9) > 50:
        ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scaling(points: list[dict[str, Any]], path: Path) -> None:
    if not points:
        return
    ns = [p["nodes"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for key, label in (("list_nodes_ms", "ListNodes"), ("list_workspaces_ms", "ListWorkspaces")):
        ax.plot(ns, [p[key]["median_ms"] for p in points], "o-", label=f"{label} p50")
        ax.plot(ns, [p[key]["p99_ms"] for p in points], "s--", label=f"{label} p99")
    ax.axhline(50, color="red", lw=0.8, ls=":", label="target p99 50 ms")
    ax.set_title("list latency vs nodes")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    axes[1].plot(ns, [p["rss_mb"] for p in points], "o-")
    axes[1].set_title("coordinator RSS vs nodes")
    axes[1].set_ylabel("MB")
    axes[2].plot(ns, [100 * p["idle_cpu_core_fraction"] for p in points], "o-", label="CPU %")
    axes[2].plot(ns, [p["all_ready_s"] for p in points], "s--", label="all READY (s)")
    axes[2].set_title("heartbeat CPU (% of a core) and connect time")
    axes[2].legend(fontsize=8)
    for a in axes:
        a.set_xscale("log")
        a.set_xlabel("nodes")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    rows = [r for r in rows if r.get("samples") and r.get("unit") not in (None, "ms")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.5))
    ax.boxplot([r["samples"] for r in rows], vert=False, whis=(0, 100))
    ax.set_yticks(range(1, len(rows) + 1), [r["name"] for r in rows], fontsize=8)
    ax.set_xlabel(rows[0]["unit"])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Write the plots for ``results``; return their paths."""
    written: list[Path] = []

    def target(name: str) -> Path:
        p = out / f"{stem}-{name}.png"
        written.append(p)
        return p

    if results.get("rpc"):
        _boxes(results["rpc"], "RPC latency", target("rpc"), 1e3, "ms")
    life = results.get("lifecycle", {}).get("rows", [])
    if life:
        _boxes(life, "workspace up/down vs the engine's SDK", target("lifecycle"), 1e3, "ms")
    logs = results.get("logs", {})
    lat = [r for r in logs.get("rows", []) if "latency" in r["name"]]
    if lat:
        _boxes(lat, "log line latency (dockerd -> user)", target("logs-latency"), 1e3, "ms")
    tp = logs.get("throughput", [])
    if tp:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, key, unit in ((axes[0], "lines_per_s", "lines/s"), (axes[1], "mb_per_s", "MB/s")):
            labels = [f"{t['side']}\n{t['case']}" for t in tp]
            ax.bar(range(len(tp)), [t[key]["median"] for t in tp])
            ax.set_xticks(range(len(tp)), labels, fontsize=8)
            ax.set_ylabel(unit)
            ax.set_title(f"log streaming, median {unit}")
        fig.tight_layout()
        fig.savefig(target("logs-throughput"), dpi=110)
        plt.close(fig)
    tun = results.get("tunnel", {}).get("rows", [])
    if tun:
        _throughput(tun, "port-forward throughput", target("tunnel"))
    conc = results.get("concurrency", {}).get("rows", [])
    if conc:
        _boxes(conc, "50 at once: per-workspace latency and totals", target("concurrency"), 1, "s")
    points = results.get("scale", {}).get("points", [])
    if points:
        _scaling(points, target("scale"))
    return [p for p in written if p.exists()]
