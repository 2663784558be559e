"""`lorakit generate` and lorakit.generate: every output equals `model.generate` on that prompt alone with
its adapter merged (greedy, beams, sampling), records route to their own adapter, --chat, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import ConfigError, LoraConfig, inject, merge_and_unload, save_adapter
from lorakit.cli.generate import generate_main
from lorakit.generation import encode_prompt
from lorakit.io.models import load_model
from tiny import randomize_lora

PROMPTS = ["The weather today is", "name : Aromi | food : Chinese ||", "Once upon"]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, name in ((1, "alpha"), (2, "beta")):
        model, _ = load_model(tiny_llama)
        inject(model, LoraConfig(r=4, alpha=8, targets=("q", "v", "o")))
        randomize_lora(model, std=0.3, seed=seed)  # as if trained: B is zero at initialisation
        out[name] = save_adapter(model, root / name)
    return out


def _reference(model_path: Path, adapter: Path | None, prompt_ids: list[int], seed: int | None = None,
               **kw) -> list[int]:  # fmt: skip
    """model.generate on one prompt, the adapter merged into a plain transformers model."""
    model, tok = load_model(model_path)
    if adapter is not None:
        lorakit.load_adapter(model, adapter)
        model = merge_and_unload(model)
    if seed is not None:
        torch.manual_seed(seed)  # after loading, which may draw random numbers
    out = model.eval().generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids)),
                                pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id], **kw)  # fmt: skip
    new = out[0, len(prompt_ids) :].tolist()
    return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


@pytest.mark.parametrize("beams", [1, 3])
def test_jsonl_records_route_to_their_adapters_and_equal_merged_generate(
    tiny_llama, adapters, tmp_path, one_thread, beams
):
    records = [{"prompt": PROMPTS[0], "adapter": "alpha", "id": 7}, {"prompt": PROMPTS[1], "adapter": "beta"},
               {"prompt": PROMPTS[2], "adapter": None}, {"prompt": PROMPTS[1], "adapter": "alpha"}]  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    argv = ["--model", str(tiny_llama), "--adapter", f"alpha={adapters['alpha']}", "--adapter",
            f"beta={adapters['beta']}", "--input", str(src), "--output", str(out), "--max-new-tokens", "8",
            "--num-beams", str(beams), "--batch-size", "4"]  # fmt: skip
    assert generate_main(argv) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "output"} for r in results] == records  # fields kept
    _, tok = load_model(tiny_llama)
    kw = dict(max_new_tokens=8, num_beams=beams, do_sample=False, **({"early_stopping": True} if beams > 1 else {}))
    expected = []
    for rec in records:
        path = adapters[rec["adapter"]] if rec["adapter"] else None
        ids = _reference(tiny_llama, path, encode_prompt(tok, rec["prompt"]), **kw)
        expected.append(tok.decode(ids, skip_special_tokens=True))
    assert [r["output"] for r in results] == expected
    assert expected[1] != expected[3]  # the two adapters really differ on the same prompt


def test_python_api_chat_and_sampling_equal_merged_generate(tiny_llama, adapters, one_thread):
    model, tok = load_model(tiny_llama)
    lorakit.load_adapter(model, adapters["beta"], name="beta")
    chat_ids = encode_prompt(tok, "Hi there", chat=True)
    assert tok.decode(chat_ids).endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    (reply,) = lorakit.generate(model, tok, ["Hi there"], adapters="beta", chat=True, max_new_tokens=6)
    assert reply == tok.decode(_reference(tiny_llama, adapters["beta"], chat_ids, max_new_tokens=6,
                                          do_sample=False), skip_special_tokens=True)  # fmt: skip
    settings = dict(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=6)
    torch.manual_seed(3)
    (sampled,) = lorakit.generate(model, tok, [PROMPTS[0]], adapters="beta", **settings)
    ref = _reference(tiny_llama, adapters["beta"], encode_prompt(tok, PROMPTS[0]), seed=3, top_k=0, **settings)
    assert sampled == tok.decode(ref, skip_special_tokens=True)


def test_prompt_arguments_stream_to_stdout_and_stdin_lines_are_prompts(
    tiny_llama, adapters, capsys, monkeypatch, one_thread
):
    import io

    _, tok = load_model(tiny_llama)
    assert generate_main(["--model", str(tiny_llama), "--adapter", str(adapters["alpha"]), "--max-new-tokens",
                          "5", PROMPTS[0]]) == 0  # fmt: skip
    expected = tok.decode(_reference(tiny_llama, adapters["alpha"], encode_prompt(tok, PROMPTS[0]),
                                     max_new_tokens=5, do_sample=False), skip_special_tokens=True)  # fmt: skip
    assert capsys.readouterr().out.strip() == expected.strip()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPTS[0]}\n\n{json.dumps({'prompt': PROMPTS[2]})}\n"))
    argv = ["--model", str(tiny_llama), "--adapter", str(adapters["alpha"]), "--max-new-tokens", "5"]
    assert generate_main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == [PROMPTS[0], PROMPTS[2]] and lines[0]["output"] == expected


def test_input_errors_name_the_record_before_loading_a_model(tmp_path, adapters):
    src = tmp_path / "in.jsonl"
    both = ["--adapter", f"a={adapters['alpha']}", "--adapter", f"b={adapters['beta']}"]
    cases = [
        ('{"prompt": "x"}\n', both, r"in\.jsonl, line 1: several adapters are loaded"),
        ('{"prompt": "x", "adapter": "zeta"}\n', both, r"line 1: unknown adapter 'zeta'"),
        ('\n{"text": "x"}\n', [], r"in\.jsonl, line 2: a record needs a 'prompt' string or a 'messages' list"),
        ('{"prompt": \n', [], r"line 1: invalid JSON"),
    ]
    for text, extra, message in cases:
        src.write_text(text)
        with pytest.raises(ConfigError, match=message):
            generate_main(["--model", "no-such-model", "--input", str(src), *extra])
    with pytest.raises(ConfigError, match=r"names must differ"):
        generate_main(["--model", "m", "--adapter", "x=a", "--adapter", "x=b", "p"])
