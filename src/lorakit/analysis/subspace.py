"""What did the adapter learn? Spectra of ΔW, subspace similarity between adapters, ΔW versus W.

The math follows Hu et al. 2021, Section 7 and Appendix G/H:

* ΔW = s·B·A. Its SVD is taken from the r×r core: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR),
  ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, so only an r×r SVD is needed, never the d_out×d_in product.
* φ(A₁, A₂, i, j) = ‖U₁ᵢᵀ U₂ⱼ‖²_F / min(i, j) with U the right-singular vectors of A (its row
  space), eq. (4). For a uniformly random j-dimensional subspace E[U₂ⱼU₂ⱼᵀ] = (j/d)·I, hence
  E‖U₁ᵢᵀU₂ⱼ‖²_F = i·j/d and E[φ] = max(i, j)/d (:func:`expected_random_similarity`).
* Table 7: ‖UᵀWV‖_F with U, V the top-r singular vectors of ΔW, of W itself, or random; the
  amplification factor is ‖ΔW‖_F / ‖UᵀWV‖_F (Appendix H.4).

Only :func:`model_weights` touches a real model (lazily, through ``lorakit.io.models.load_model``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lorakit.analysis.plots import split_module
from lorakit.io.outputs import write_file_atomically

_DT = torch.float64  # the analysis is about small singular values; float32 blurs them

WeightSource = Mapping[str, Tensor] | Callable[[str], Tensor | None]


class LoraFactors(NamedTuple):
    """One adapted matrix: ΔW = scaling · B @ A with A (r×d_in) and B (d_out×r)."""

    A: Tensor
    B: Tensor
    scaling: float


def read_lora_matrices(adapter_dir: str | Path) -> dict[str, LoraFactors]:
    """{module name: (A, B, scaling)} of a lorakit or PEFT adapter directory, in float64.

    Parsing and validation are ``lorakit.io.files.read_adapter``'s (one reader of the format): module names
    drop the ``base_model.model.`` prefix, fused c_attn slices become ``<...>.c_attn.q``, and scaling
    honours ``use_rslora`` and ``rank_pattern``/``alpha_pattern`` as PEFT reads them.
    """
    from lorakit.io.files import read_adapter

    matrices = read_adapter(adapter_dir).lora_matrices()
    return {name: LoraFactors(a.to(_DT), b.to(_DT), s) for name, (a, b, s) in sorted(matrices.items())}


def delta_w_svd(A: Tensor, B: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (U, S, Vh) of ΔW = scaling·B@A via QR of B and Aᵀ and an SVD of the small core."""
    A, B = A.to(_DT), B.to(_DT)
    qb, rb = torch.linalg.qr(B)  # B = Qb Rb, Qb: d_out×k
    qa, ra = torch.linalg.qr(A.T)  # Aᵀ = Qa Ra, Qa: d_in×k'
    core = scaling * rb @ ra.T  # ΔW = Qb core Qaᵀ
    uc, s, vhc = torch.linalg.svd(core, full_matrices=False)
    return qb @ uc, s, vhc @ qa.T


def energy_captured(s: Tensor) -> Tensor:
    """Cumulative fraction of ‖ΔW‖²_F captured by the top-k singular directions, k = 1..len(s)."""
    e = s.to(_DT) ** 2
    total = e.sum()
    return torch.cumsum(e, 0) / total if total > 0 else torch.zeros_like(e)


def top_right_singular_vectors(A: Tensor, k: int | None = None) -> Tensor:
    """Orthonormal columns (d_in×k) spanning the top-k right-singular directions of A (r×d_in)."""
    _, _, vh = torch.linalg.svd(A.to(_DT), full_matrices=False)
    return vh[: k if k is not None else vh.shape[0]].T


def subspace_similarity(U1: Tensor, U2: Tensor) -> float:
    """ψ(U1, U2) = ‖U1ᵀU2‖²_F / min(i, j) for column-orthonormal U1 (d×i) and U2 (d×j)."""
    m = U1.to(_DT).T @ U2.to(_DT)
    return float((m**2).sum() / min(U1.shape[1], U2.shape[1]))


def _grid_from_overlap(m: Tensor) -> Tensor:
    # φ(i, j) for all i, j at once: prefix sums of the squared overlaps ⟨u1_a, u2_b⟩².
    c = torch.cumsum(torch.cumsum(m**2, 0), 1)
    i = torch.arange(1, m.shape[0] + 1, dtype=_DT)[:, None]
    j = torch.arange(1, m.shape[1] + 1, dtype=_DT)[None, :]
    return c / torch.minimum(i, j)


def subspace_similarity_grid(A1: Tensor, A2: Tensor) -> Tensor:
    """φ(A1, A2, i, j) for 1 ≤ i ≤ r1, 1 ≤ j ≤ r2 (row i-1, column j-1), paper eq. (4)."""
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A matrices act on different input sizes: {A1.shape[1]} vs {A2.shape[1]}")
    u1 = top_right_singular_vectors(A1)
    u2 = top_right_singular_vectors(A2)
    return _grid_from_overlap(u1.T @ u2)


def random_similarity_grid(r1: int, r2: int, d: int, draws: int = 5, seed: int = 0) -> Tensor:
    """Mean φ-grid between independent Gaussian matrices of shapes r1×d and r2×d (Figure 4, right)."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.zeros(min(r1, d), min(r2, d), dtype=_DT)
    for _ in range(draws):
        a1 = torch.randn(r1, d, generator=g, dtype=_DT)
        a2 = torch.randn(r2, d, generator=g, dtype=_DT)
        acc += subspace_similarity_grid(a1, a2)
    return acc / draws


def expected_random_similarity(i: int, j: int, d: int) -> float:
    """E[φ] for independent uniformly random subspaces of dims i and j in R^d: max(i, j)/d."""
    return max(i, j) / d


def projection_norm(W: Tensor, U: Tensor, V: Tensor) -> float:
    """‖UᵀWV‖_F for U (d_out×r), V (d_in×r); the paper writes UᵀWVᵀ with V holding rows."""
    return float(torch.linalg.matrix_norm(U.to(_DT).T @ W.to(_DT) @ V.to(_DT)))


def _random_orthonormal(d: int, r: int, g: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=_DT))
    return q


def delta_w_vs_w(
    W: Tensor, A: Tensor, B: Tensor, scaling: float = 1.0, *, draws: int = 5, seed: int = 0
) -> dict[str, float | int | None]:
    """Paper Table 7 for one matrix: ‖UᵀWV‖_F with U, V from ΔW, from W's top-r, and random.

    All three use k = rank of ΔW (the adapter rank r unless ΔW is degenerate, e.g. B = 0). W's own
    top-k projection needs only singular values: ‖U_kᵀWV_k‖_F = √(σ₁² + … + σ_k²).
    ``amplification`` = ‖ΔW‖_F / ‖UᵀWV‖_F with U, V from ΔW (None when ΔW = 0).
    """
    W = W.to(_DT)
    d_out, d_in = W.shape
    if B.shape[0] != d_out or A.shape[1] != d_in:
        raise ValueError(f"ΔW is {B.shape[0]}×{A.shape[1]} but W is {d_out}×{d_in}")
    r = A.shape[0]
    u, s, vh = delta_w_svd(A, B, scaling)
    # Directions with zero singular value are arbitrary, so use ΔW's numerical rank (≤ r).
    k = int((s > s.max() * 1e-9).sum()) if s.numel() and s.max() > 0 else 0
    proj_dw = projection_norm(W, u[:, :k], vh[:k].T)
    sw = torch.linalg.svdvals(W)
    proj_w = float(torch.sqrt((sw[:k] ** 2).sum()))
    g = torch.Generator().manual_seed(seed)
    rand = [
        projection_norm(W, _random_orthonormal(d_out, k, g), _random_orthonormal(d_in, k, g))
        for _ in range(draws if k else 0)
    ]
    dw_norm = float(torch.sqrt((s**2).sum()))
    return {
        "rank": r,
        "k": k,
        "delta_w_fro": dw_norm,
        "w_fro": float(torch.sqrt((sw**2).sum())),
        "proj_delta_w": proj_dw,
        "proj_w_top": proj_w,
        "proj_random": sum(rand) / len(rand) if rand else None,
        "amplification": dw_norm / proj_dw if proj_dw > 0 else None,
    }


def weight_from_model(model: torch.nn.Module, module_name: str) -> Tensor:
    """W (d_out×d_in) of a module; Conv1D weights are transposed and fused slices (``c_attn.q``) cut out.

    Args:
        model: the base model.
        module_name: a module name, or a fused module's name plus a slice (``...attn.c_attn.q``).
    """
    from lorakit.lora.arch import QKV_SLICES, family_of, fused_slices, slice_span
    from lorakit.lora.kinds import is_conv1d

    base, _, last = module_name.rpartition(".")
    slices = fused_slices(family_of(model), base) or QKV_SLICES
    sl = None
    if last in slices and base:
        try:
            model.get_submodule(module_name)
        except AttributeError:
            sl, module_name = last, base
    module = model.get_submodule(module_name)
    w = module.weight.detach()
    if is_conv1d(module):  # transformers' Conv1D stores (d_in, d_out)
        w = w.T
    if sl is not None:
        try:
            start, stop = slice_span(w.shape[0], slices, sl)
        except ValueError as exc:
            raise ValueError(f"{module_name}: {exc}") from None
        w = w[start:stop]
    return w


def _get_weight(source: WeightSource, name: str) -> Tensor | None:
    if callable(source):
        return source(name)
    return source.get(name)


def _rounded(t: Tensor, nd: int = 5) -> list:
    return torch.round(t.to(_DT), decimals=nd).tolist()


def analyze_adapters(
    adapter_dirs: Sequence[str | Path],
    base_weights: WeightSource | None = None,
    out_dir: str | Path | None = None,
    *,
    layers: Sequence[int] | None = None,
    draws: int = 5,
    seed: int = 0,
    plots: bool = True,
    heatmap_layers: int = 4,
) -> dict[str, Any]:
    """Spectra, pairwise φ-grids (with a random-Gaussian baseline) and ΔW-vs-W per adapted matrix.

    Writes ``analysis.json`` and PNGs (``similarity_<a>_<b>.png``, ``spectrum_<a>.png``,
    ``amplification.png``) to ``out_dir`` when given; returns the JSON-able result either way.
    ``layers`` keeps only modules with those layer indices; ``heatmap_layers`` caps the rows per
    similarity figure (evenly spaced layers, as in the paper's Figures 6/7).
    """
    keep = set(layers) if layers is not None else None
    adapters = [_read_adapter(d, keep) for d in adapter_dirs]
    result: dict[str, Any] = {"adapters": [str(d) for d in adapter_dirs], "per_adapter": [], "similarity": [],
                              "random_draws": draws}
    missing: list[str] = []  # adapted modules the base model could not supply W for
    result["per_adapter"] = [_adapter_entries(m, base_weights, missing, draws, seed) for m in adapters]
    if base_weights is not None:
        result["missing_weights"] = missing
    baselines: dict[tuple[int, int, int], Tensor] = {}  # random φ-grids, shared by pairs of equal shapes
    result["similarity"] = [
        {"a": a, "b": b, "modules": _pair_similarity(adapters[a], adapters[b], baselines, draws, seed)}
        for a in range(len(adapters))
        for b in range(a + 1, len(adapters))
    ]
    if out_dir is not None:
        _write_analysis(result, Path(out_dir), plots, heatmap_layers)
    return result


def _read_adapter(folder: str | Path, keep: set[int] | None) -> dict[str, LoraFactors]:
    """An adapter's (A, B, scaling) per module, only the modules of the ``keep`` layers when given."""
    mats = read_lora_matrices(folder)
    return mats if keep is None else {n: f for n, f in mats.items() if split_module(n)[0] in keep}


def _adapter_entries(mats: dict[str, LoraFactors], base_weights: WeightSource | None, missing: list[str],
                     draws: int, seed: int) -> dict[str, Any]:
    """Per module: rank, shape, ΔW's spectrum and energy, and ΔW against W when the base can supply W
    (a module it cannot is appended to ``missing``)."""
    modules: dict[str, Any] = {}
    for name, (A, B, s) in mats.items():
        _, sv, _ = delta_w_svd(A, B, s)
        entry: dict[str, Any] = {
            "rank": A.shape[0],
            "shape": [B.shape[0], A.shape[1]],
            "scaling": s,
            "singular_values": _rounded(sv, 8),
            "energy": _rounded(energy_captured(sv)),
        }
        if base_weights is not None:
            W = _get_weight(base_weights, name)
            if W is not None:
                entry["vs_w"] = delta_w_vs_w(W, A, B, s, draws=draws, seed=seed)
            elif name not in missing:
                missing.append(name)
        modules[name] = entry
    return modules


def _pair_similarity(first: dict[str, LoraFactors], second: dict[str, LoraFactors],
                     baselines: dict[tuple[int, int, int], Tensor], draws: int, seed: int) -> dict[str, Any]:
    """φ-grids of two adapters' A matrices per shared module, with the random baseline of the same shape."""
    modules: dict[str, Any] = {}
    for name in (n for n in first if n in second):
        A1, A2 = first[name].A, second[name].A
        if A1.shape[1] != A2.shape[1]:
            continue
        grid = subspace_similarity_grid(A1, A2)
        key = (A1.shape[0], A2.shape[0], A1.shape[1])
        if key not in baselines:
            baselines[key] = random_similarity_grid(*key, draws=draws, seed=seed)
        rand = baselines[key]
        n = min(grid.shape)
        modules[name] = {
            "phi": _rounded(grid),
            "random": _rounded(rand),
            "phi_top1": float(grid[0, 0]),
            "phi_diag_mean": float(torch.diagonal(grid)[:n].mean()),
            "random_diag_mean": float(torch.diagonal(rand)[:n].mean()),
        }
    return modules


def _write_analysis(result: dict[str, Any], out: Path, plots: bool, heatmap_layers: int) -> None:
    """The figures (when ``plots``) and ``analysis.json`` in ``out``; the JSON written atomically, so a
    killed run never leaves half of it."""
    out.mkdir(parents=True, exist_ok=True)
    result["files"] = []
    if plots:
        from lorakit.analysis import plots as _plots

        result["files"] = _plots.write_all(result, out, heatmap_layers=heatmap_layers)
    text = json.dumps(json_safe(result), indent=1)
    write_file_atomically(out / "analysis.json", lambda tmp: tmp.write_text(text))


def json_safe(x: Any) -> Any:
    """``x`` with NaN and ±inf floats, at any depth, replaced by None (strict JSON).

    Args:
        x: a number, dict, list or tuple of them.
    """
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def format_analysis(result: Mapping[str, Any]) -> str:
    """Short human summary: per-module ΔW vs W (Table 7 style) and per-pair φ summaries."""
    lines: list[str] = []
    for idx, (path, mods) in enumerate(zip(result["adapters"], result["per_adapter"])):
        lines.append(f"[{idx}] {path}: {len(mods)} adapted matrices")
        has_w = any("vs_w" in e for e in mods.values())
        head = f"  {'module':<44}{'r':>4}{'top1 energy':>12}"
        if has_w:
            head += f"{'|dW|':>10}{'|UtWV| dW':>11}{'W top-r':>10}{'random':>9}{'|W|':>9}{'amplif.':>9}"
        lines.append(head)
        for name, e in mods.items():
            row = f"  {name:<44}{e['rank']:>4}{e['energy'][0]:>12.3f}"
            v = e.get("vs_w")
            if v:
                amp = v["amplification"] if v["amplification"] is not None else float("nan")
                row += (
                    f"{v['delta_w_fro']:>10.4g}{v['proj_delta_w']:>11.4g}{v['proj_w_top']:>10.4g}"
                    f"{v['proj_random']:>9.4g}{v['w_fro']:>9.4g}{amp:>9.3g}"
                )
            lines.append(row)
    if result.get("missing_weights"):
        lines.append(f"no base weight found for {len(result['missing_weights'])} module(s), e.g.")
        lines.append(f"  {result['missing_weights'][0]}")
    for pair in result["similarity"]:
        lines.append(f"similarity [{pair['a']}] vs [{pair['b']}]: {len(pair['modules'])} common matrices")
        lines.append(f"  {'module':<44}{'phi(1,1)':>10}{'mean diag':>11}{'random':>9}")
        for name, m in pair["modules"].items():
            lines.append(
                f"  {name:<44}{m['phi_top1']:>10.3f}{m['phi_diag_mean']:>11.3f}{m['random_diag_mean']:>9.3f}"
            )
    return "\n".join(lines)


def model_weights(name_or_path: str, task: str) -> Callable[[str], Tensor | None]:
    """A weight source backed by ``lorakit.io.models.load_model`` (imported lazily: heavy, optional)."""
    from lorakit.io.models import load_model

    model, _ = load_model(name_or_path, task=task)

    def get(name: str) -> Tensor | None:
        try:
            return weight_from_model(model, name)
        except AttributeError:
            return None  # the adapter names a module this model lacks: skip the comparison

    return get
