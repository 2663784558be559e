"""`lorakit latency`: variants are what they claim to be, and the report/table have the documented shape."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli.latency import latency_main
from lorakit.errors import ConfigError
from lorakit.experiments import latency
from lorakit.experiments.latency import build_variant, format_table, run_latency
from lorakit.lora.adapters import lora_layers

SETTINGS = {"r": 4, "targets": "q,v", "bottleneck": 4, "prefix": 3}


# Tiny forwards run faster on one thread, and far faster when other jobs share the CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    return latency.load_base("gpt2-tiny-random", "cpu")


def test_variants_share_the_base_and_differ_as_designed(base):
    x = torch.randint(0, 1000, (2, 6))
    out = {v: build_variant(base, v, **SETTINGS)(input_ids=x).logits for v in
           ("base", "base_copy", "lora_merged", "lora_unmerged", "adapter_h", "prefix_layer")}
    assert base.transformer.h[0].attn.c_attn.weight.requires_grad  # the base itself was never modified
    torch.testing.assert_close(out["base"], base(input_ids=x).logits)
    torch.testing.assert_close(out["base_copy"], out["base"], atol=0, rtol=0)  # the noise-floor column
    # Merged and unmerged LoRA compute the same function; trained-looking values make it differ from the base.
    torch.testing.assert_close(out["lora_merged"], out["lora_unmerged"], atol=1e-4, rtol=1e-4)
    for v in ("lora_merged", "adapter_h", "prefix_layer"):
        assert not torch.allclose(out[v], out["base"], atol=1e-5), v
    merged = build_variant(base, "lora_merged", **SETTINGS)
    assert all(layer.merged_adapter for _, layer in lora_layers(merged))
    with pytest.raises(ConfigError, match=r"unknown latency variant 'adapterx'.*lora_merged"):
        build_variant(base, "adapterx", **SETTINGS)


def test_measure_interleaves_and_counts_repeats(base):
    calls: list[str] = []

    class Spy(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name
            self.inner = base

        def get_input_embeddings(self):
            return base.get_input_embeddings()

        def forward(self, **kwargs):
            calls.append(self.name)
            assert kwargs["logits_to_keep"] == 1 and kwargs["input_ids"].shape == (2, 5)

    times = latency.measure({"a": Spy("a"), "b": Spy("b")}, 2, 5, warmup=1, repeats=3)
    # A warm-up round, then the variants take turns every repeat, the order rotating (bench.timing).
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_report_table_and_cli(capsys, monkeypatch):
    report = run_latency("gpt2-tiny-random", ["adapter_l", "base"], [1], [8], repeats=2, warmup=0,
                         bottleneck=4)
    assert report["variants"] == ["base", "adapter_l"]  # base is the reference: always there, first
    assert report["trainable_params"]["adapter_l"] == 2 * (2 * 64 * 4 + 4 + 64 + 2 * 64)
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["base"]["pct_over_base"] == 0.0
    expected = 100 * (rows["adapter_l"]["ms"] / rows["base"]["ms"] - 1)
    assert rows["adapter_l"]["pct_over_base"] == pytest.approx(expected)
    table = format_table(report).splitlines()
    assert table[0] == "| batch | seq | base (ms) | adapter_l |"
    assert table[2].startswith("| 1 | 8 | ") and table[2].endswith("%) |")

    fake = {**report, "rows": [dict(r, ms=10.0, pct_over_base=0.0) if r["variant"] == "base"
                               else dict(r, ms=12.5, pct_over_base=25.0) for r in report["rows"]]}
    seen = {}

    def fake_run(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return fake

    monkeypatch.setattr(latency, "run_latency", fake_run)
    assert latency_main(["--model", "gpt2-tiny-random", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][1]["ms"] == 12.5
    assert latency_main(["--variants", "adapter_l", "--batch-sizes", "1,4", "--seq-lens", "8"]) == 0
    assert "| 1 | 8 | 10.0 | 12.5 (+25.0%) |" in capsys.readouterr().out
    assert seen["args"][1:] == (["adapter_l"], [1, 4], [8])
    assert latency_main(["--stat", "min"]) == 0  # the fastest repeat, from the same report
    fastest = min(fake["rows"][1]["all_ms"])
    fastest_base = min(fake["rows"][0]["all_ms"])
    assert f"| {fastest:.1f} ({100 * (fastest / fastest_base - 1):+.1f}%) |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        latency_main(["--batch-sizes", "0"])
