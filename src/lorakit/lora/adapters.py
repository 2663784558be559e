"""Named adapters on a model: inject, switch, disable, delete, merge, and route rows of a batch.

All state lives in the LoraLayer / ModuleCopies modules; the model only carries a registry of configs
(``model.lorakit_configs``) so files can be written and read back faithfully.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorakit.errors import MergeError, TargetError
from lorakit.lora.arch import family_of, fused_slices
from lorakit.lora.config import LoraConfig
from lorakit.lora.copies import ModuleCopies
from lorakit.lora.kinds import adapter_hosts, adapter_param_names
from lorakit.lora.layers import LoraLayer
from lorakit.lora.targets import ALL_LINEAR, resolve_targets
from lorakit.lora.weights import AdapterSpec

DEFAULT = "default"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer of ``model`` as (qualified name, layer), in module order.

    Args:
        model: any module (no adapters: nothing).
    """
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _copies(model: nn.Module) -> Iterator[tuple[str, ModuleCopies]]:
    for name, module in model.named_modules():
        if isinstance(module, ModuleCopies):
            yield name, module


def saved_module_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every ``modules_to_save`` copy (task heads trained in full with an adapter).

    Args:
        model: a model with adapters injected (none: an empty list).
    """
    return [p for _, wrapper in _copies(model) for copy in wrapper.copies.values() for p in copy.parameters()]


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters injected into ``model``, by name (the registry files are written from).

    Args:
        model: any module (a registry is created on first use).
    """
    registry = getattr(model, "lorakit_configs", None)
    if registry is None:
        registry = {}
        model.lorakit_configs = registry  # type: ignore[assignment]
    return registry


_structure = [0]  # bumped on every LoRA layer or wrapper swap in any model: the key of route_rows' cached walk


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    _structure[0] += 1


def _routables(model: nn.Module) -> tuple[list[LoraLayer], list[ModuleCopies]]:
    """The LoRA layers and saved-module wrappers of ``model``, from one walk cached until the next swap."""
    cached = getattr(model, "_lorakit_routables", None)
    if cached is not None and cached[0] == _structure[0]:
        return cached[1], cached[2]
    modules = list(model.modules())
    layers = [m for m in modules if isinstance(m, LoraLayer)]
    wrappers = [m for m in modules if isinstance(m, ModuleCopies)]
    model._lorakit_routables = (_structure[0], layers, wrappers)
    return layers, wrappers


def _resolve_saved_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    # Modules inside a saved-module wrapper (its original and its copies) are not the model's own.
    inner = tuple(f"{n}." for n, host in adapter_hosts(model) if isinstance(host, ModuleCopies))
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inner)]
    found: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if n == pattern or n.endswith("." + pattern)]
        # A module already wrapped by an earlier adapter is found under its own name.
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        if not hits:
            raise TargetError(f"modules_to_save entry {pattern!r} matched no module")
        found += hits
    return found


def _without_saved(
    resolved: dict[str, tuple[str, ...] | None], saved: list[str], config: LoraConfig
) -> dict[str, tuple[str, ...] | None]:
    """Targets minus modules trained in full (modules_to_save): ``all-linear`` skips them; a target named
    explicitly inside one is a conflict (its copy would hold the LoRA layer, and no file could load it)."""
    inside = [t for t in resolved if any(t == s or t.startswith(s + ".") for s in saved)]
    if inside and ALL_LINEAR not in config.targets:
        raise TargetError(f"targets {inside[:3]} lie inside modules_to_save {saved}: a module trained in full "
                          "is not also adapted; drop one of the two")
    return {t: v for t, v in resolved.items() if t not in inside}


# Every attribute a ModuleDict has (methods, `training`, ...): an adapter name is a key of ModuleDicts, which
# refuse these with a KeyError; computed, so a newer torch's additions count.
RESERVED_NAMES = frozenset(n for n in dir(nn.ModuleDict()) if not n.startswith("_"))

def _spec(model: nn.Module, config: LoraConfig, module_name: str, slices: tuple[str, ...] | None) -> AdapterSpec:
    """The AdapterSpec of one module: its rank, scaling and init from ``config``, its slices from ``arch``."""
    spec = AdapterSpec(
        r=config.rank_for(module_name),
        scaling=config.scaling_for(module_name),
        dropout=config.dropout,
        slices=slices,
        init=config.init,
        init_std=config.std_for(module_name),
        use_dora=config.use_dora,
    )
    if slices is not None and (fused := fused_slices(family_of(model), module_name)):
        spec = dataclasses.replace(spec, fused=fused)
    return spec


def inject(
    model: nn.Module,
    config: LoraConfig,
    name: str = DEFAULT,
    *,
    activate: bool = True,
    modules: dict[str, tuple[str, ...] | None] | None = None,
) -> nn.Module:
    """Add adapter ``name`` to every module ``config.targets`` resolves to; freeze everything else.

    Args:
        model: the model to adapt (modified in place and returned).
        config: the adapter's settings.
        name: the adapter's name (a Python identifier).
        activate: make it the active adapter.
        modules: an exact ``{module_name: slices}`` map that bypasses target resolution (used when loading
            files).

    Raises:
        TargetError: for a taken or invalid name, or targets that do not resolve.
    """
    if name in configs(model):
        raise TargetError(f"adapter {name!r} is already injected; delete_adapter() it or pick another name")
    if not name.isidentifier():
        raise TargetError(f"adapter name {name!r} must be a Python identifier (it names sub-modules)")
    if name in RESERVED_NAMES:
        raise TargetError(f"adapter name {name!r} is reserved (an attribute of torch's ModuleDict); pick another")
    saved = _resolve_saved_modules(model, config.modules_to_save)
    if modules is not None:
        resolved = modules
    else:
        resolved = _without_saved(
            resolve_targets(model, config.targets, exclude=config.exclude, layers=config.layers), saved, config
        )
    for module_name, slices in resolved.items():
        module = model.get_submodule(module_name)
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
        if slices is not None and not layer.kind.sliceable:
            raise TargetError(f"{module_name}: fused slices apply to linear layers only")
        layer.add_adapter(name, _spec(model, config, module_name, slices))
        if layer is not module:
            _replace(model, module_name, layer)
    for module_name in saved:
        module = model.get_submodule(module_name)
        wrapper = module if isinstance(module, ModuleCopies) else ModuleCopies(module)
        wrapper.add_copy(name)
        if wrapper is not module:
            _replace(model, module_name, wrapper)
    configs(model)[name] = config
    if activate:
        set_adapter(model, name)
    return model


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter (None: the base model). Only its parameters are trainable.

    Args:
        model: a model with adapters.
        name: an injected adapter, or None for the base model.

    Raises:
        KeyError: when no adapter of that name is loaded.
    """
    if name is not None and name not in configs(model):
        raise KeyError(f"no adapter named {name!r}; loaded: {sorted(configs(model))}")
    for _, layer in lora_layers(model):
        if layer.merged_adapter is not None and layer.merged_adapter != name:
            layer.unmerge()
        layer.active_adapter = name if name in layer.adapters else None
    for _, wrapper in _copies(model):
        wrapper.active_adapter = name
    _set_trainable(model, name)


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None when the base model runs.

    Args:
        model: any module.
    """
    for _, layer in lora_layers(model):
        if layer.active_adapter is not None:
            return layer.active_adapter
    return None


def _set_trainable(model: nn.Module, name: str | None) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if name is None:
        return
    config = configs(model)[name]
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            for p in layer.adapters[name].parameters():
                p.requires_grad_(True)
            if config.bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(True)
    if config.bias == "all":
        adapter_state = adapter_param_names(model)
        for param_name, p in model.named_parameters():
            if param_name.endswith("bias") and param_name not in adapter_state:
                p.requires_grad_(True)
    for _, wrapper in _copies(model):
        if name in wrapper.copies:
            for p in wrapper.copies[name].parameters():
                p.requires_grad_(True)


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: adapters off (and unmerged) inside the block, restored after."""
    previous = active_adapter(model)
    merged = any(layer.merged_adapter for _, layer in lora_layers(model))
    set_adapter(model, None)
    try:
        yield
    finally:
        set_adapter(model, previous)
        if merged and previous is not None:
            merge(model, check=False)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer and saved module; the base model runs if it was active.

    Args:
        model: a model with adapters.
        name: the adapter to delete.

    Raises:
        KeyError: when no adapter of that name is loaded.
    """
    if name not in configs(model):
        raise KeyError(f"no adapter named {name!r}; loaded: {sorted(configs(model))}")
    was_active = active_adapter(model) == name
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)
    for _, wrapper in _copies(model):
        if name in wrapper.copies:
            del wrapper.copies[name]
            if wrapper.active_adapter == name:
                wrapper.active_adapter = None
    del configs(model)[name]
    if was_active:
        set_adapter(model, None)


@torch.no_grad()
def merge(
    model: nn.Module,
    name: str | None = None,
    *,
    check: bool = True,
    probe: Callable[[], Tensor] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-5,
) -> None:
    """Fold s·B·A of the active adapter (or ``name``) into the base weights: no added latency.

    With ``check``: refuses non-finite results, and if ``probe`` (a function running the model on a fixed
    batch and returning a tensor) is given, verifies merged outputs equal unmerged ones within
    ``atol + rtol * max|output|`` (fp32 rounding grows with the logits' scale).
    Any failure restores the unmerged model before raising.

    Args:
        model: a model with adapters.
        name: the adapter to merge (default: the active one).
        check: refuse non-finite weights and, with ``probe``, outputs that change.
        probe: runs the model on a fixed batch and returns its output.
        atol: absolute tolerance of the probe comparison.
        rtol: tolerance relative to the largest output.

    Raises:
        MergeError: no adapter to merge, non-finite weights, or outputs beyond tolerance.
    """
    name = name or active_adapter(model)
    if name is None:
        raise MergeError("no active adapter to merge")
    set_adapter(model, name)
    layers = [(n, layer) for n, layer in lora_layers(model) if name in layer.adapters]
    reference = probe() if (check and probe is not None) else None
    # A checked merge keeps the adapted weights so a failure restores them bit for bit.
    backup = [layer.base_layer.weight.detach().clone() for _, layer in layers] if check else []
    try:
        for layer_name, layer in layers:
            layer.merge(name)
            if check and not torch.isfinite(layer.base_layer.weight).all():
                raise MergeError(
                    f"{layer_name}: merging adapter {name!r} gives non-finite weights (NaN/inf in the adapter, "
                    f"or overflow in {layer.weight.dtype}); refusing to merge"
                )
        if reference is not None:
            merged_out = probe()  # type: ignore[misc]
            diff = (merged_out.float() - reference.float()).abs().max().item()
            bound = atol + rtol * reference.float().abs().max().item()
            if not diff <= bound:
                raise MergeError(f"merged outputs differ from unmerged by {diff:.3g} > tolerance {bound:.3g}")
    except MergeError:
        for (_, layer), weight in zip(layers, backup):
            layer.base_layer.weight.copy_(weight)
            layer.merged_adapter = None
        raise


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again (nothing merged: no-op).

    Args:
        model: a model with adapters.
    """
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Merge, then replace every wrapper by its plain module: a model transformers alone understands.

    Args:
        model: a model with adapters (modified in place and returned).
        name: the adapter to merge (default: the active one).
    """
    merge(model, name)
    for layer_name, layer in list(lora_layers(model)):
        _replace(model, layer_name, layer.base_layer)
    for wrapper_name, wrapper in list(_copies(model)):
        _replace(model, wrapper_name, wrapper.current())
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "lorakit_configs"):
        del model.lorakit_configs
    return model


def _check_routable(model: nn.Module, names: Sequence[str | None], layers: list[LoraLayer]) -> None:
    known = configs(model)
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise KeyError(f"route_rows: unknown adapter(s) {unknown}; loaded: {sorted(known)}")
    if any(layer.merged_adapter for layer in layers):
        raise MergeError("route_rows needs unmerged adapters: call unmerge(model) first")
    if any(layer.residual_adapter for layer in layers):
        raise MergeError(
            "route_rows cannot mix a PiSSA/OLoRA adapter (it holds part of the base weight) with other rows: "
            "save it (the file is a plain LoRA on the original base) and load that file instead"
        )


@contextmanager
def route_rows(model: nn.Module, names: Sequence[str | None],
               scales: Sequence[float] | None = None) -> Iterator[None]:
    """Each row of the next forward passes uses its own adapter (None: the base model).

    Adapters are stacked per layer and applied with one gather and batched matmuls, so the cost barely grows
    with the number of distinct adapters. DoRA rows take DoRA's exact single-adapter path, one at a time.

    Args:
        model: a model with (unmerged) adapters.
        names: one adapter name (or None) per row of the batch.
        scales: one multiplier of the adapter's delta per row (None: all 1). It scales LoRA deltas only:
            DoRA rows and ``modules_to_save`` copies ignore it (callers refuse a scale for those).

    Raises:
        KeyError: for an unknown adapter name.
        MergeError: when an adapter is merged, or a PiSSA/OLoRA adapter is injected.
    """
    layers, wrappers = _routables(model)
    _check_routable(model, names, layers)
    table = tuple(dict.fromkeys([None, *names]))
    index = torch.tensor([table.index(n) for n in names], dtype=torch.long)
    scale = None if scales is None or all(v == 1.0 for v in scales) else torch.tensor(list(scales))
    uniform = table.index(names[0]) if len(set(names)) == 1 else None
    key = (table, tuple(index.tolist()))
    placed: dict[torch.device, tuple[Tensor, Tensor | None]] = {}  # index and scale, moved once per device
    try:
        for layer in layers:
            device = layer.weight.device
            if device not in placed:
                placed[device] = (index.to(device), None if scale is None else scale.to(device))
            _set_plain(layer, routing_names=table, row_key=key, row_uniform=uniform, row_index=placed[device][0],
                       row_scale=placed[device][1])
        for wrapper in wrappers:
            wrapper.route(table, index)
        yield
    finally:
        for layer in layers:
            _set_plain(layer, routing_names=(), row_key=None, row_uniform=None, row_index=None, row_scale=None)
        for wrapper in wrappers:
            wrapper.route((), None)


def _set_plain(module: nn.Module, **values: object) -> None:
    """Set plain (non-parameter, non-buffer, non-module) attributes without ``nn.Module.__setattr__``'s
    type checks, which cost more than a server's decode-step bookkeeping should (route_rows runs every step)."""
    module.__dict__.update(values)


@dataclass
class ParameterReport:
    """Trainable vs total parameters, overall and per module type."""

    trainable: int
    total: int
    by_type: dict[str, tuple[int, int]]  # type name → (trainable, total)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"{'module type':<28}{'trainable':>14}{'total':>14}"]
        for kind, (t, n) in sorted(self.by_type.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"{kind:<28}{t:>14,}{n:>14,}")
        lines.append(f"{'all':<28}{self.trainable:>14,}{self.total:>14,}  ({self.percent:.4f}% trainable)")
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Counts each parameter once (tied weights too) under the type of the module that owns it; adapter
    parameters under their host's label (``lorakit.lora.kinds.AdapterHost``).

    Args:
        model: any module.
    """
    by_type: dict[str, list[int]] = {}
    adapter_state = adapter_param_names(model)  # adapter hosts declare theirs (lorakit.lora.kinds.AdapterHost)
    for param_name, p in model.named_parameters():  # named_parameters skips tied duplicates
        owner_name = param_name.rpartition(".")[0]
        if param_name in adapter_state:
            kind = adapter_state[param_name]
        else:
            owner = model.get_submodule(owner_name) if owner_name else model
            kind = type(owner).__name__
        entry = by_type.setdefault(kind, [0, 0])
        entry[1] += p.numel()
        if p.requires_grad:
            entry[0] += p.numel()
    trainable = sum(t for t, _ in by_type.values())
    total = sum(n for _, n in by_type.values())
    return ParameterReport(trainable, total, {k: (t, n) for k, (t, n) in by_type.items()})
