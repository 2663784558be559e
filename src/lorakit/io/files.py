"""Adapter files: PEFT's directory layout (adapter_config.json + adapter_model.safetensors).

lorakit writes exactly what PEFT writes, plus a ``lorakit`` section PEFT ignores (base-model fingerprint,
the user's targets, fused slices, a checksum). Saves are atomic; loads validate everything against the
model before touching it. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io.fsutil import debug_kill_point, file_mode, fsync_dir, stale_temps
from lorakit.lora.adapters import DEFAULT, active_adapter, configs, inject, lora_layers, set_adapter
from lorakit.lora.arch import QKV_SLICES, families, family_of, fused_slices, slice_span
from lorakit.lora.config import LoraConfig
from lorakit.lora.kinds import LayerKind, adapter_param_names
from lorakit.lora.layers import WHOLE, LoraLayer, ModuleCopies
from lorakit.lora.variants import RESIDUAL_INITS
from lorakit.version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT reports an unknown target module by name, so a per-slice adapter fails loudly there instead of
# silently loading into the whole fused projection.
PEFT_UNSUPPORTED_TARGET = "lorakit-per-slice-fused-qkv-adapter-cannot-be-loaded-by-peft"



def _key_pattern() -> re.Pattern[str]:
    """PEFT's tensor keys, with lorakit's per-slice keys for every fused slice a family declares."""
    slices = sorted({s for f in families().values() for group in f.fused.values() for s in group} | set(QKV_SLICES))
    alternatives = "|".join(re.escape(s) for s in slices)
    return re.compile(
        rf"^(?P<module>.+?)\.(?:(?P<ab>lora_[AB])(?:\.(?P<slice>{alternatives}))?\.weight|(?P<emb>lora_embedding_[AB])"
        r"|(?P<mag>lora_magnitude_vector))$"
    )


def tensor_key(layer_name: str, kind: LayerKind, slot: str, which: str) -> str:
    """The file key of one LoRA tensor, as PEFT names it (lorakit adds ``.q``-style keys for slices).

    Args:
        layer_name: the adapted module's name.
        kind: its layer kind (embeddings use ``lora_embedding_A``, a bare parameter).
        slot: ``WHOLE`` or a fused slice's name.
        which: ``"A"`` or ``"B"``.
    """
    if kind.file_style == "embedding":
        return f"{PREFIX}{layer_name}.lora_embedding_{which}"
    suffix = "" if slot == WHOLE else f".{slot}"
    return f"{PREFIX}{layer_name}.lora_{which}{suffix}.weight"


@dataclass
class AdapterFile:
    """A parsed adapter: config, per-module LoRA pairs, and the extra trained tensors."""

    config: LoraConfig
    raw_config: dict[str, Any]
    # module → {slice key (WHOLE, q, k, v): (A, B)}
    pairs: dict[str, dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    embedding_modules: set[str] = field(default_factory=set)
    magnitudes: dict[str, Tensor] = field(default_factory=dict)  # module → DoRA's lora_magnitude_vector
    biases: dict[str, Tensor] = field(default_factory=dict)  # module → bias of its base layer
    saved_modules: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module → its state

    def lora_matrices(self) -> dict[str, tuple[Tensor, Tensor, float]]:
        """{module[.slice]: (A, B, scaling)} for analysis."""
        out = {}
        for module, slices in self.pairs.items():
            for key, (a, b) in slices.items():
                out[module if key == WHOLE else f"{module}.{key}"] = (a, b, self.config.scaling_for(module))
        return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)),
        "architectures": getattr(cfg, "architectures", None),
    }


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def _collect(model: nn.Module, name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    config = configs(model)[name]
    tensors: dict[str, Tensor] = {}
    targets: list[str] = []
    slices_of: dict[str, list[str]] = {}
    shapes: dict[str, list[int]] = {}
    for layer_name, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        weights = layer.adapters[name]
        targets.append(layer_name)
        shapes[layer_name] = [layer.out_features, layer.in_features]
        for key in weights.spans:
            a, b = weights.A[key], weights.B[key]
            if weights.residual is not None:
                # PiSSA/OLoRA → plain LoRA on the original base (PEFT's conversion):
                # s·B·A − s·B0·A0 = s·[B | −B0]·[A ; A0], rank 2r.
                a0, b0 = weights.residual[key]
                a, b = torch.cat([a, a0.to(a.dtype)], 0), torch.cat([b, -b0.to(b.dtype)], 1)
            tensors[tensor_key(layer_name, layer.kind, key, "A")] = a
            tensors[tensor_key(layer_name, layer.kind, key, "B")] = b
        if weights.magnitude is not None:
            tensors[f"{PREFIX}{layer_name}.lora_magnitude_vector"] = weights.magnitude
        if weights.slices is not None:
            slices_of[layer_name] = list(weights.slices)
        if config.bias == "lora_only" and layer.bias is not None:
            tensors[f"{PREFIX}{layer_name}.base_layer.bias"] = layer.bias
    if config.bias == "all":
        adapter_state = adapter_param_names(model)
        for param_name, p in model.named_parameters():
            if param_name.endswith("bias") and param_name not in adapter_state:
                tensors[PREFIX + param_name.replace(".original_module", "")] = p
    saved_names = []
    for module_name, module in model.named_modules():
        if isinstance(module, ModuleCopies) and name in module.copies:
            saved_names.append(module_name)
            for key, value in module.copies[name].state_dict().items():
                tensors[f"{PREFIX}{module_name}.{key}"] = value
    # The file must not alias model memory (safetensors refuses shared storage) and must be contiguous.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    raw = _config_json(model, converted_config(config), targets, slices_of, shapes, saved_names)
    if config.init in RESIDUAL_INITS:
        raw["lorakit"]["converted_from"] = config.init
    return tensors, raw


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config a PiSSA/OLoRA adapter's file carries: a plain LoRA of rank 2r with the same scaling
    (PEFT's ``path_initial_model_for_weight_conversion``); other configs unchanged.

    Args:
        config: the adapter's config.
    """
    if config.init not in RESIDUAL_INITS:
        return config
    alpha_factor = 2**0.5 if config.use_rslora else 2.0  # keeps alpha/sqrt(r) resp. alpha/r
    return dataclasses.replace(
        config,
        r=2 * config.r,
        alpha=config.alpha * alpha_factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        init="kaiming",  # PEFT's init_lora_weights=True
    )


def _config_json(
    model: nn.Module,
    config: LoraConfig,
    targets: list[str],
    slices_of: dict[str, list[str]],
    shapes: dict[str, list[int]],
    saved_names: list[str],
) -> dict[str, Any]:
    """adapter_config.json: PEFT's keys, plus the ``lorakit`` section PEFT ignores."""
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": [PEFT_UNSUPPORTED_TARGET] if slices_of else sorted(targets),
        "bias": config.bias,
        "modules_to_save": saved_names or None,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lorakit": {
            "version": __version__,
            "config": config.to_dict(),
            "modules": sorted(targets),
            "fused_slices": slices_of,
            "shapes": shapes,
            "base_model": _fingerprint(model),
        },
    }


def save_adapter(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) to directory ``path``, atomically.

    Each file is written under a temporary name in ``path`` and renamed over the old one, so an interrupted
    save never leaves a half-written file; the config records the weights' checksum, so a crash between the
    two renames is reported on load instead of pairing a config with the wrong weights. Other files in
    ``path`` (a training run's logs, say) are left alone. A PiSSA/OLoRA adapter is written as PEFT converts
    it: a plain LoRA of rank 2r for the original base.

    Args:
        model: a model with adapters.
        path: the directory to write.
        name: the adapter (default: the active one).

    Raises:
        KeyError: when no adapter of that name is loaded.
        AdapterFileError: when a tensor is not finite.
    """
    name = name or active_adapter(model) or DEFAULT
    if name not in configs(model):
        raise KeyError(f"no adapter named {name!r}; loaded: {sorted(configs(model))}")
    tensors, raw = _collect(model, name)

    def config_with(sha256: str) -> dict[str, Any]:
        raw["lorakit"]["sha256"] = sha256
        return raw

    return write_weights_and_config(path, tensors, WEIGHTS_NAME, config_with, CONFIG_NAME)


def write_weights_and_config(
    path: str | Path,
    tensors: dict[str, Tensor],
    weights_name: str,
    config_with: Callable[[str], dict[str, Any]],
    config_name: str,
) -> Path:
    """The one writer of lorakit's safetensors + JSON pairs (adapters, method files, trained states).

    Refuses non-finite tensors (a diverged run must not publish its weights). Each file is written and
    fsynced under a temporary name in ``path``, then renamed over the old one, weights first. Since
    ``config_with(sha256)`` records the weights' checksum, the pair is consistent at every moment a kill
    can hit: before the first rename the old pair is whole; between the renames the new weights sit
    beside the old config, and the new config waits complete under its temporary name, which
    ``read_pair`` accepts (and the next save renames into place). Leftover temporary files of killed
    writers are removed first. Other files in ``path`` are left alone.

    Args:
        path: the folder to write into (created if missing).
        tensors: the tensors of the weights file.
        weights_name: the weights file's name.
        config_with: builds the JSON config from the weights' sha256.
        config_name: the config file's name.
    """
    path = Path(path)
    check_finite(tensors, path / weights_name)
    path.mkdir(parents=True, exist_ok=True)
    settle_pair(path, config_name, weights_name)
    tmp_weights = path / f".{weights_name}.tmp-{os.getpid()}"
    tmp_config = path / f".{config_name}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp_weights, metadata={"format": "pt"})
        os.chmod(tmp_weights, file_mode())  # safetensors creates 0600; the JSON beside it gets the umask's
        debug_kill_point("pair:weights-written")
        tmp_config.write_text(json.dumps(config_with(_sha256(tmp_weights)), indent=2, sort_keys=True))
        debug_kill_point("pair:config-written")
        for f in (tmp_weights, tmp_config):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_weights, path / weights_name)
        debug_kill_point("pair:weights-renamed")
        os.replace(tmp_config, path / config_name)
        debug_kill_point("pair:config-renamed")
        fsync_dir(path)
    finally:
        for f in (tmp_weights, tmp_config):
            f.unlink(missing_ok=True)
    return path


def _recorded_sha(config: dict[str, Any]) -> str | None:
    """The weights checksum a config records: top level (method files, trained states) or ``lorakit``."""
    meta = config.get("lorakit")
    sha = config.get("sha256") or (meta.get("sha256") if isinstance(meta, dict) else None)
    return sha if isinstance(sha, str) else None


def _pending_config(path: Path, config_name: str, weights_path: Path) -> tuple[Path, dict[str, Any]] | None:
    """A complete config left under its temporary name by a save killed between its two renames, if it
    (and not the config in place) records the checksum of the weights in place."""
    pending = sorted(path.glob(f".{config_name}.tmp-*"))
    if not pending or not weights_path.is_file():
        return None
    actual = _sha256(weights_path)
    for candidate in pending:
        try:
            config = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a config the kill cut short: not a complete generation
        if isinstance(config, dict) and _recorded_sha(config) == actual:
            return candidate, config
    return None


def settle_pair(path: Path, config_name: str, weights_name: str) -> None:
    """Finish a pair switch a killed save left halfway, then delete killed writers' temporary files.

    Args:
        path: the folder holding the pair.
        config_name: the config file's name.
        weights_name: the weights file's name.
    """
    config_path, weights_path = path / config_name, path / weights_name
    try:
        current = _recorded_sha(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        current = None
    stale = stale_temps(path, f".{config_name}.tmp-*") + stale_temps(path, f".{weights_name}.tmp-*")
    found = _pending_config(path, config_name, weights_path) if stale else None
    if found is not None and found[0] in stale and current != _recorded_sha(found[1]):
        os.replace(found[0], config_path)
        fsync_dir(path)
    for leftover in stale:
        leftover.unlink(missing_ok=True)


def read_pair(path: str | Path, config_name: str, weights_name: str, what: str) -> tuple[dict[str, Any], Path]:
    """(parsed JSON, weights path) of a safetensors + JSON directory, or an error naming what is wrong.

    A save killed between its two renames leaves the new weights beside the old config, with the new
    config complete under its temporary name: that generation is the one returned, so a pair is never
    lost to a kill (the checksum decides which config belongs to the weights)."""
    path = Path(path)
    config_path, weights_path = path / config_name, path / weights_name
    if not path.is_dir():
        raise AdapterFileError(f"{what} directory {path} does not exist")
    if not weights_path.is_file():
        raise AdapterFileError(f"{path} is not a saved {what}: {weights_path.name} is missing")
    config = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFileError(f"{config_path} is not valid JSON: {exc}") from exc
    pending = _pending_config(path, config_name, weights_path)
    if pending is not None and (not isinstance(config, dict) or _recorded_sha(config) != _recorded_sha(pending[1])):
        config = pending[1]
    if config is None:
        raise AdapterFileError(f"{path} is not a saved {what}: {config_path.name} is missing")
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_path} is not a JSON object")
    return config, weights_path


def read_weights(weights_path: Path, sha256: str | None, config_name: str) -> dict[str, Tensor]:
    """The tensors of ``weights_path``, after checking them against the checksum its config recorded."""
    if sha256 and sha256 != _sha256(weights_path):
        raise AdapterFileError(
            f"{weights_path} does not match the checksum in {config_name}: the file is corrupt or was "
            "replaced without its config"
        )
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{weights_path} is corrupt or truncated: {exc}") from exc


def check_finite(tensors: dict[str, Tensor], weights_path: Path) -> None:
    """Refuse a weights file with a floating-point tensor holding NaN or inf, naming the tensor."""
    bad = next((n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise AdapterFileError(f"{weights_path}: {bad} holds NaN or infinite values")


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


def _slot_width(layer: LoraLayer, fused: tuple[str, ...], slot: str, path: Path) -> int:
    """Output rows of B for one (A, B) pair: the whole layer, or one slice of a fused projection."""
    if slot == WHOLE:
        return layer.out_features
    try:
        start, stop = slice_span(layer.out_features, fused, slot)
    except ValueError as exc:
        raise AdapterFileError(f"{path}: {exc}") from None
    return stop - start


def _parse_config(raw: dict[str, Any], meta: dict[str, Any], config_path: Path) -> LoraConfig:
    """The LoraConfig of a file: lorakit's own section when present, else built from PEFT's keys."""
    try:
        if "config" in meta:
            config = LoraConfig.from_dict(meta["config"])
        else:
            config = LoraConfig(
                r=int(raw["r"]),
                alpha=float(raw.get("lora_alpha", raw["r"])),
                targets=tuple(raw.get("target_modules") or ()) or ("(from file)",),
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


def _check_fits(model: nn.Module, parsed: AdapterFile, path: Path) -> dict[str, tuple[str, ...] | None]:
    """Every tensor must fit the model; returns the {module: slices} map to inject."""
    fingerprint = (parsed.raw_config.get("lorakit") or {}).get("base_model") or {}
    mine = _fingerprint(model)
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        if fingerprint.get(key) is not None and mine.get(key) is not None and fingerprint[key] != mine[key]:
            raise AdapterFileError(
                f"{path} was trained on a base with {key}={fingerprint[key]!r}, this model has {mine[key]!r}"
            )
    modules: dict[str, tuple[str, ...] | None] = {}
    names = dict(model.named_modules())
    for module, slots in parsed.pairs.items():
        target = names.get(module)
        if target is None:
            raise AdapterFileError(f"{path}: adapted module {module!r} does not exist in this model")
        layer = target if isinstance(target, LoraLayer) else LoraLayer(target)
        rank = parsed.config.rank_for(module)
        fused = fused_slices(family_of(model), module) or QKV_SLICES
        for slot, (a, b) in slots.items():
            expected_a, expected_b = (rank, layer.in_features), (_slot_width(layer, fused, slot, path), rank)
            if module in parsed.magnitudes and tuple(parsed.magnitudes[module].shape) != (layer.out_features,):
                raise AdapterFileError(f"{path}: {module}: lora_magnitude_vector has shape "
                                       f"{tuple(parsed.magnitudes[module].shape)}, this model needs "
                                       f"({layer.out_features},)")
            if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
                raise AdapterFileError(
                    f"{path}: {module} ({slot}): file has A {tuple(a.shape)}, B {tuple(b.shape)}; this model "
                    f"with r={rank} needs A {expected_a}, B {expected_b}"
                )
        modules[module] = None if WHOLE in slots else tuple(s for s in fused if s in slots)
    _check_saved_and_biases(names, parsed, path)
    return modules


def _check_saved_and_biases(names: dict[str, nn.Module], parsed: AdapterFile, path: Path) -> None:
    """Saved modules' tensors and biases must fit the modules they go into."""
    for module, state in parsed.saved_modules.items():
        target = names.get(module)
        if target is None:
            raise AdapterFileError(f"{path}: saved module {module!r} does not exist in this model")
        own = (target.original_module if isinstance(target, ModuleCopies) else target).state_dict()
        for key, value in state.items():
            if key not in own or tuple(own[key].shape) != tuple(value.shape):
                raise AdapterFileError(
                    f"{path}: saved tensor {module}.{key} {tuple(value.shape)} does not fit the model's "
                    f"{tuple(own[key].shape) if key in own else 'missing parameter'}"
                )
    for module, bias in parsed.biases.items():
        target = names.get(module)
        base = getattr(target, "base_layer", target)
        if getattr(base, "bias", None) is None or tuple(base.bias.shape) != tuple(bias.shape):
            raise AdapterFileError(f"{path}: bias for {module} does not fit the model")


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path, name: str = DEFAULT, *, activate: bool = True) -> nn.Module:
    """Load an adapter directory (lorakit's or PEFT's) into ``model`` as adapter ``name``.

    Everything is validated first; on any error the model is left exactly as it was.

    Args:
        model: the base model.
        path: the adapter directory.
        name: the name to load it under.
        activate: make it the active adapter.

    Raises:
        AdapterFileError: naming what in the file is wrong or does not fit the model.
    """
    path = Path(path)
    parsed = read_adapter(path)
    if name in configs(model):
        raise AdapterFileError(f"adapter {name!r} is already loaded; pick another name or delete it")
    modules = _check_fits(model, parsed, path)
    previous = active_adapter(model)
    config = parsed.config
    saved = tuple(parsed.saved_modules)
    config = LoraConfig(**{**config.to_dict(), "modules_to_save": saved})
    inject(model, config, name, activate=False, modules=modules)
    for layer_name, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        weights = layer.adapters[name]
        for slot, (a, b) in parsed.pairs[layer_name].items():
            weights.A[slot].copy_(a)
            weights.B[slot].copy_(b)
        if weights.magnitude is not None:
            weights.magnitude.copy_(parsed.magnitudes[layer_name])
    names = dict(model.named_modules())
    for module, state in parsed.saved_modules.items():
        wrapper = names[module]
        assert isinstance(wrapper, ModuleCopies)
        wrapper.copies[name].load_state_dict(state, strict=False)
    for module, bias in parsed.biases.items():
        layer = names[module]
        getattr(layer, "base_layer", layer).bias.copy_(bias)
    set_adapter(model, name if activate else previous)
    return model
