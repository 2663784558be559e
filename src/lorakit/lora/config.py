"""LoraConfig: what to adapt and how, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lorakit.errors import ConfigError
from lorakit.lora.patterns import PatternError, compile_pattern, suffix_match

InitKind = Literal["gaussian", "kaiming", "pissa", "olora"]
INIT_KINDS = ("gaussian", "kaiming", "pissa", "olora")
DEFAULT_INIT: InitKind = "gaussian"  # the paper's: A random (std 1/r, as PEFT), B = 0
# Fields added after the first file format: written to files only when set, so older files stay identical.
_OPTIONAL_FIELDS = {"use_dora": False, "exclude": (), "layers": None}
BiasMode = Literal["none", "all", "lora_only"]


def pattern_matches(pattern: str, module_name: str) -> bool:
    """PEFT's rule for rank/alpha patterns: the pattern matches a dotted suffix of the module name.

    Matched with RE2 in linear time, since the patterns come from adapter files nobody vouches for.
    """
    return suffix_match(pattern, module_name)


@dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of one LoRA adapter.

    ``targets`` are aliases (``q``, ``k``, ``v``, ``o``, ``ffn``, ``all-linear``), module names, dotted
    suffixes, or regular expressions (see ``lorakit.lora.targets``); ``exclude`` removes matching modules again
    (each pattern must remove one), and ``layers`` keeps only the blocks with these indices.
    ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``alpha`` for modules whose name ends with the
    pattern (a regex), exactly as PEFT reads them. ``init`` "pissa" / "olora" and ``use_dora`` are the
    variants of ``lorakit.lora.variants`` (docs/variants.md).
    """

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0
    init: InitKind = DEFAULT_INIT
    # The paper draws A from a Gaussian; PEFT's "gaussian" uses std = 1/r, which we keep as the default
    # so adapters initialised by either library are statistically alike.
    init_std: float | None = None
    use_rslora: bool = False
    bias: BiasMode = "none"
    modules_to_save: tuple[str, ...] = ()
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    exclude: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Accept lists/strings from JSON or the CLI, but store tuples so the config is hashable-ish and immutable.
        for name in ("targets", "modules_to_save", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(t.strip() for t in value.split(",") if t.strip())
            object.__setattr__(self, name, tuple(value))
        if not is_rank(self.r):
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        # PEFT accepts any finite alpha: zero or negative is legitimate adapter arithmetic (combine makes it).
        if not is_finite_number(self.alpha):
            raise ConfigError(f"alpha must be a finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INIT_KINDS:
            raise ConfigError(f"init must be one of {', '.join(INIT_KINDS)}, got {self.init!r}")
        self._check_variants()
        if self.init_std is not None and not self.init_std > 0:
            raise ConfigError(f"init_std must be positive, got {self.init_std!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not self.targets:
            raise ConfigError("targets is empty: name at least one module or alias (e.g. 'q,v')")
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping of pattern -> value, got {getattr(self, name)!r}")
        for pattern, rank in self.rank_pattern.items():
            if not is_rank(rank):
                raise ConfigError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")
        for pattern, alpha in self.alpha_pattern.items():
            if not is_finite_number(alpha):
                raise ConfigError(f"alpha_pattern[{pattern!r}] must be a finite number, got {alpha!r}")
        for pattern in (*self.rank_pattern, *self.alpha_pattern):
            try:
                compile_pattern(pattern)
            except PatternError as exc:
                raise ConfigError(str(exc)) from None

    def _check_variants(self) -> None:
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.use_dora and self.init in ("pissa", "olora"):
            # The saved file of a residual init is a plain-LoRA conversion, which has no DoRA form.
            raise ConfigError(f"init={self.init!r} cannot be combined with use_dora")
        if self.init in ("pissa", "olora") and self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            raise ConfigError(f"init={self.init!r} with use_rslora cannot use rank_pattern/alpha_pattern "
                              "(the saved plain-LoRA conversion could not keep their scaling; PEFT refuses it too)")
        if self.layers is not None:
            layers = tuple(self.layers) if not isinstance(self.layers, str) else self.layers
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ConfigError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))

    def rank_for(self, module_name: str) -> int:
        for pattern, rank in self.rank_pattern.items():
            if pattern_matches(pattern, module_name):
                return rank
        return self.r

    def alpha_for(self, module_name: str) -> float:
        for pattern, alpha in self.alpha_pattern.items():
            if pattern_matches(pattern, module_name):
                return float(alpha)
        return float(self.alpha)

    def scaling_for(self, module_name: str) -> float:
        """alpha/r (the paper), or alpha/sqrt(r) with rsLoRA."""
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def std_for(self, module_name: str) -> float:
        return self.init_std if self.init_std is not None else 1.0 / self.rank_for(module_name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        data["modules_to_save"] = list(self.modules_to_save)
        data["exclude"] = list(self.exclude)
        data["layers"] = None if self.layers is None else list(self.layers)
        for name, default in _OPTIONAL_FIELDS.items():
            if getattr(self, name) == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown LoraConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def is_rank(value: Any) -> bool:
    """Whether ``value`` is a rank: a true integer >= 1, not a bool, 4.0 or "4" (PEFT refuses those too).

    Args:
        value: a value from a config or a file.
    """
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool).

    Args:
        value: a value from a config or a file.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
