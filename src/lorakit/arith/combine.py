"""Adapter arithmetic: one adapter built from several weighted ones, as PEFT's ``add_weighted_adapter``.

Each mode is PEFT's ``combination_type`` of the same name and gives the same tensors (tested against
PEFT 0.21). Every input's scaling s_i (alpha/r, alpha/sqrt(r) for rsLoRA, per-module patterns included)
is folded into the factors, and the result is written with ``alpha = r`` and no rsLoRA, so its own
scaling is exactly 1 whatever the inputs used. Three families of modes:

- low-rank modes (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): the
  merger runs on the A's and on the B's separately, with weight sign(w_i s_i)·sqrt(|w_i s_i|) on A and
  sqrt(|w_i s_i|) on B. All inputs must have the same rank; cheap, but only an approximation of the
  weighted sum of ΔW (cross terms B_i A_j appear).
- ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]; ranks add, ΔW = Σ w_i ΔW_i exactly.
- SVD modes (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``):
  the merger runs on the dense ΔW_i = s_i B_i A_i, and the result is cut to ``rank`` by truncated SVD
  (B = U_r·diag(S_r), A = V_r^T), optionally clamped at a quantile as PEFT's ``svd_clamp``.

DARE's random masks come from one ``torch.Generator`` seeded with ``seed``, drawn per module in the
numeric-aware order of module names, A before B, input by input: the order in which PEFT draws from the
global generator for the usual targets (``q,v`` of a decoder), so ``torch.manual_seed(seed)`` before
PEFT's call gives the very same masks.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io.files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterFile, read_adapter, write_weights_and_config
from lorakit.io.outputs import LOCK_NAME, claim_output, mark_output, output_lock
from lorakit.lora.layers import WHOLE
from lorakit.version import __version__

Source = str | Path | AdapterFile
Slot = tuple[str, str]  # (module, slice key: WHOLE or q/k/v)


@dataclass(frozen=True)
class Merger:
    """How a list of same-shaped task tensors becomes one: optional pruning, then a (TIES) sum."""

    prune: str | None  # "magnitude", "random" (DARE, rescaled by 1/density) or None
    elect_sign: bool  # TIES: keep only entries agreeing with the majority sign, averaged


@dataclass(frozen=True)
class Mode:
    """One combination mode: which merger, and on what (the factors, the dense ΔW, or concatenation)."""

    merger: Merger
    space: str  # "factors", "delta" or "cat"

    @property
    def needs_density(self) -> bool:
        return self.merger.prune is not None


_MERGERS = {
    "linear": Merger(None, False),
    "ties": Merger("magnitude", True),
    "dare_linear": Merger("random", False),
    "dare_ties": Merger("random", True),
    "magnitude_prune": Merger("magnitude", False),
}
# PEFT's combination_type names; "svd" is the plain weighted sum of ΔW, re-factorised.
MODES: dict[str, Mode] = {
    **{name: Mode(merger, "factors") for name, merger in _MERGERS.items()},
    "svd": Mode(_MERGERS["linear"], "delta"),
    **{f"{name}_svd": Mode(merger, "delta") for name, merger in _MERGERS.items() if name != "linear"},
    "cat": Mode(_MERGERS["linear"], "cat"),
}
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Options:
    """The knobs of one combination, validated once."""

    mode: Mode
    rank: int | None
    density: float | None
    majority_sign: str
    clamp: float | None
    generator: torch.Generator


# -- the mergers (PEFT's merge_utils semantics, with an explicit generator) ---------------------------
def _prune(tensor: Tensor, method: str, options: Options) -> Tensor:
    density = options.density
    assert density is not None
    if density >= 1:
        return tensor
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=options.generator)
    return tensor * mask / density


def merge_tensors(tensors: Sequence[Tensor], weights: Sequence[float], merger: Merger, options: Options) -> Tensor:
    """Σ w_i t_i after the merger's pruning; with TIES, only entries of the majority sign, averaged.

    Args:
        tensors: same-shaped task tensors (fp32).
        weights: one weight per tensor.
        merger: the pruning / sign-election rule.
        options: density, sign method and the random generator.
    """
    if merger.prune is not None:
        tensors = [_prune(t, merger.prune, options) for t in tensors]
    stack = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stack.dtype).view(-1, *([1] * (stack.dim() - 1)))
    weighted = stack * w
    if not merger.elect_sign:
        return weighted.sum(dim=0)
    sign = stack.sign()
    magnitude = stack.sum(dim=0) if options.majority_sign == "total" else sign.sum(dim=0)
    agrees = sign == torch.where(magnitude >= 0, 1.0, -1.0)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1).to(stack.dtype)


# -- one slot (module or fused slice): [(A_i, B_i, s_i)] → (A, B) with scaling 1 ----------------------
def _factors(pairs: list[tuple[Tensor, Tensor, float]], weights: Sequence[float], options: Options):
    folded = [w * s for (_, _, s), w in zip(pairs, weights)]
    weights_a = [math.copysign(math.sqrt(abs(f)), f) if f != 0 else 0.0 for f in folded]
    weights_b = [math.sqrt(abs(f)) for f in folded]
    a = merge_tensors([p[0] for p in pairs], weights_a, options.mode.merger, options)
    b = merge_tensors([p[1] for p in pairs], weights_b, options.mode.merger, options)
    return a, b


def _cat(pairs: list[tuple[Tensor, Tensor, float]], weights: Sequence[float], options: Options):
    a = torch.cat([p[0] * (w * p[2]) for p, w in zip(pairs, weights)], dim=0)
    return a, torch.cat([p[1] for p in pairs], dim=1)


def _svd(pairs: list[tuple[Tensor, Tensor, float]], weights: Sequence[float], options: Options):
    assert options.rank is not None
    deltas = [(b @ a) * s for a, b, s in pairs]
    delta = merge_tensors(deltas, weights, options.mode.merger, options)
    # The reduced SVD has the same leading triplets as PEFT's default full one, without an (out, out) U.
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b, a = u[:, : options.rank] @ torch.diag(s[: options.rank]), vh[: options.rank]
    if options.clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), options.clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b


_SPACES = {"factors": _factors, "cat": _cat, "delta": _svd}


def _pad(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rows of A / columns of B up to ``rank``: ΔW is unchanged, every module gets one rank."""
    extra = rank - a.shape[0]
    if extra <= 0:
        return a, b
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


# -- checks ------------------------------------------------------------------------------------------
def _natural_key(slot: Slot) -> list[Any]:
    """``layers.2`` before ``layers.10``: module names in the order models declare them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", slot[0])] + [slot[1]]


def _slots(adapter: AdapterFile) -> list[Slot]:
    return sorted(((m, k) for m, slices in adapter.pairs.items() for k in slices), key=_natural_key)


def _check_same_base(adapters: list[AdapterFile], names: list[str]) -> None:
    def base(adapter: AdapterFile) -> tuple[Any, Any]:
        raw = adapter.raw_config
        return raw.get("base_model_name_or_path"), (raw.get("lorakit") or {}).get("base_model")

    for adapter, name in zip(adapters[1:], names[1:]):
        for key, a, b in zip(("base_model_name_or_path", "base model"), base(adapters[0]), base(adapter)):
            if a and b and a != b:
                raise AdapterFileError(f"{name} was trained on another base than {names[0]}: {key} {b!r} vs {a!r}")


def _check_same_targets(adapters: list[AdapterFile], names: list[str]) -> None:
    slots = set(_slots(adapters[0]))
    for adapter, name in zip(adapters[1:], names[1:]):
        other = set(_slots(adapter))
        if other != slots:
            only = sorted(slots ^ other, key=_natural_key)[:4]
            raise AdapterFileError(
                f"{name} adapts other modules than {names[0]} (differing: {only}); combine adapters of the "
                "same targets (and the same fused slices)"
            )
        if adapter.embedding_modules != adapters[0].embedding_modules:
            raise AdapterFileError(f"{name} and {names[0]} disagree on which modules are embeddings")
        for module, key in slots:
            (a0, b0), (a1, b1) = adapters[0].pairs[module][key], adapter.pairs[module][key]
            if (b0.shape[0], a0.shape[1]) != (b1.shape[0], a1.shape[1]):
                raise AdapterFileError(
                    f"{module}: {name} has ΔW {(b1.shape[0], a1.shape[1])}, {names[0]} {(b0.shape[0], a0.shape[1])}"
                )


def _check_extras(adapters: list[AdapterFile], names: list[str], keep_extras_from: int | None) -> None:
    if keep_extras_from is not None:
        if not 0 <= keep_extras_from < len(adapters):
            raise ConfigError(f"keep_extras_from={keep_extras_from} is not an input index (0..{len(adapters) - 1})")
        return
    for adapter, name in zip(adapters, names):
        if adapter.saved_modules or adapter.biases:
            what = f"modules_to_save {sorted(adapter.saved_modules)}" if adapter.saved_modules else "trained biases"
            raise AdapterFileError(
                f"{name} carries {what}: full trained modules have no low-rank form to combine, and averaging "
                "heads trained for different label sets is meaningless; pass keep_extras_from=INDEX "
                "(--keep-extras-from) to keep one input's heads and biases verbatim"
            )


def _options(mode: str, n: int, rank: int | None, density: float | None, majority_sign: str,
             clamp: float | None, seed: int) -> Options:  # fmt: skip
    if mode not in MODES:
        raise ConfigError(f"unknown combination mode {mode!r}; choose one of {sorted(MODES)}")
    spec = MODES[mode]
    if spec.needs_density and (density is None or not 0 < density <= 1):
        raise ConfigError(f"mode {mode!r} needs a density in (0, 1] (the fraction of entries kept), got {density!r}")
    if rank is not None and (spec.space != "delta" or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank={rank!r}: a target rank is a positive integer, for the SVD modes only")
    if majority_sign not in SIGN_METHODS:
        raise ConfigError(f"majority_sign must be one of {SIGN_METHODS}, got {majority_sign!r}")
    if clamp is not None and (spec.space != "delta" or not 0 < clamp <= 1):
        raise ConfigError(f"clamp={clamp!r}: a quantile in (0, 1], for the SVD modes only")
    if n < 1:
        raise ConfigError("combine needs at least one adapter")
    return Options(spec, rank, density, majority_sign, clamp, torch.Generator().manual_seed(int(seed)))


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    values = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(values) != n:
        raise ConfigError(f"{len(values)} weights for {n} adapters: give one weight per adapter")
    if not all(math.isfinite(w) for w in values):
        raise ConfigError(f"weights must be finite numbers, got {values}")
    return values


# -- building the combined file ------------------------------------------------------------------------
def _slot_inputs(adapters: list[AdapterFile], slot: Slot) -> list[tuple[Tensor, Tensor, float]]:
    module, key = slot
    return [(ad.pairs[module][key][0].float(), ad.pairs[module][key][1].float(), ad.config.scaling_for(module))
            for ad in adapters]  # fmt: skip


def _combine_slots(adapters: list[AdapterFile], names: list[str], weights: list[float],
                   options: Options) -> dict[Slot, tuple[Tensor, Tensor]]:  # fmt: skip
    """Every slot combined (in the order that fixes DARE's draws), padded to one output rank."""
    out: dict[Slot, tuple[Tensor, Tensor]] = {}
    for slot in _slots(adapters[0]):
        pairs = _slot_inputs(adapters, slot)
        ranks = [a.shape[0] for a, _, _ in pairs]
        if options.mode.space == "factors" and len(set(ranks)) != 1:
            raise AdapterFileError(
                f"{slot[0]}: ranks {dict(zip(names, ranks))} differ; the low-rank modes sum A's and B's and need "
                "equal ranks: use mode 'cat' (ranks add) or 'svd' (re-factorised to a rank you pick)"
            )
        out[slot] = _SPACES[options.mode.space](pairs, weights, options)
    rank = options.rank if options.mode.space == "delta" else max(a.shape[0] for a, _ in out.values())
    dtype = next(iter(next(iter(adapters[0].pairs.values())).values()))[0].dtype  # the inputs' own
    return {slot: tuple(t.to(dtype).contiguous() for t in _pad(a, b, rank)) for slot, (a, b) in out.items()}


def _tensors(combined: dict[Slot, tuple[Tensor, Tensor]], extras: AdapterFile | None,
             embeddings: set[str]) -> dict[str, Tensor]:  # fmt: skip
    """The file's tensors under PEFT's key names (plus the heads and biases kept from one input)."""
    tensors: dict[str, Tensor] = {}
    for (module, key), (a, b) in combined.items():
        if module in embeddings:
            tensors[f"{PREFIX}{module}.lora_embedding_A"], tensors[f"{PREFIX}{module}.lora_embedding_B"] = a, b
        else:
            suffix = "" if key == WHOLE else f".{key}"
            tensors[f"{PREFIX}{module}.lora_A{suffix}.weight"] = a
            tensors[f"{PREFIX}{module}.lora_B{suffix}.weight"] = b
    if extras is not None:
        for module, state in extras.saved_modules.items():
            tensors.update({f"{PREFIX}{module}.{k}": v.contiguous() for k, v in state.items()})
        for module, bias in extras.biases.items():
            where = "base_layer.bias" if module in extras.pairs else "bias"
            tensors[f"{PREFIX}{module}.{where}"] = bias.contiguous()
    return tensors


def _raw_config(template: AdapterFile, rank: int, extras: AdapterFile | None, provenance: dict[str, Any]):
    """The first input's config, rewritten for rank ``rank`` with scaling 1 (alpha = r, no rsLoRA)."""
    saved = tuple(extras.saved_modules) if extras is not None else ()
    bias = extras.config.bias if extras is not None else "none"
    targets = template.config.targets if "config" in (template.raw_config.get("lorakit") or {}) else tuple(
        sorted(template.pairs))  # a PEFT file's target_modules may be one regex string: name the modules
    config = replace(template.config, r=rank, alpha=float(rank), use_rslora=False, rank_pattern={},
                     alpha_pattern={}, modules_to_save=saved, bias=bias, targets=targets)  # fmt: skip
    raw = copy.deepcopy(template.raw_config)
    raw.update(r=rank, lora_alpha=float(rank), use_rslora=False, rank_pattern={}, alpha_pattern={}, bias=bias,
               modules_to_save=list(saved) or None, inference_mode=True)  # fmt: skip
    meta = dict(raw.get("lorakit") or {})
    meta.update(version=__version__, config=config.to_dict(), modules=sorted(template.pairs), combined=provenance)
    meta.pop("sha256", None)
    raw["lorakit"] = meta
    return raw


def combine_adapters(
    sources: Sequence[Source],
    weights: Sequence[float] | None,
    out: str | Path,
    *,
    mode: str,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    clamp: float | None = None,
    seed: int = 0,
    keep_extras_from: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build one adapter from several weighted ones and write it to ``out`` as an ordinary adapter file.

    The result loads with :func:`lorakit.load_adapter` and with PEFT's ``PeftModel.from_pretrained``;
    for every mode PEFT has, its tensors equal PEFT's ``add_weighted_adapter`` (see the module doc).

    Args:
        sources: adapter directories (lorakit's or PEFT's) or parsed :class:`~lorakit.io.files.AdapterFile` s.
        weights: one weight per source (negative subtracts); None weighs each 1.
        out: the directory to write (atomically).
        mode: one of :data:`MODES`: PEFT's ``combination_type`` names (``linear``, ``cat``, ``svd``,
            ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and their ``*_svd`` forms).
        rank: target rank of the SVD modes (default: the largest input rank).
        density: fraction of entries kept by the TIES / DARE / magnitude modes, in (0, 1].
        majority_sign: TIES sign election, ``total`` (sum of values) or ``frequency`` (count of signs).
        clamp: SVD modes only: clamp the factors at this quantile of their entries (PEFT's ``svd_clamp``).
        seed: seeds DARE's random masks (the same seed gives the same adapter).
        keep_extras_from: index of the input whose modules_to_save heads and trained biases are kept
            verbatim; without it, inputs carrying any are refused.
        overwrite: replace an adapter already at ``out``.

    Returns:
        ``out``, as a Path.

    Raises:
        ConfigError: a bad mode, weight count, density, rank or output path.
        AdapterFileError: the inputs do not fit together (bases, targets, shapes, ranks for the low-rank
            modes, trained heads) or an input is not a valid adapter.
    """
    names = [s if isinstance(s, (str, Path)) else f"input {i}" for i, s in enumerate(sources)]
    names = [str(n) for n in names]
    options = _options(mode, len(sources), rank, density, majority_sign, clamp, seed)
    weight_list = _weights(weights, len(sources))
    out = _check_out(out, sources)
    with output_lock(out / LOCK_NAME, out):  # a folder created for it goes again if nothing is written
        claim_output(out, "combine", overwrite=overwrite, own_names=_OWN_NAMES, held=_held_adapter)
        adapters = [s if isinstance(s, AdapterFile) else read_adapter(s) for s in sources]
        provenance = {"mode": mode, "weights": weight_list, "sources": names, "density": density,
                      "majority_sign": majority_sign, "clamp": clamp, "seed": seed}  # fmt: skip
        tensors, raw = _combined_file(adapters, names, weight_list, options, keep_extras_from, provenance)

        def config_with(sha256: str) -> dict[str, Any]:
            raw["lorakit"]["sha256"] = sha256
            return raw

        write_weights_and_config(out, tensors, WEIGHTS_NAME, config_with, CONFIG_NAME)
        mark_output(out, "combine", list(_OWN_NAMES))
    return out


def _combined_file(adapters: list[AdapterFile], names: list[str], weight_list: list[float], options: Options,
                   keep_extras_from: int | None, provenance: dict[str, Any],
                   ) -> tuple[dict[str, Tensor], dict[str, Any]]:  # fmt: skip
    """(tensors, config) of the combined adapter, after checking the inputs fit together."""
    _check_same_base(adapters, names)
    _check_same_targets(adapters, names)
    _check_extras(adapters, names, keep_extras_from)
    if options.mode.space == "delta" and options.rank is None:
        options = replace(options, rank=max(a.shape[0] for ad in adapters for s in ad.pairs.values()
                                            for a, _ in s.values()))  # fmt: skip
    combined = _combine_slots(adapters, names, weight_list, options)
    out_rank = next(iter(combined.values()))[0].shape[0]
    extras = adapters[keep_extras_from] if keep_extras_from is not None else None
    raw = _raw_config(adapters[0], out_rank, extras, {**provenance, "rank": out_rank})
    return _tensors(combined, extras, adapters[0].embedding_modules), raw


_OWN_NAMES = (CONFIG_NAME, WEIGHTS_NAME)  # the exact files combine writes


def _held_adapter(out: Path) -> str | None:
    return "an adapter" if any((out / name).exists() for name in _OWN_NAMES) else None


def _check_out(out: str | Path, sources: Sequence[Source]) -> Path:
    out = Path(out)
    for source in sources:
        if isinstance(source, (str, Path)) and Path(source).resolve() == out.resolve():
            raise ConfigError(f"out {out} is one of the inputs; write the combined adapter elsewhere")
    return out

