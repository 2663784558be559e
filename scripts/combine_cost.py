"""Time to combine two SmolLM2-135M q,v adapters (r=8) per mode: lorakit.combine_adapters beside PEFT's
add_weighted_adapter, in one run (PEFT's figure excludes loading its inputs; lorakit's includes reading
and writing the files). Also checks, per mode, that both give the same ΔW.

    PYTHONPATH=src python scripts/combine_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch

from lorakit import LoraConfig, combine_adapters, inject, read_adapter, save_adapter
from lorakit.arith.combine import MODES
from lorakit.io.models import load_model

DENSITY, SVD_RANK = 0.5, 8


def _inputs(folder: Path) -> list[Path]:
    model, _ = load_model("smollm2-135m")
    for name, alpha in (("a", 16), ("b", 32)):
        inject(model, LoraConfig(r=8, alpha=alpha, targets=("q", "v")), name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return [save_adapter(model, folder / name, name=name) for name in ("a", "b")]


def _kwargs(mode: str) -> tuple[dict, dict]:
    ours, theirs = {}, {}
    if MODES[mode].needs_density:
        ours["density"] = theirs["density"] = DENSITY
    if MODES[mode].space == "delta":
        ours["rank"] = theirs["svd_rank"] = SVD_RANK
    return ours, theirs


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import peft

    warnings.filterwarnings("ignore", module="peft")  # its note on the 'lorakit' config section
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations PEFT triggers
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = _inputs(folder)
        peft_model = peft.PeftModel.from_pretrained(load_model("smollm2-135m")[0], paths[0], adapter_name="a")
        peft_model.load_adapter(paths[1], adapter_name="b")
        print(f"{'mode':<20}{'lorakit s':>10}{'PEFT s':>10}{'ratio':>8}{'max |ΔW diff|':>15}")
        for mode in sorted(MODES):
            ours_kw, theirs_kw = _kwargs(mode)
            out = folder / f"out-{mode}"
            ours = _best(partial(combine_adapters, paths, [0.6, 0.4], out, mode=mode, overwrite=True, **ours_kw),
                         args.repeats)  # fmt: skip
            names = iter(f"{mode}-{r}" for r in range(args.repeats))
            first = f"{mode}-0"
            theirs = _best(_peft_call(peft_model, mode, names, theirs_kw), args.repeats)
            # DARE's masks differ unless both draw from one seeded stream, as tests/arith/test_combine.py arranges.
            random = MODES[mode].merger.prune == "random"
            diff = float("nan") if random else _max_diff(read_adapter(out), peft_model, first)
            print(f"{mode:<20}{ours:>10.3f}{theirs:>10.3f}{ours / theirs:>8.2f}{diff:>15.2e}")


def _peft_call(peft_model, mode: str, names, kwargs: dict):
    """One PEFT combination per call, each under a fresh adapter name (PEFT skips names it has)."""
    return lambda: peft_model.add_weighted_adapter(["a", "b"], [0.6, 0.4], next(names), combination_type=mode,
                                                   svd_full_matrices=False, **kwargs)  # fmt: skip


def _max_diff(ours, peft_model, name: str) -> float:
    worst = 0.0
    modules = dict(peft_model.base_model.model.named_modules())
    for module, (a, b, s) in ours.lora_matrices().items():
        theirs = modules[module].get_delta_weight(name)
        worst = max(worst, ((b @ a) * s - theirs).abs().max().item())
    return worst


if __name__ == "__main__":
    main()
