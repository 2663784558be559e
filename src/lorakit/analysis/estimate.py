"""Parameter, file-size and training-memory arithmetic for LoRA versus full fine-tuning.

Everything here is exact architecture arithmetic (no model is built): a LoRA pair on a frozen
``d_out x d_in`` matrix trains ``r * (d_in + d_out)`` numbers (Hu et al. 2021, Section 5.1:
``|Theta| = 2 * L_LoRA * d_model * r`` for square matrices). Memory figures are estimates under
stated assumptions (``Estimate.assumptions``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.analysis.arch_spec import ArchSpec, load_arch, total_params
from lorakit.lora import arch as _arch

TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "ffn")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16-mixed")
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
_SAFETENSORS_DTYPE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
_TARGET_ALIASES = {"attn": ("q", "k", "v", "o"), "all": TARGETS, "mlp": ("ffn",)}


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise "q,v" / ["q", "v"] / "attn" / "all" into an ordered tuple of known targets."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for raw in items:
        t = raw.strip().lower()
        if not t:
            continue
        for x in _TARGET_ALIASES.get(t, (t,)):
            if x not in TARGETS:
                raise ValueError(f"unknown target {raw!r}; choose from {', '.join(TARGETS)} (or attn, all)")
            if x not in out:
                out.append(x)
    if not out:
        raise ValueError("no targets given")
    return tuple(sorted(out, key=TARGETS.index))


def parse_ranks(r: int | str | Mapping[str, int], targets: Sequence[str]) -> dict[str, int]:
    """Per-target ranks from an int, "8", "q=8,v=4" or a mapping; every target needs a positive rank."""
    if isinstance(r, str):
        r = int(r) if "=" not in r else {k.strip(): int(v) for k, v in (p.split("=") for p in r.split(","))}
    if isinstance(r, Mapping):
        unknown = set(r) - set(targets)
        if unknown:
            raise ValueError(f"ranks given for targets not adapted: {sorted(unknown)}")
        missing = [t for t in targets if t not in r]
        if missing:
            raise ValueError(f"no rank given for targets {missing}")
        ranks = {t: int(r[t]) for t in targets}
    else:
        ranks = {t: int(r) for t in targets}
    bad = {t: v for t, v in ranks.items() if v <= 0}
    if bad:
        raise ValueError(f"ranks must be positive: {bad}")
    return ranks


@dataclass(frozen=True)
class MatrixCount:
    """One kind of adapted matrix, repeated once per layer."""

    target: str
    module: str
    d_in: int
    d_out: int
    rank: int
    count: int

    @property
    def params(self) -> int:
        return self.count * self.rank * (self.d_in + self.d_out)


def lora_matrices(arch: ArchSpec, targets: Sequence[str], ranks: Mapping[str, int]) -> list[MatrixCount]:
    return [
        MatrixCount(t, module, d_in, d_out, ranks[t], arch.layers)
        for t in targets
        for module, d_in, d_out in arch.matrices(t)
    ]


def lora_trainable_params(
    arch: ArchSpec | str | Path,
    targets: str | Sequence[str] = ("q", "v"),
    r: int | str | Mapping[str, int] = 8,
) -> int:
    """Sum over adapted matrices of r * (d_in + d_out)."""
    arch = load_arch(arch)
    tg = parse_targets(targets)
    return sum(m.params for m in lora_matrices(arch, tg, parse_ranks(r, tg)))


def safetensors_file_bytes(
    shapes: Mapping[str, Sequence[int]], dtype: str, metadata: Mapping[str, str] | None = None
) -> int:
    """Exact size of a safetensors file with these tensors: 8-byte length, JSON header padded to 8, data."""
    item = DTYPE_BYTES[dtype]
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    # safetensors lays tensors of one dtype out in name order.
    for key in sorted(shapes):
        n = math.prod(shapes[key]) * item
        header[key] = {
            "dtype": _SAFETENSORS_DTYPE[dtype],
            "shape": list(shapes[key]),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    padded = -(-len(text.encode()) // 8) * 8
    return 8 + padded + offset


def peft_tensor_shapes(arch: ArchSpec, matrices: Sequence[MatrixCount]) -> dict[str, tuple[int, int]]:
    """The lora_A/lora_B keys and shapes a PEFT-layout adapter file of this method would hold."""
    shapes: dict[str, tuple[int, int]] = {}
    for m in matrices:
        for i in range(arch.layers):
            module = arch.layer_prefix(i) + m.module
            base, _, sl = module.rpartition(".")
            for ab, shape in (("A", (m.rank, m.d_in)), ("B", (m.d_out, m.rank))):
                if sl in _arch.fused_slices(_arch.family(arch.family), base):
                    key = f"base_model.model.{base}.lora_{ab}.{sl}.weight"
                else:
                    key = f"base_model.model.{module}.lora_{ab}.weight"
                shapes[key] = shape
    return shapes


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory in bytes for one method; ``activations`` is None unless batch and seq were given."""

    method: str
    precision: str
    weights: int
    gradients: int
    optimizer: int
    master_weights: int
    activations: int | None

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.master_weights + (self.activations or 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        return d


def activation_bytes(arch: ArchSpec, batch: int, seq: int, precision: str) -> int:
    """Korthikanti et al. 2022 (Reducing Activation Recomputation, Sec. 4.1): per layer
    s*b*h*(34 + 5*a*s/h) bytes with 16-bit activations, no recomputation, no sequence/tensor
    parallelism and materialised attention scores (no flash attention). fp32 doubles it (approx.)."""
    s, b, h, a = seq, batch, arch.hidden, arch.heads
    per_layer = s * b * h * 34 + 5 * a * s * s * b
    scale = 2 if precision == "fp32" else 1
    return arch.layers * per_layer * scale


def memory_estimate(
    arch: ArchSpec,
    method: str,
    total: int,
    trainable: int,
    precision: str,
    batch: int | None = None,
    seq: int | None = None,
    lora_rank_sum: int = 0,
) -> MemoryEstimate:
    """Adam: 2 fp32 moments per trainable parameter. fp32: 4-byte weights and grads, no master copy.
    bf16-mixed: 2-byte weights (frozen and trainable) and grads, plus a 4-byte fp32 master copy of
    the trainable parameters (the 16 bytes/param of ZeRO, Rajbhandari et al. 2020)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    w, g, master = (4, 4, 0) if precision == "fp32" else (2, 2, 4)
    acts = None
    if batch is not None and seq is not None:
        acts = activation_bytes(arch, batch, seq, precision)
        if method == "lora":
            # Each adapted matrix also keeps its r-wide intermediate A·x (lora_dropout = 0 assumed).
            acts += batch * seq * lora_rank_sum * (4 if precision == "fp32" else 2)
    # LoRA's own A/B matrices sit next to the frozen weights; full fine-tuning trains the weights.
    stored = total + trainable if method == "lora" else total
    return MemoryEstimate(
        method, precision, w * stored, g * trainable, 8 * trainable, master * trainable, acts
    )


@dataclass
class Estimate:
    """Result of :func:`estimate`; ``to_dict()`` is what ``--json`` prints."""

    arch: ArchSpec
    method: str
    targets: tuple[str, ...]
    ranks: dict[str, int]
    total_params: int
    trainable_params: int
    matrices: list[MatrixCount]
    adapter_bytes: dict[str, int]
    adapter_file_bytes: dict[str, int]
    checkpoint_bytes: dict[str, int]
    memory: dict[str, MemoryEstimate]
    precision: str
    batch: int | None = None
    seq: int | None = None
    assumptions: list[str] = field(default_factory=list)

    @property
    def trainable_ratio(self) -> float:
        return self.trainable_params / self.total_params

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.arch.name,
            "arch": asdict(self.arch),
            "method": self.method,
            "targets": list(self.targets),
            "ranks": dict(self.ranks),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "trainable_ratio": self.trainable_ratio,
            "matrices": [asdict(m) | {"params": m.params} for m in self.matrices],
            "adapter_bytes": dict(self.adapter_bytes),
            "adapter_file_bytes": dict(self.adapter_file_bytes),
            "checkpoint_bytes": dict(self.checkpoint_bytes),
            "memory": {k: v.to_dict() for k, v in self.memory.items()},
            "precision": self.precision,
            "batch": self.batch,
            "seq": self.seq,
            "assumptions": list(self.assumptions),
        }


_ASSUMPTIONS = (
    "sizes in SI units (1 MB = 1e6 bytes, 1 GB = 1e9 bytes)",
    "total parameters: backbone + LM head if untied (causal LMs); BERT-family with pooler; no task head",
    "optimizer Adam/AdamW: two fp32 moments (8 bytes) per trainable parameter",
    "fp32: 4-byte weights and gradients; bf16-mixed: 2-byte weights and gradients + fp32 master "
    "copy of trainable parameters (16 bytes per trainable parameter, as in ZeRO)",
    "LoRA: frozen base weights stored once in the training precision; no gradient, optimizer "
    "state or master copy for them",
)
_ACTIVATIONS = (
    "activations: Korthikanti et al. 2022, per layer s*b*h*(34 + 5*a*s/h) bytes (16-bit "
    "activations, no recomputation, no flash attention); x2 for fp32; embeddings/logits "
    "excluded; LoRA adds b*s*r per adapted matrix (lora_dropout = 0)"
)
_ADAPTER_FILE = (
    "adapter file: safetensors in PEFT key layout (base_model.model.<module>.lora_A/B.weight), header included"
)


def estimate(
    arch: ArchSpec | str | Path,
    method: str = "lora",
    targets: str | Sequence[str] = ("q", "v"),
    r: int | str | Mapping[str, int] = 8,
    *,
    batch: int | None = None,
    seq: int | None = None,
    precision: str = "bf16-mixed",
) -> Estimate:
    """Trainable parameters, file sizes and Adam training memory for LoRA (or full fine-tuning).

    Args:
        arch: an ArchSpec, a preset name, or a ``config.json`` file or the folder holding one.
        method: ``"lora"`` or ``"full"``.
        targets: the adapted matrix kinds (LoRA).
        r: the rank, one for all targets or one per target.
        batch, seq: a training batch's shape, for an activation estimate (both or neither).
        precision: one of ``PRECISIONS``.
    """
    spec = load_arch(arch)
    _check_estimate_args(method, batch, seq, precision)
    total = total_params(spec)
    assumptions = list(_ASSUMPTIONS) + ([_ACTIVATIONS] if batch is not None else [])
    if method == "full":
        tg, ranks, mats, trainable = (), {}, [], total
        adapter_bytes: dict[str, int] = {}
        adapter_file: dict[str, int] = {}
    else:
        tg = parse_targets(targets)
        ranks = parse_ranks(r, tg)
        mats = lora_matrices(spec, tg, ranks)
        trainable = sum(m.params for m in mats)
        adapter_bytes = {dt: trainable * nb for dt, nb in DTYPE_BYTES.items()}
        shapes = peft_tensor_shapes(spec, mats)
        adapter_file = {dt: safetensors_file_bytes(shapes, dt, {"format": "pt"}) for dt in DTYPE_BYTES}
        assumptions.append(_ADAPTER_FILE)
    memory = {"full": memory_estimate(spec, "full", total, total, precision, batch, seq)}
    if method == "lora":
        rank_sum = sum(m.rank * m.count for m in mats)
        memory["lora"] = memory_estimate(spec, "lora", total, trainable, precision, batch, seq, rank_sum)
    return Estimate(
        arch=spec, method=method, targets=tuple(tg), ranks=ranks, total_params=total, trainable_params=trainable,
        matrices=mats, adapter_bytes=adapter_bytes, adapter_file_bytes=adapter_file,
        checkpoint_bytes={dt: total * nb for dt, nb in DTYPE_BYTES.items()}, memory=memory,
        precision=precision, batch=batch, seq=seq, assumptions=assumptions,
    )


def _check_estimate_args(method: str, batch: int | None, seq: int | None, precision: str) -> None:
    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    if (batch is None) != (seq is None):
        raise ValueError("give both batch and seq for an activation estimate, or neither")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def human_count(n: float) -> str:
    """4718592 -> '4.72M' (three significant figures, SI prefixes)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for div, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{int(n)} B"


def format_estimate(est: Estimate) -> str:
    """The human-readable table ``lorakit estimate`` prints.

    Args:
        est: what ``estimate`` returned.
    """
    a = est.arch
    lines = [
        f"model      {a.name}  ({a.family}, {a.layers} layers, d={a.hidden}, {a.heads} heads"
        + (f", {a.n_kv_heads} kv heads" if a.n_kv_heads != a.heads else "")
        + f", ffn {a.intermediate}, vocab {a.vocab})",
        f"total      {est.total_params:,} params ({human_count(est.total_params)})",
        *_method_lines(est),
    ]
    ck = " | ".join(f"{dt} {human_bytes(est.checkpoint_bytes[dt])}" for dt in ("fp32", "fp16", "bf16"))
    lines.append(f"checkpoint {ck}  (full model)")
    lines += ["", *_memory_lines(est), "", "assumptions:"]
    lines.extend(f"  - {s}" for s in est.assumptions)
    return "\n".join(lines)


def _method_lines(est: Estimate) -> list[str]:
    """The method, trainable parameters, adapted matrices and adapter file sizes."""
    if est.method != "lora":
        return ["method     full fine-tuning", f"trainable  {est.trainable_params:,} (100%)"]
    rk = ", ".join(f"{t}={r}" for t, r in est.ranks.items())
    lines = [
        f"method     LoRA on {','.join(est.targets)} (r: {rk})",
        f"trainable  {est.trainable_params:,} ({human_count(est.trainable_params)}), "
        f"{100 * est.trainable_ratio:.4g}% of the model, 1/{est.total_params / est.trainable_params:,.0f}",
    ]
    for m in est.matrices:
        lines.append(f"  {m.count} x {m.module:<24} {m.d_in:>6} -> {m.d_out:<6} r={m.rank:<4} {m.params:>14,}")
    sizes = " | ".join(f"{dt} {human_bytes(est.adapter_file_bytes[dt])}" for dt in ("fp32", "fp16", "bf16"))
    lines.append(f"adapter    {sizes}  (safetensors incl. header)")
    return lines


def _memory_lines(est: Estimate) -> list[str]:
    """The training-memory table: one column per method (full fine-tuning, and LoRA when estimated)."""
    cols = list(est.memory)
    lines = [
        f"training memory, Adam, {est.precision}" + (f", batch {est.batch} x seq {est.seq}" if est.batch else ""),
        "  " + " " * 18 + "".join(f"{('full FT' if c == 'full' else 'LoRA'):>14}" for c in cols),
    ]
    rows = [("weights", "weights"), ("gradients", "gradients"), ("optimizer (m, v)", "optimizer"),
            ("fp32 master", "master_weights")]
    if est.batch is not None:
        rows.append(("activations", "activations"))
    for label, attr in rows:
        vals = "".join(f"{human_bytes(getattr(est.memory[c], attr) or 0):>14}" for c in cols)
        lines.append(f"  {label:<18}{vals}")
    lines.append(f"  {'total':<18}" + "".join(f"{human_bytes(est.memory[c].total):>14}" for c in cols))
    return lines
