"""Whether an adapter file can be served by vLLM (``--enable-lora --lora-modules name=path``) or LoRAX.

Mirrors what vLLM's ``PEFTHelper`` checks on ``adapter_config.json`` (r, lora_alpha and target_modules
required; no DoRA; bias "none"; modules_to_save None, or since vLLM PR #53555 (merged 2026) a trained
``score``/``classifier`` head of a sequence-classification adapter) plus what its key parser and scaling
cannot express: lorakit's per-slice fused adapters and per-module rank/alpha patterns.
"""

from __future__ import annotations

from lorakit.io.files import AdapterFile

VLLM_DEFAULT_MAX_LORA_RANK = 16
# The heads vLLM PR #53555 loads from modules_to_save (as full weights, routed per request).
VLLM_SAVED_HEADS = ("score", "classifier")


def vllm_report(parsed: AdapterFile) -> tuple[bool, list[str], list[str]]:
    """(servable, reasons it is not, notes) for a parsed adapter file.

    Args:
        parsed: ``lorakit.read_adapter(path)``.
    """
    raw, meta = parsed.raw_config, parsed.raw_config.get("lorakit") or {}
    reasons, notes = [], []
    if meta.get("fused_slices"):
        reasons.append("per-slice fused q/k/v LoRA (GPT-2 c_attn thirds): vLLM adapts whole modules only, and "
                       "the file's target_modules is a placeholder that PEFT and vLLM refuse")
    reasons += _saved_module_reasons(parsed)
    if raw.get("bias", "none") != "none" or parsed.biases:
        reasons.append(f"bias={raw.get('bias')!r} trains base-model biases; vLLM loads LoRA A/B only")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        reasons.append("rank_pattern/alpha_pattern: vLLM applies one scaling (lora_alpha/r) to every module")
    if raw.get("use_dora") or parsed.magnitudes:
        reasons.append("DoRA (use_dora): vLLM's PEFTHelper refuses DoRA adapters (merge it with `lorakit merge`)")
    if raw.get("task_type") == "SEQ_CLS":
        notes.append("sequence classification: needs a vLLM with PR #53555 (2026; classification heads in "
                     "modules_to_save) and a base whose vLLM classification model supports LoRA")
    rank = max((a.shape[0] for slots in parsed.pairs.values() for a, _ in slots.values()), default=0)
    if rank > VLLM_DEFAULT_MAX_LORA_RANK:
        notes.append(f"rank above {VLLM_DEFAULT_MAX_LORA_RANK}: start vLLM with --max-lora-rank >= r")
    if parsed.embedding_modules:
        notes.append("LoRA on embeddings: support depends on the vLLM version and model")
    return not reasons, reasons, notes


def _saved_module_reasons(parsed: AdapterFile) -> list[str]:
    """modules_to_save vLLM cannot load: anything but a classification adapter's score/classifier head."""
    saved = sorted(parsed.saved_modules) or list(parsed.raw_config.get("modules_to_save") or [])
    if parsed.raw_config.get("task_type") != "SEQ_CLS":
        others = saved
    else:
        others = [name for name in saved if name.rsplit(".", 1)[-1] not in VLLM_SAVED_HEADS]
    if not others:
        return []
    return [f"modules_to_save {others}: vLLM loads only a sequence-classification adapter's "
            f"{'/'.join(VLLM_SAVED_HEADS)} head there (merge it with `lorakit merge` instead)"]
