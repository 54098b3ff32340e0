"""latency_cdf.png, throughput.png and cells.png from a run (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leukograph.deploy.bench.constants import TARGET_FPS, TARGET_P99_MS


def plot(result: dict, out_dir: Path) -> list[Path]:
    """latency_cdf.png, throughput.png, cells.png (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = result["runs"]
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=plt.get_cmap("tab20").colors)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in runs:
        if r["concurrency"] == 1:
            xs = np.sort(r["latencies_ms"])
            axes[0].plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=r["name"])
    first = next((r["transport"] for r in runs if r["kind"] == "triton"), None)
    for r in runs:
        if r["name"] == f"triton {first}":
            xs = np.sort(r["latencies_ms"])
            axes[1].plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=f"concurrency {r['concurrency']}")
    axes[0].set_title("End to end per frame, concurrency 1")
    axes[1].set_title(f"Triton {first}, by concurrency")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("latency, capture -> labels (ms)")
        ax.set_ylabel("fraction of frames")
        ax.axvline(TARGET_P99_MS, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "latency_cdf.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["name"] for r in runs if r.get("capture") == "memory"):
        points = sorted((r["concurrency"], r["fps"]) for r in runs if r["name"] == name and r["capture"] == "memory")
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.axhline(TARGET_FPS, color="grey", ls=":", lw=1, label=f"target {TARGET_FPS:g} frames/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (client threads)")
    ax.set_ylabel("sustained frames/s")
    ax.set_title("Throughput vs concurrency (localisation included)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "throughput.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if result["cell_sweep"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in dict.fromkeys(s["name"] for s in result["cell_sweep"]):
            points = sorted((s["cells_requested"], s["latency_ms"]["p50"]) for s in result["cell_sweep"]
                            if s["name"] == name)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cells per frame")
        ax.set_ylabel("p50 latency, model path (ms)")
        ax.set_title("Latency vs cells per frame (boxes given)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "cells.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


