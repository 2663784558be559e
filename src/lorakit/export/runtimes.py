"""Which runtime can serve an adapter file as it is, and why not: llama.cpp, Ollama and PEFT.

vLLM's verdict stays in ``lorakit.serve.compat.vllm_report`` (the serve layer, above this one); ``lorakit
info`` shows both. Every verdict reads the file alone (no base model is loaded), so base-dependent limits
(a tied lm_head, a base GGUF lacking a tensor) are checked by ``lorakit export`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.export.gguf_adapter import refusals
from lorakit.export.llama_cpp_names import ARCHITECTURES
from lorakit.io.files import AdapterFile


@dataclass(frozen=True)
class Verdict:
    """One runtime's answer: can it load the file, why not, and how to get there otherwise."""

    servable: bool
    why_not: list[str] = field(default_factory=list)
    route: str = ""


def _llama_cpp_reasons(parsed: AdapterFile) -> list[str]:
    reasons = refusals(parsed, None)
    model_type = ((parsed.raw_config.get("lorakit") or {}).get("base_model") or {}).get("model_type")
    if model_type is not None and model_type not in ARCHITECTURES:
        reasons.append(f"base model_type {model_type!r}: lorakit writes llama.cpp adapters for "
                       f"{', '.join(sorted(ARCHITECTURES))} bases only")
    if parsed.raw_config.get("task_type") == "SEQ_CLS":
        reasons.append("a sequence-classification adapter: llama.cpp serves generative models")
    return reasons


def runtime_verdicts(parsed: AdapterFile) -> dict[str, Verdict]:
    """{runtime: verdict} for llama.cpp, Ollama and PEFT.

    Args:
        parsed: ``lorakit.read_adapter(path)``.
    """
    llama = _llama_cpp_reasons(parsed)
    merged = "" if parsed.raw_config.get("task_type") == "SEQ_CLS" else "lorakit export --format gguf (merged)"
    fused = (parsed.raw_config.get("lorakit") or {}).get("fused_slices") or {}
    peft = [f"{module}: per-slice fused q/k/v LoRA; the file's target_modules is a placeholder PEFT refuses"
            for module in sorted(fused)]
    return {
        "llama.cpp": Verdict(not llama, llama, "lorakit export --format gguf-adapter" if not llama else merged),
        "ollama": Verdict(not llama, llama, "ADAPTER with lorakit export --format gguf-adapter" if not llama
                          else merged),
        "peft": Verdict(not peft, peft, "PeftModel.from_pretrained(base, DIR)" if not peft else
                        "lorakit merge (a plain transformers folder)"),
    }


def runtime_report(parsed: AdapterFile) -> dict[str, dict[str, object]]:
    """``lorakit info``'s entries, JSON-ready: ``{"llama.cpp": {"servable", "why_not", "route"}, ...}``.

    Args:
        parsed: ``lorakit.read_adapter(path)``.
    """
    return {name: {"servable": v.servable, "why_not": v.why_not, "route": v.route}
            for name, v in runtime_verdicts(parsed).items()}
