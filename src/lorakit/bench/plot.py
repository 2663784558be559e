"""The bench's scaling figure: step time and memory against model size and rank, lorakit beside PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.bench.verdicts import cpu_median, ok_results


def plot_scaling(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Train-step time and memory vs model size, and vs rank: one PNG with four panels.

    Args:
        results: the bench's results (only the ``scaling`` group's successful ones are drawn).
        path: where the PNG goes.
    """
    rows = [r for r in ok_results(results) if r["case"]["group"] == "scaling"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    _size_panels(axes[0], [r for r in rows if "/size/" in r["id"]])
    _rank_panels(axes[1], [r for r in rows if "/rank/" in r["id"]])
    for ax in axes.flat:
        ax.set_ylim(bottom=0)  # from zero: differences of a few percent should look like that
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("LoRA train step (batch 4 x 128): time and memory vs model size and rank")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _time_and_memory(axes: Any, x: list[float], rows: list[dict[str, Any]], label: str) -> None:
    """One series on a (time, memory) pair of panels: wall and CPU time, peak RSS and step memory."""
    line = axes[0].plot(x, [r["median_s"] for r in rows], "o-", label=f"{label} (wall)")[0]
    axes[0].plot(x, [cpu_median(r) for r in rows], ":", color=line.get_color(), label=f"{label} (CPU)")
    axes[1].plot(x, [r["peak_rss_mb"] for r in rows], "o-", label=f"{label} (peak RSS)")
    axes[1].plot(x, [r["delta_rss_mb"] for r in rows], "x--", label=f"{label} (step memory)")


def _size_panels(axes: Any, size_rows: list[dict[str, Any]]) -> None:
    series: dict[str, list[dict[str, Any]]] = {}
    for r in size_rows:
        c = r["case"]
        series.setdefault(f"{c['method']} {c['precision']} {c['loss']}-loss", []).append(r)
    for label, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["params"])
        _time_and_memory(axes, [r["params"] / 1e6 for r in rs], rs, label)
    sizes = sorted({r["params"] / 1e6 for r in size_rows})
    for ax, ylabel in zip(axes, ("train step, s", "MB")):
        ax.set_xscale("log")
        # One labelled tick per model size; log-axis minor labels would overlap.
        ax.set_xticks(sizes, [f"{s:.0f}M" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("parameters, GPT-2 configs (layers x width: see the table)")
        ax.set_ylabel(ylabel)


def _rank_panels(axes: Any, rank_rows: list[dict[str, Any]]) -> None:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rank_rows:
        by_method.setdefault(r["case"]["method"], []).append(r)
    for method, rs in sorted(by_method.items()):
        rs = sorted(rs, key=lambda r: r["case"]["r"])
        _time_and_memory(axes, [r["case"]["r"] for r in rs], rs, method)
    for ax, ylabel in zip(axes, ("train step, s", "MB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r (gpt2-124m, fp32)")
        ax.set_ylabel(ylabel)
