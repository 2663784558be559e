"""PNG figures for ``lorakit analyze``: φ heatmaps (paper Figures 3, 4, 6, 7), ΔW energy spectra
and amplification per layer. Uses matplotlib's object API with the Agg canvas, so it never
touches pyplot's global backend state and works headless."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"\.(\d+)\.")


def split_module(name: str) -> tuple[int | None, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'); no index -> (None, name)."""
    matches = list(_LAYER.finditer(f"{name}."))
    if not matches:
        return None, name
    m = matches[-1]
    return int(m[1]), f"{name}."[m.end() :].rstrip(".")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _heatmap(ax: Any, grid: Sequence[Sequence[float]], title: str) -> Any:
    n_i, n_j = len(grid), len(grid[0]) if grid else 0
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=8)
    # 1-based i, j as in the paper; thin the ticks for large ranks.
    step_i, step_j = max(1, n_i // 8), max(1, n_j // 8)
    ax.set_yticks(range(0, n_i, step_i), [str(k + 1) for k in range(0, n_i, step_i)], fontsize=6)
    ax.set_xticks(range(0, n_j, step_j), [str(k + 1) for k in range(0, n_j, step_j)], fontsize=6)
    ax.set_xlabel("j", fontsize=7)
    ax.set_ylabel("i", fontsize=7, rotation=0, labelpad=6)
    return im


def _evenly_spaced(items: Sequence[Any], k: int) -> list[Any]:
    if len(items) <= k:
        return list(items)
    idx = sorted({round(t * (len(items) - 1) / (k - 1)) for t in range(k)}) if k > 1 else [0]
    return [items[i] for i in idx]


def _by_layer_and_kind(
    names: Sequence[str],
) -> tuple[list[int | None], list[str], dict[tuple[int | None, str], str]]:
    table: dict[tuple[int | None, str], str] = {}
    for n in names:
        table[split_module(n)] = n
    layers = sorted({k[0] for k in table}, key=lambda x: -1 if x is None else x)
    kinds = sorted({k[1] for k in table})
    return layers, kinds, table


def plot_similarity(pair: Mapping[str, Any], path: Path, title: str, max_rows: int = 4) -> bool:
    """Rows = evenly spaced layers; columns = φ grid per module kind, then the random baseline."""
    modules = pair["modules"]
    if not modules:
        return False
    layers, kinds, table = _by_layer_and_kind(list(modules))
    rows = _evenly_spaced(layers, max_rows)
    ncols = len(kinds) + 1
    fig = _figure(2.4 * ncols + 1.0, 2.3 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    # manual spacing: constrained layout is slow and this grid is regular
    fig.subplots_adjust(left=0.07, right=0.86, bottom=0.1, top=0.88, wspace=0.35, hspace=0.55)
    im = None
    for ri, layer in enumerate(rows):
        baseline = None
        for ci, kind in enumerate(kinds):
            ax = axes[ri][ci]
            name = table.get((layer, kind))
            if name is None:
                ax.set_axis_off()
                continue
            tag = f"layer {layer} " if layer is not None else ""
            im = _heatmap(ax, modules[name]["phi"], f"{tag}{kind}")
            baseline = baseline or modules[name]["random"]
        if baseline is not None:
            _heatmap(axes[ri][-1], baseline, "random Gaussian")
        else:
            axes[ri][-1].set_axis_off()
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.89, 0.25, 0.02, 0.5)), label="φ(i, j)")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path)
    return True


def plot_spectrum(modules: Mapping[str, Any], path: Path, title: str) -> bool:
    """Energy of ΔW captured by its top-k singular directions, averaged over layers, per module kind."""
    if not modules:
        return False
    curves: dict[str, list[list[float]]] = {}
    for name, entry in modules.items():
        curves.setdefault(split_module(name)[1], []).append(entry["energy"])
    fig = _figure(5.0, 3.4)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.13, bottom=0.15, right=0.97, top=0.9)
    for kind, energies in sorted(curves.items()):
        n = min(len(e) for e in energies)
        mean = [sum(e[k] for e in energies) / len(energies) for k in range(n)]
        ax.plot(range(1, n + 1), mean, marker="o", markersize=3, label=f"{kind} ({len(energies)} layers)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("k (top singular directions of ΔW)")
    ax.set_ylabel("fraction of ‖ΔW‖²_F")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.savefig(path)
    return True


def plot_amplification(per_adapter: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> bool:
    """‖ΔW‖_F / ‖UᵀWV‖_F per layer (Appendix H.4), one line per adapter and module kind."""
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.12, bottom=0.14, right=0.97, top=0.95)
    drawn = False
    for label, modules in zip(labels, per_adapter):
        series: dict[str, list[tuple[int, float]]] = {}
        for name, entry in modules.items():
            amp = (entry.get("vs_w") or {}).get("amplification")
            layer, kind = split_module(name)
            if amp is not None:
                series.setdefault(kind, []).append((-1 if layer is None else layer, amp))
        for kind, pts in sorted(series.items()):
            pts.sort()
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=f"{label} {kind}"
            )
            drawn = True
    if not drawn:
        return False
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer")
    ax.set_ylabel("amplification ‖ΔW‖ / ‖UᵀWV‖")
    ax.legend(fontsize=6)
    fig.savefig(path)
    return True


def write_all(result: Mapping[str, Any], out: Path, heatmap_layers: int = 4) -> list[str]:
    """Every figure the result supports; returns the file names written inside ``out``."""
    written: list[str] = []
    labels = [f"[{i}]" for i in range(len(result["adapters"]))]
    for i, modules in enumerate(result["per_adapter"]):
        name = f"spectrum_{i}.png"
        if plot_spectrum(modules, out / name, f"ΔW energy spectrum, adapter {labels[i]}"):
            written.append(name)
    for pair in result["similarity"]:
        a, b = pair["a"], pair["b"]
        name = f"similarity_{a}_{b}.png"
        names = [Path(result["adapters"][k]).name for k in (a, b)]
        title = f"φ(A[{a}], A[{b}], i, j): {names[0]} vs {names[1]}"
        if plot_similarity(pair, out / name, title, max_rows=heatmap_layers):
            written.append(name)
    if plot_amplification(result["per_adapter"], labels, out / "amplification.png"):
        written.append("amplification.png")
    return written
