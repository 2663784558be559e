"""The `lorakit` command: help, info, merge, and a miniature demo run."""

import json

import pytest
import torch

from lorakit import LoraConfig, inject, save_adapter
from lorakit.cli import main
from tiny import randomize_lora, tiny_gpt2


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "merge", "info", "train", "eval", "estimate", "analyze", "bench"):
        assert f"  {command}" in out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_info_reports_what_the_file_holds(tmp_path, capsys):
    model = tiny_gpt2()
    inject(model, LoraConfig(targets=("q", "v", "o"), r=4))
    save_adapter(model, tmp_path / "ad")
    assert main(["info", str(tmp_path / "ad"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ranks"] == [4] and info["adapted_modules"] == 4
    assert info["fused_slices"]["transformer.h.1.attn.c_attn"] == ["q", "v"]
    # 2 layers × (q and v slices of 32→32, plus c_proj 32→32) at r=4
    assert info["lora_parameters"] == 2 * 3 * 4 * (32 + 32)
    assert main(["info", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_merge_command_writes_a_plain_model(minilm_cls, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tok = minilm_cls
    inject(model, LoraConfig(targets=("q", "v"), modules_to_save=("classifier",)))
    randomize_lora(model, std=0.05)
    batch = tok(["a fine film", "a dull film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    save_adapter(model, tmp_path / "ad")
    assert main(["merge", "--model", "minilm-l6", "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=0)


def test_demo_runs_end_to_end_in_miniature(minilm_path, tmp_path, capsys):
    argv = ["demo", "--train-size", "64", "--test-size", "32", "--epochs", "1", "--out", str(tmp_path / "demo")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "sentiment accuracy" in out and "plot accuracy" in out and "agree on 100.0%" in out
    assert "in the mixed batch" in out
    for task in ("sentiment", "plot"):  # trained by lorakit's trainer: its run files are there
        assert (tmp_path / "demo" / task / "adapter_model.safetensors").is_file()
        assert (tmp_path / "demo" / task / "train_config.json").is_file()
    assert (tmp_path / "demo" / "merged" / "config.json").is_file()
    # Sentiment batches are length-grouped (length says nothing about sentiment); plot batches stay random,
    # since plot summaries are longer than reviews and grouped batches would be nearly single-class.
    configs = {t: json.loads((tmp_path / "demo" / t / "train_config.json").read_text()) for t in ("sentiment", "plot")}
    assert configs["sentiment"]["length_grouping"] and configs["sentiment"]["group_window"] == 8
    assert not configs["plot"]["length_grouping"]
    # The sentiment head learns at the adapter's lr (chosen on reviews outside the demo's splits); the short
    # plot run keeps the classification default: 10 x, capped at a head lr of 1e-2 (10/3 x at lr 3e-3).
    assert configs["sentiment"]["head_lr_ratio"] == 1.0
    assert configs["plot"]["lr"] * configs["plot"]["head_lr_ratio"] == pytest.approx(1e-2)
    # One pass over the data: MiniLM's own dropout is off in both runs (lorakit.demo.MODEL_DROPOUT).
    assert configs["sentiment"]["model_dropout"] == configs["plot"]["model_dropout"] == 0.0
    assert "LOAD REPORT" not in captured.err and "MISSING" not in captured.err  # transformers' noise filtered


def test_lorakit_warnings_print_as_one_plain_line_and_others_keep_pythons_format(monkeypatch):
    import warnings

    from lorakit.cli import plain_lorakit_warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    default = warnings.formatwarning("x", UserWarning, "/site/other/mod.py", 3, "raise_it()")
    plain_lorakit_warnings()
    plain_lorakit_warnings()  # idempotent: main() may run many times in one process
    import lorakit.tasks.nlg

    ours = warnings.formatwarning("no file for ['test']", UserWarning, lorakit.tasks.nlg.__file__, 55, "call()")
    assert ours == "lorakit: warning: no file for ['test']\n"
    # A user's own folder that happens to be called lorakit is not lorakit's code.
    theirs = warnings.formatwarning("x", UserWarning, "/home/u/lorakit/train.py", 3, "raise_it()")
    assert theirs.startswith("/home/u/lorakit/train.py:3: UserWarning: x")
    assert warnings.formatwarning("x", UserWarning, "/site/other/mod.py", 3, "raise_it()") == default


def test_demo_recipe_search_validates_on_reviews_outside_every_demo_split():
    """The demo's recipe is chosen on reviews it never trains or tests on (scripts/demo_recipe_search.py)."""
    from tests.script_util import load_script

    from lorakit.cli.demo import demo_parser
    from lorakit.demo import make_tasks, shipped_snippets

    search = load_script("demo_recipe_search")
    sentiment, valid = search.validation_rows(0)
    defaults = demo_parser().parse_args([])
    demo_sentiment, plot = make_tasks(shipped_snippets(), defaults.train_size, defaults.test_size, 0)
    assert sentiment.train == demo_sentiment.train  # the demo's own training set
    seen = {t for t, _ in demo_sentiment.train + demo_sentiment.test + plot.train + plot.test}
    assert len(valid) > 800 and not seen & {t for t, _ in valid}
    assert {label for _, label in valid} == {"fresh", "rotten"}


def test_third_party_notices_are_hidden_and_other_warnings_kept():
    """bitsandbytes' optional-kernel log line and transformers' is_gradient_checkpointing deprecation (both
    reached through PEFT) are hidden; any other warning still shows."""
    import logging
    import warnings

    from lorakit.io.models import quiet_third_party_notices

    bnb = logging.getLogger("bitsandbytes")
    previous = bnb.level
    try:
        bnb.setLevel(logging.NOTSET)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            quiet_third_party_notices()
            warnings.warn("`is_gradient_checkpointing` is deprecated, use ...", FutureWarning, stacklevel=1)
            warnings.warn("`something_else` is deprecated", FutureWarning, stacklevel=1)
        assert [str(w.message) for w in seen] == ["`something_else` is deprecated"]
        assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR
    finally:
        bnb.setLevel(previous)
