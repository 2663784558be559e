"""Reading an adapter directory (lorakit's or PEFT's) into an ``AdapterFile``, checking everything that
can be checked without a model: the config's fields, every tensor's key, shape pairing and values, and
that the file agrees with itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io.layout import CONFIG_NAME, PEFT_UNSUPPORTED_TARGET, PREFIX, WEIGHTS_NAME, AdapterFile, _key_pattern
from lorakit.io.pairs import check_finite, read_pair, read_weights
from lorakit.lora.config import LoraConfig, is_finite_number, is_rank
from lorakit.lora.layers import WHOLE
from lorakit.lora.patterns import PatternError, fullmatch
from lorakit.lora.variants import RESIDUAL_INITS


def _split_saved_key(key: str, saved_names: list[str]) -> tuple[str, str] | None:
    """(module, its state-dict key) for a tensor of a ``modules_to_save`` module, matched at a module-name
    boundary: ``bert.pooler.dense.weight`` with saved ``bert.pooler`` → (``bert.pooler``, ``dense.weight``)."""
    for name in sorted(saved_names, key=len, reverse=True):
        if key.startswith(name + "."):
            start = 0
        elif (found := key.find("." + name + ".")) >= 0:
            start = found + 1
        else:
            continue
        end = start + len(name)
        return key[:end], key[end + 1 :]
    return None


def _parse_config(raw: dict[str, Any], meta: dict[str, Any], config_path: Path) -> LoraConfig:
    """The LoraConfig of a file: lorakit's own section when present, else built from PEFT's keys."""
    _check_peft_numbers(raw, config_path)
    try:
        if "config" in meta:
            config = LoraConfig.from_dict(meta["config"])
        else:
            config = LoraConfig(
                r=int(raw["r"]),
                alpha=float(raw.get("lora_alpha", raw["r"])),
                targets=_targets_of(raw, config_path) or ("(from file)",),
                dropout=float(raw.get("lora_dropout") or 0.0),
                use_rslora=bool(raw.get("use_rslora", False)),
                bias=raw.get("bias", "none"),
                modules_to_save=tuple(raw.get("modules_to_save") or ()),
                rank_pattern=dict(raw.get("rank_pattern") or {}),
                alpha_pattern=dict(raw.get("alpha_pattern") or {}),
                use_dora=bool(raw.get("use_dora", False)),
            )
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise AdapterFileError(f"{config_path}: invalid LoRA config: {exc}") from exc
    if "config" in meta:
        _check_sections_agree(raw, config, config_path)
    init = str(raw.get("init_lora_weights", "")).lower()
    if init.startswith(RESIDUAL_INITS):
        raise AdapterFileError(
            f"{config_path}: a {init} adapter saved without conversion only works on its residual base; save it "
            "with PEFT's path_initial_model_for_weight_conversion (a plain LoRA on the original base)"
        )
    return config


def _check_peft_numbers(raw: dict[str, Any], config_path: Path) -> None:
    """PEFT's own numbers, as strictly as PEFT takes them: ``r: 4.7`` or ``r: "4"`` is no rank, and an
    alpha may be zero or negative (adapter arithmetic makes those) but not NaN or infinite."""
    ranks = {"r": raw["r"]} if "r" in raw else {}
    ranks.update({f"rank_pattern[{k!r}]": v for k, v in _mapping(raw, "rank_pattern", config_path).items()})
    alphas = {"lora_alpha": raw["lora_alpha"]} if "lora_alpha" in raw else {}
    alphas.update({f"alpha_pattern[{k!r}]": v for k, v in _mapping(raw, "alpha_pattern", config_path).items()})
    for key, value in ranks.items():
        if not is_rank(value):
            raise AdapterFileError(f"{config_path}: {key} must be a whole number >= 1, got {value!r}")
    for key, value in alphas.items():
        if not is_finite_number(value):
            raise AdapterFileError(f"{config_path}: {key} must be a finite number, got {value!r}")


def _mapping(raw: dict[str, Any], key: str, config_path: Path) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterFileError(f"{config_path}: {key} must be a JSON object, got {value!r}")
    return value


def _targets_of(raw: dict[str, Any], config_path: Path) -> tuple[str, ...]:
    """PEFT's ``target_modules``: one regex (a string) or a list of module names, never split further."""
    targets = raw.get("target_modules")
    if targets is None or isinstance(targets, str):
        return (targets,) if targets else ()
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterFileError(f"{config_path}: target_modules must be a string or a list of strings")
    return tuple(targets)


def _uncovered(targets: str | list[str], modules: list[str]) -> list[str]:
    """The modules PEFT's ``target_modules`` would not adapt: a string is a regex matched against the
    whole module name, a list names modules by their last dotted parts."""
    if isinstance(targets, str):
        return [m for m in modules if not fullmatch(targets, m)]
    return [m for m in modules if not any(m == t or m.endswith("." + t) for t in targets)]


def _check_targets_cover(parsed: AdapterFile, config_path: Path) -> None:
    """Refuse a file whose ``target_modules`` does not name the modules it holds tensors for: PEFT would
    adapt other modules than lorakit (or refuse the file), so the file contradicts itself."""
    targets = parsed.raw_config.get("target_modules")
    if not targets or (isinstance(targets, list) and PEFT_UNSUPPORTED_TARGET in targets):
        return  # lorakit's per-slice files name a module PEFT cannot find, on purpose
    _targets_of(parsed.raw_config, config_path)
    try:
        uncovered = _uncovered(targets, sorted(parsed.pairs))
    except PatternError as exc:
        raise AdapterFileError(f"{config_path}: target_modules: {exc}") from None
    if uncovered:
        raise AdapterFileError(
            f"{config_path}: target_modules={targets!r} does not cover {len(uncovered)} module(s) the file "
            f"holds tensors for, e.g. {uncovered[0]!r}: PEFT would adapt other modules than these tensors"
        )


def _sort_tensors(parsed: AdapterFile, tensors: dict[str, Tensor], weights_path: Path) -> None:
    """File each tensor as a LoRA factor, a bias or a saved module's state; refuse anything else."""
    saved_names = [m for m in (parsed.raw_config.get("modules_to_save") or []) if m]
    pattern = _key_pattern()
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{weights_path}: unexpected tensor {key!r} (expected prefix {PREFIX!r})")
        key = key[len(PREFIX):]
        match = pattern.match(key)
        if match:
            module = match["module"]
            if match["mag"]:
                parsed.magnitudes[module] = tensor
                continue
            if match["emb"]:
                parsed.embedding_modules.add(module)
                slot, which = WHOLE, match["emb"][-1]
            else:
                slot, which = match["slice"] or WHOLE, match["ab"][-1]
            pair = parsed.pairs.setdefault(module, {}).setdefault(slot, [None, None])  # type: ignore[arg-type]
            pair[0 if which == "A" else 1] = tensor
        elif key.endswith(".base_layer.bias"):
            parsed.biases[key[: -len(".base_layer.bias")]] = tensor
        elif (split := _split_saved_key(key, saved_names)) is not None:
            parsed.saved_modules.setdefault(split[0], {})[split[1]] = tensor
        elif key.rpartition(".")[2] == "bias":  # bias="all": biases of modules that carry no LoRA
            parsed.biases[key.rpartition(".")[0]] = tensor
        else:
            raise AdapterFileError(f"{weights_path}: unrecognised tensor {key!r}")


def _check_pairs(parsed: AdapterFile, weights_path: Path) -> None:
    """Every module has both factors, forming B·A at the rank its config gives (values: ``check_finite``)."""
    for module, slots in parsed.pairs.items():
        for slot, pair in slots.items():
            if pair[0] is None or pair[1] is None:
                missing = "A" if pair[0] is None else "B"
                raise AdapterFileError(f"{weights_path}: {module} ({slot}) has no lora_{missing} tensor")
            a, b = pair
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise AdapterFileError(
                    f"{weights_path}: {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not form B·A"
                )
            rank = parsed.config.rank_for(module)
            if a.shape[0] != rank:
                # A file whose tensors disagree with its own config is corrupt, whatever model it meets.
                raise AdapterFileError(
                    f"{weights_path}: {module} has rank {a.shape[0]}, but its config with r={rank} needs "
                    f"rank {rank}"
                )
            slots[slot] = (a, b)
    if not parsed.pairs:
        raise AdapterFileError(f"{weights_path} holds no LoRA tensors")
    _check_magnitudes(parsed, weights_path)


def _check_magnitudes(parsed: AdapterFile, weights_path: Path) -> None:
    """DoRA files have one magnitude vector per adapted module, other files none."""
    if not parsed.config.use_dora:
        if parsed.magnitudes:
            raise AdapterFileError(f"{weights_path}: lora_magnitude_vector tensors, but the config has no use_dora")
        return
    for module in parsed.pairs:
        m = parsed.magnitudes.get(module)
        if m is None or m.dim() != 1:
            raise AdapterFileError(f"{weights_path}: DoRA module {module} has no 1-D lora_magnitude_vector")
    extra = sorted(set(parsed.magnitudes) - set(parsed.pairs))
    if extra:
        raise AdapterFileError(f"{weights_path}: lora_magnitude_vector for modules without LoRA: {extra[:5]}")


def read_adapter(path: str | Path) -> AdapterFile:
    """Parse and check an adapter directory (lorakit's or PEFT's) without touching any model.

    Args:
        path: the adapter directory.

    Raises:
        AdapterFileError: naming what is missing, corrupt or inconsistent.
    """
    path = Path(path)
    raw, weights_path = read_pair(path, CONFIG_NAME, WEIGHTS_NAME, "adapter")
    config_path = path / CONFIG_NAME
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{config_path}: not a LoRA adapter (peft_type={raw.get('peft_type')!r})")
    meta = raw.get("lorakit") or {}
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{config_path}: the 'lorakit' section is not a JSON object")
    tensors = read_weights(weights_path, meta.get("sha256"), CONFIG_NAME)
    # Every tensor the file brings in (LoRA pairs, modules_to_save heads, biases) is checked alike.
    check_finite(tensors, weights_path)
    parsed = AdapterFile(config=_parse_config(raw, meta, config_path), raw_config=raw)
    _sort_tensors(parsed, tensors, weights_path)
    _check_pairs(parsed, weights_path)
    _check_all_modules_present(parsed, meta, weights_path)
    _check_targets_cover(parsed, config_path)
    return parsed


# PEFT-visible key → the lorakit config field it must equal: PEFT scales by the former, lorakit by the latter.
_MIRRORED = {"r": "r", "lora_alpha": "alpha", "use_rslora": "use_rslora", "rank_pattern": "rank_pattern",
             "alpha_pattern": "alpha_pattern", "use_dora": "use_dora"}  # fmt: skip


def _check_sections_agree(raw: dict[str, Any], config: LoraConfig, config_path: Path) -> None:
    """Refuse a file whose PEFT-visible settings disagree with its ``lorakit`` section: PEFT and lorakit
    would then apply the same weights with different scales."""
    for peft_key, field_name in _MIRRORED.items():
        if peft_key not in raw:
            continue
        mine, theirs = getattr(config, field_name), raw[peft_key]
        if peft_key in ("rank_pattern", "alpha_pattern") and theirs is None:
            theirs = {}  # PEFT writes null for "no patterns"
        if theirs != mine:
            raise AdapterFileError(
                f"{config_path}: {peft_key}={theirs!r} disagrees with the lorakit section's "
                f"{field_name}={mine!r}; PEFT and lorakit would scale this adapter differently"
            )


def _check_all_modules_present(parsed: AdapterFile, meta: dict[str, Any], weights_path: Path) -> None:
    """The file must hold tensors for every module its config lists (a module whose tensors are absent
    would silently run unadapted). Tensors for unknown modules are caught against the model."""
    listed = meta.get("modules")
    missing = sorted(set(listed) - set(parsed.pairs)) if isinstance(listed, list) else []
    if missing:
        raise AdapterFileError(
            f"{weights_path}: the config lists {len(listed)} adapted modules, but there are no tensors for "
            f"{len(missing)} of them: {missing[:5]}"
        )
    saved = [m for m in (parsed.raw_config.get("modules_to_save") or []) if m]
    if meta.get("version"):  # lorakit writes the full names of the modules it saved
        absent = [m for m in saved if m not in parsed.saved_modules]
        if absent:
            raise AdapterFileError(f"{weights_path}: no tensors for modules_to_save {absent}")
