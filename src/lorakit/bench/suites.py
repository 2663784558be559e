"""Benchmark configurations, the suites built from them, and running one in its own subprocess.

A separate process per configuration makes its peak RSS (and CUDA peak) belong to that configuration alone.
Where a ratio matters more than an absolute time (lorakit vs PEFT, unmerged vs base, mixed vs single),
the two sides also run interleaved inside one process on shared frozen weights ("paired"), so machine
load, which drifts over seconds, hits both sides alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

KINDS = ("train", "pair", "infer", "mixed", "merge", "switch", "scaling", "quality", "tokens")
PRECISIONS = ("fp32", "bf16-autocast", "bf16-base")
# Scaling sweep: GPT-2 (layers, width) from ~12M to ~354M parameters (GPT-2 medium is 24 x 1024).
SCALING_SIZES: tuple[tuple[int, int], ...] = ((6, 192), (8, 384), (12, 512), (12, 768), (24, 1024))
SCALING_RANKS: tuple[int, ...] = (1, 4, 16, 64)


@dataclass(frozen=True)
class Case:
    """One configuration. ``kind`` picks what the worker measures; unused fields are ignored."""

    id: str
    kind: str  # train | pair | infer | mixed | merge | switch (scaling cases are kind "train")
    model: str = "smollm2-135m"  # a lorakit built-in, "gpt2-124m", or "gpt2-L{layers}-D{width}"
    method: str = "lorakit"  # full | peft | lorakit | base
    precision: str = "fp32"  # fp32 | bf16-autocast | bf16-base (bf16 frozen weights, fp32 LoRA)
    loss: str = "model"  # model: model(labels=...).loss | labels: lorakit.lora.kernels.causal_lm_loss
    mode: str = "unmerged"  # infer: unmerged | merged
    batch: int = 4
    seq: int = 128
    r: int = 8
    targets: tuple[str, ...] = ("q", "v")
    n_adapters: int = 1
    # pair: the second side, as {"method", "precision", "loss"}; the ratio reported is this side / other.
    other: dict[str, str] = field(default_factory=dict)
    group: str = ""  # the suite section (train, pair, ..., scaling); used by --cases
    warmup: int = 2
    repeats: int = 5
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    compile: bool = False  # lorakit side only: lorakit.lora.kernels.compile_for_training, compiled before measuring
    data: str = "e2e"  # tokens: e2e (MR, reference) pairs, or sft (the same pairs as chats)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Case:
        data = json.loads(text)
        data["targets"] = tuple(data.get("targets", ("q", "v")))
        return cls(**data)


def _train(model: str, method: str, precision: str, loss: str = "model", **kw: Any) -> Case:
    return Case(
        id=f"train/{model}/{method}/{precision}/{loss}-loss" + ("/compiled" if kw.get("compile") else ""),
        kind="train",
        model=model,
        method=method,
        precision=precision,
        loss=loss,
        group="train",
        **kw,
    )


def _pair(model: str, mine: tuple[str, str], theirs: tuple[str, str], label: str, **kw: Any) -> Case:
    """lorakit (precision, loss) vs PEFT (precision, loss), interleaved in one process."""
    return Case(
        id=f"pair/{model}/{label}",
        kind="pair",
        model=model,
        method="lorakit",
        precision=mine[0],
        loss=mine[1],
        group="pair",
        other={"method": "peft", "precision": theirs[0], "loss": theirs[1]},
        **kw,
    )


def default_cases(device: str = "cpu") -> list[Case]:
    """The default suite (`lorakit bench`): about 10 minutes on an idle 2-core CPU."""
    cases = _train_cases() + _pair_cases() + _infer_cases() + _mixed_cases() + _merge_cases()
    return [replace(c, device=device) for c in cases]


def _train_cases() -> list[Case]:
    """Train steps of SmolLM2 and GPT-2, one process each (peak memory)."""
    cases: list[Case] = []
    # 1. Train steps, one process each (peak memory). "labels" rows use lorakit.lora.kernels.causal_lm_loss.
    reps = {"warmup": 1, "repeats": 3}
    for precision in PRECISIONS:
        if precision == "fp32":
            cases.append(_train("smollm2-135m", "full", "fp32", **reps))
        for method, loss in (("peft", "model"), ("lorakit", "model"), ("lorakit", "labels")):
            cases.append(_train("smollm2-135m", method, precision, loss, **reps))
    # The trainer's --compile (a one-off compile of a few minutes, outside the measurement).
    cases.append(_train("smollm2-135m", "lorakit", "fp32", "labels", compile=True, **reps))
    for method, precision, loss in (
        ("full", "fp32", "model"),
        ("peft", "fp32", "model"),
        ("lorakit", "fp32", "model"),
        ("lorakit", "fp32", "labels"),
        ("peft", "bf16-autocast", "model"),
        ("lorakit", "bf16-autocast", "labels"),
    ):
        cases.append(_train("gpt2-124m", method, precision, loss, **reps))
    return cases


def _pair_cases() -> list[Case]:
    """lorakit against PEFT interleaved in one process on shared weights."""
    cases: list[Case] = []
    # Ratios, interleaved on shared weights: like for like (same precision, same loss code), and lorakit's
    # default path (the trainer's default fp32, or bf16 autocast; loss only on labels) vs PEFT's fp32 default.
    pair_reps = {"warmup": 1, "repeats": 4}
    for model, precisions in (("smollm2-135m", PRECISIONS), ("gpt2-124m", ("fp32",))):
        for precision in precisions:
            cases.append(
                _pair(
                    model,
                    (precision, "model"),
                    (precision, "model"),
                    f"like-for-like-{precision}",
                    **pair_reps,
                )
            )
        cases.append(_pair(model, ("fp32", "labels"), ("fp32", "model"), "default-fp32-vs-default", **pair_reps))
    cases.append(
        _pair(
            "smollm2-135m",
            ("fp32", "labels"),
            ("fp32", "model"),
            "default-fp32-compiled-vs-default",
            compile=True,
            **pair_reps,
        )
    )
    cases.append(
        _pair(
            "smollm2-135m",
            ("bf16-autocast", "labels"),
            ("fp32", "model"),
            "default-bf16-vs-default",
            **pair_reps,
        )
    )
    return cases


def _infer_cases() -> list[Case]:
    """Inference forwards at seq 128, each timed against the plain model."""
    cases: list[Case] = []
    # 2. Inference forward, seq 128: each variant is also timed against the plain model, interleaved.
    for model, batches in (("gpt2-124m", (1, 8)), ("smollm2-135m", (1,))):
        for batch in batches:
            infer_reps = {"warmup": 2, "repeats": 12 if batch == 1 else 6}
            for method, mode in (
                ("base", "unmerged"),
                ("lorakit", "unmerged"),
                ("lorakit", "merged"),
                ("peft", "unmerged"),
            ):
                cases.append(
                    Case(
                        id=f"infer/{model}/b{batch}/{method}-{mode}",
                        kind="infer",
                        model=model,
                        method=method,
                        mode=mode,
                        batch=batch,
                        group="infer",
                        **infer_reps,
                    )
                )
    return cases


def _mixed_cases() -> list[Case]:
    """Mixed-adapter batches against one adapter and the base."""
    cases: list[Case] = []
    # 3. Mixed-adapter batches (batch 32 x 16 tokens, r=8 on q, v, o), vs one adapter and vs the base.
    for method in ("lorakit", "peft"):
        for n in (8, 32):
            cases.append(
                Case(
                    id=f"mixed/smollm2-135m/{method}/{n}-adapters",
                    kind="mixed",
                    method=method,
                    n_adapters=n,
                    batch=32,
                    seq=16,
                    targets=("q", "v", "o"),
                    group="mixed",
                    warmup=2,
                    repeats=8,
                )
            )
    return cases


def _merge_cases() -> list[Case]:
    """Merge/unmerge of every adapted layer; loading and switching to an adapter file."""
    cases: list[Case] = []
    # 4. Merge/unmerge of every adapted layer, and loading + switching to an adapter file.
    for method in ("lorakit", "peft"):
        cases.append(
            Case(
                id=f"merge/smollm2-135m/{method}",
                kind="merge",
                method=method,
                group="merge",
                warmup=1,
                repeats=5,
            )
        )
        cases.append(
            Case(
                id=f"switch/smollm2-135m/{method}",
                kind="switch",
                method=method,
                group="switch",
                warmup=1,
                repeats=5,
            )
        )
    return cases


def quick_cases(device: str = "cpu") -> list[Case]:
    """A smoke suite on a tiny GPT-2 (seconds per case): every kind once, lorakit and PEFT."""
    tiny = "gpt2-L2-D64"
    small = {"warmup": 1, "repeats": 2, "batch": 2, "seq": 16}
    cases = [
        Case(id="train/tiny/peft/fp32", kind="train", model=tiny, method="peft", group="train", **small),
        Case(
            id="train/tiny/lorakit/bf16-autocast/labels",
            kind="train",
            model=tiny,
            precision="bf16-autocast",
            loss="labels",
            group="train",
            **small,
        ),
        Case(
            id="pair/tiny/like-for-like-fp32",
            kind="pair",
            model=tiny,
            group="pair",
            other={"method": "peft", "precision": "fp32", "loss": "model"},
            **small,
        ),
        Case(
            id="infer/tiny/b1/lorakit-unmerged",
            kind="infer",
            model=tiny,
            group="infer",
            **{**small, "batch": 1},
        ),
        Case(
            id="mixed/tiny/lorakit/4-adapters",
            kind="mixed",
            model=tiny,
            n_adapters=4,
            targets=("q", "v", "o"),
            group="mixed",
            **small,
        ),
        Case(
            id="mixed/tiny/peft/4-adapters",
            kind="mixed",
            model=tiny,
            method="peft",
            n_adapters=4,
            targets=("q", "v", "o"),
            group="mixed",
            **small,
        ),
        Case(id="merge/tiny/lorakit", kind="merge", model=tiny, group="merge", **small),
        Case(id="switch/tiny/lorakit", kind="switch", model=tiny, group="switch", **small),
    ]
    return [replace(c, device=device) for c in cases]


def scaling_cases(device: str = "cpu") -> list[Case]:
    """Train step vs model size (GPT-2 configs, ~12M-354M params) and vs rank on the 124M config."""
    cases: list[Case] = []
    reps = {"warmup": 1, "repeats": 3, "group": "scaling"}
    for layers, width in SCALING_SIZES:
        model = f"gpt2-L{layers}-D{width}"
        for method, precision, loss in (
            ("peft", "fp32", "model"),
            ("lorakit", "fp32", "model"),
            ("lorakit", "fp32", "labels"),
            ("lorakit", "bf16-autocast", "labels"),
        ):
            cases.append(
                Case(
                    id=f"scaling/size/{model}/{method}/{precision}/{loss}-loss",
                    kind="train",
                    model=model,
                    method=method,
                    precision=precision,
                    loss=loss,
                    **reps,
                )
            )
    for r in SCALING_RANKS:
        for method in ("peft", "lorakit"):
            cases.append(
                Case(
                    id=f"scaling/rank/gpt2-124m/{method}/r{r}",
                    kind="train",
                    model="gpt2-124m",
                    method=method,
                    r=r,
                    **reps,
                )
            )
    return [replace(c, device=device) for c in cases]


def quality_cases(device: str = "cpu") -> list[Case]:
    """lorakit's default paths vs PEFT's fp32 default from the same start on the same E2E batches (slow)."""
    theirs = {"method": "peft", "precision": "fp32", "loss": "model"}
    return [
        Case(
            id=f"quality/smollm2-135m/lorakit-{precision}-labels-vs-peft-fp32",
            kind="quality",
            precision=precision,
            loss="labels",
            other=theirs,
            group="quality",
            warmup=0,
            repeats=20,
            device=device,
        )
        for precision in ("fp32", "bf16-autocast")
    ]


def select(cases: list[Case], patterns: list[str]) -> list[Case]:
    """Cases in any section named in ``patterns`` (train, pair, ...), or whose id contains any other
    pattern; all cases when ``patterns`` is empty."""
    if not patterns:
        return cases
    groups = {p for p in patterns if p in KINDS}
    others = [p for p in patterns if p not in KINDS]
    return [c for c in cases if c.group in groups or any(p in c.id for p in others)]


def run_in_subprocess(case: Case, timeout: float = 900.0) -> dict[str, Any]:
    """Run one case in a fresh interpreter; its last stdout line is the result (errors become results too)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "lorakit.bench.child", case.to_json()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"id": case.id, "case": asdict(case), "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {"id": case.id, "case": asdict(case), "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])
