"""lorakit's GGUF exports run by llama.cpp itself (built by scripts/llama_cpp.sh), against lorakit on the
same prompts: base F32 GGUF + GGUF adapter vs lorakit unmerged, and merged GGUFs by dtype. Also llama.cpp's
own convert_lora_to_gguf.py on the same adapter, as a cross-check of the adapter file.

Slow (minutes, and a one-time llama.cpp build): run with ``pytest -m slow -s tests/export/test_export_llama_cpp.py``;
the figures are printed as ``FIGURE`` lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from export_util import make_adapter
from llama_cpp_util import greedy_completion, llama_server, server_binary, source_tree
from lorakit.cli import main
from lorakit.export.gguf_adapter import _as_f32, read_delta_w
from lorakit.export.gguf_model import write_gguf_model
from lorakit.io.files import load_adapter
from lorakit.io.models import builtin_gguf, load_model, model_path

pytestmark = pytest.mark.slow
N_TOKENS = 24
QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.",
             "Explain what a hash table is in one sentence.", "List three prime numbers."]
ADAPTERS = {"plain": dict(r=8, alpha=16.0, targets=("q", "k", "v", "o", "ffn")),
            "rslora+rank_pattern": dict(r=8, alpha=16.0, targets=("q", "k", "v", "o"), use_rslora=True,
                                        rank_pattern={"k_proj": 16})}
needs_server = pytest.mark.skipif(server_binary() is None, reason="llama-server not built: run scripts/llama_cpp.sh")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Adapters (small random B, so greedy text stays readable), their GGUF exports, an F32 base GGUF."""
    root = tmp_path_factory.mktemp("llama_cpp")
    out = {"root": root, "adapters": {}}
    for name, config in ADAPTERS.items():
        adapter = make_adapter(root / name.replace("+", "_"), seed=1, **config)
        _scale_b(adapter, 0.2)
        gguf_path = root / f"{adapter.name}.gguf"
        assert main(["export", "--adapter", str(adapter), "--format", "gguf-adapter", "--out", str(gguf_path)]) == 0
        out["adapters"][name] = (adapter, gguf_path)
    out["qv"] = make_adapter(root / "qv", seed=2, r=8, alpha=16.0, targets=("q", "v"))
    _scale_b(out["qv"], 0.2)
    out["base_f32"] = root / "base-f32.gguf"
    write_gguf_model(out["base_f32"], builtin_gguf("smollm2-135m"), {}, "f32", requantize=True)
    _, tokenizer = load_model("smollm2-135m")
    # return_dict: transformers 5 returns a BatchEncoding by default, 4.x a list of ids
    out["prompts"] = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    return_dict=True)["input_ids"] for q in QUESTIONS]
    return out


def _scale_b(adapter: Path, factor: float) -> None:
    """Shrink B in place (and re-record the file's checksum) so the adapter nudges the model, not wrecks it."""
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = {k: v * factor if ".lora_B" in k else v for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.get("lorakit", {}).pop("sha256", None)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


@torch.no_grad()
def _lorakit_greedy(model, prompt: list[int], n: int, barred: set[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens never choosing a ``barred`` id (as llama.cpp's ignore_eos), and every step's log-probs."""
    ids, past, tokens, logprobs = torch.tensor([prompt]), None, [], []
    for _ in range(n):
        result = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = result.past_key_values
        lp = torch.log_softmax(result.logits[0, -1].double(), dim=-1)
        tokens.append(int(lp.index_fill(0, torch.tensor(sorted(barred), dtype=torch.long), -torch.inf).argmax()))
        logprobs.append(lp)
        ids = torch.tensor([[tokens[-1]]])
    return tokens, logprobs


def _compare(url: str, model, prompts: list[list[int]]) -> dict:
    """Greedy tokens and top-5 log-probabilities of llama.cpp vs lorakit, prompt by prompt.

    ``divergence_margins``: at each first divergence, lorakit's own log-probability of its token minus
    that of llama.cpp's token. Near zero, the two runtimes split a near-tie; large, one of them is wrong.
    """
    same, prefixes, delta, margins = 0, [], 0.0, []
    for prompt in prompts:
        theirs, steps, barred = greedy_completion(url, prompt, N_TOKENS)
        ours, logprobs = _lorakit_greedy(model, prompt, N_TOKENS, barred)
        prefix = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), N_TOKENS)
        same += prefix == N_TOKENS
        prefixes.append(prefix)
        if prefix < N_TOKENS:
            margins.append(float(logprobs[prefix][ours[prefix]] - logprobs[prefix][theirs[prefix]]))
        # up to and including the divergence both saw the same tokens; past it they continue different texts
        for step in range(min(prefix + 1, N_TOKENS)):
            delta = max(delta, max(abs(lp - float(logprobs[step][tok])) for tok, lp in steps[step].items()))
    return {"identical": f"{same}/{len(prompts)}", "common_prefix": prefixes, "max_abs_dlogprob": delta,
            "divergence_margins": margins}


@needs_server
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_gguf_adapter_in_llama_cpp_matches_lorakit_unmerged(work, name):
    adapter, gguf_path = work["adapters"][name]
    model, _ = load_model("smollm2-135m")
    load_adapter(model, adapter)
    with llama_server(work["base_f32"], gguf_path) as url:
        figures = _compare(url, model.eval(), work["prompts"])
    print(f"FIGURE adapter {name}: F32 base + GGUF adapter vs lorakit unmerged fp32: {figures}")
    # Same fp32 weights: log-probabilities agree to float rounding, and greedy tokens may part only where
    # lorakit's own top two are that close (a near-tie argmax can go either way), never on a clear choice.
    assert figures["max_abs_dlogprob"] < 0.05
    assert all(m < 0.05 for m in figures["divergence_margins"])


# (dtype, every matrix re-encoded?, adapter, bound on max |Δ log-prob|). "merged only" uses a q,v adapter, so
# 60 matrices are q8_0 and the other 150 stay Q4_1 as shipped (lorakit's base is that Q4_1 dequantized).
MERGED = [("f16", True, "plain", 0.1), ("q8_0", True, "plain", 1.0), ("q8_0", False, "qv", 1.0)]


@needs_server
@pytest.mark.parametrize(("dtype", "requantize", "name", "bound"), MERGED)
def test_merged_gguf_in_llama_cpp_by_dtype(work, dtype, requantize, name, bound):
    adapter = work["qv"] if name == "qv" else work["adapters"][name][0]
    out = work["root"] / f"merged-{dtype}-{requantize}.gguf"
    args = ["export", "--adapter", str(adapter), "--format", "gguf", "--dtype", dtype, "--out", str(out)]
    assert main(args + (["--requantize"] if requantize else [])) == 0
    model, _ = load_model("smollm2-135m")
    load_adapter(model, adapter)
    with llama_server(out) as url:
        figures = _compare(url, model.eval(), work["prompts"])
    what = "every matrix" if requantize else "q,v adapter, merged matrices only, the rest Q4_1/Q8_0 as shipped"
    print(f"FIGURE merged {dtype} ({what}) vs lorakit unmerged fp32: {figures}")
    assert all(p >= 1 for p in figures["common_prefix"])  # the first greedy token agrees on every prompt
    assert figures["max_abs_dlogprob"] < bound  # rounding of the weights (and llama.cpp's activations), not more
    if dtype == "f16":  # f16 weights keep 11 bits: divergences only at near-ties
        assert all(m < bound for m in figures["divergence_margins"])


@pytest.mark.skipif(source_tree() is None, reason="llama.cpp sources not downloaded: run scripts/llama_cpp.sh")
def test_llama_cpps_converter_agrees_on_plain_lora_and_ignores_rslora(work, tmp_path):
    tree = source_tree()
    for name, factor in (("plain", 1.0), ("rslora+rank_pattern", None)):
        adapter, ours = work["adapters"][name]
        theirs = tmp_path / f"{adapter.name}-converter.gguf"
        env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
        subprocess.run([sys.executable, str(tree / "convert_lora_to_gguf.py"), "--base", model_path("smollm2-135m"),
                        "--outfile", str(theirs), "--outtype", "f32", str(adapter)],
                       check=True, env=env, cwd=tree, capture_output=True)
        a, b = read_delta_w(ours), read_delta_w(theirs)
        assert set(a) == set(b)
        ratios = {k: float(np.abs(b[k]).max() / np.abs(a[k]).max()) for k in a}
        print(f"FIGURE converter/lorakit ΔW ratio, {name}: min {min(ratios.values()):.4f} "
              f"max {max(ratios.values()):.4f}")
        if factor == 1.0:
            reader_a, reader_b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
            tb = {t.name: _as_f32(t) for t in reader_b.tensors}
            assert all(np.array_equal(_as_f32(t), tb[t.name]) for t in reader_a.tensors)
        else:  # the converter scales by lora_alpha / r, not rsLoRA's lora_alpha / sqrt(r)
            assert min(ratios.values()) < 0.9
