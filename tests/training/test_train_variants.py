"""LoRA variants from the trainer: every LoraConfig option is a `lorakit train` flag and a config-file key,
PiSSA runs checkpoint and resume exactly and evaluate from their converted file, DoRA runs train and load in PEFT."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.evaluate import eval_main
from lorakit.cli.train import parse_train_args, train_main
from lorakit.errors import ConfigError, TargetError
from lorakit.io.models import load_model
from lorakit.lora.adapters import lora_layers
from lorakit.training import checkpoint as ckpt
from lorakit.training.outputs import load_trained
from lorakit.training.prepare import prepare_model
from lorakit.training.trainer import train
from tiny import make_tiny_bert, make_tiny_llama
from tiny import tiny_llama as tiny_llama_model
from train_util import base_cfg, train_records, write_chat_folder, write_sentiment_csv

REQUIRED = ["--task", "text", "--data", "d"]


def _injected(argv: list[str], config_file: str | None = None):
    """(LoraConfig, adapted module names) of `lorakit train ARGV` applied to a tiny Llama."""
    extra = ["--config", config_file] if config_file else []
    cfg, _ = parse_train_args([*REQUIRED, *extra, *argv])
    model = tiny_llama_model()
    prepare_model(model, cfg)
    return model.lorakit_configs["default"], [n for n, _ in lora_layers(model)], model


def _short(names: list[str]) -> set[str]:
    """``model.layers.1.self_attn.q_proj`` → ``1.q_proj``."""
    return {f"{n.split('.')[2]}.{n.rpartition('.')[2]}" for n in names}


LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# (flags, the same as a TOML file, what the injected adapter must show)
FLAG_CASES = {
    "use_dora": (["--use-dora", "--targets", "q"], 'use_dora = true\ntargets = ["q"]\n'),
    "init_pissa": (["--init", "pissa", "--targets", "q"], 'init = "pissa"\ntargets = "q"\n'),
    "init_olora": (["--init", "olora", "--targets", "q"], 'init = "olora"\ntargets = ["q"]\n'),
    "exclude": (["--targets", "q,k,v", "--exclude", "k,layers.1.self_attn.v_proj"],
                'targets = ["q", "k", "v"]\nexclude = ["k", "layers.1.self_attn.v_proj"]\n'),
    "layers": (["--targets", "q,v", "--layers", "1"], 'targets = "q,v"\nlayers = [1]\n'),
    "all_linear": (["--targets", "all-linear"], 'targets = "all-linear"\n'),
}  # fmt: skip


def _expected(case: str) -> tuple[dict, set[str]]:
    """(LoraConfig fields, adapted modules) each case must produce on the 2-block tiny Llama."""
    both = ("0", "1")
    return {
        "use_dora": ({"use_dora": True}, {f"{i}.q_proj" for i in both}),
        "init_pissa": ({"init": "pissa"}, {f"{i}.q_proj" for i in both}),
        "init_olora": ({"init": "olora"}, {f"{i}.q_proj" for i in both}),
        "exclude": ({"exclude": ("k", "layers.1.self_attn.v_proj")}, {"0.q_proj", "1.q_proj", "0.v_proj"}),
        "layers": ({"layers": (1,)}, {"1.q_proj", "1.v_proj"}),
        "all_linear": ({"targets": ("all-linear",)}, {f"{i}.{m}" for i in both for m in LLAMA_LINEAR}),
    }[case]


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
@pytest.mark.parametrize("source", ["flags", "config_file"])
def test_each_variant_option_reaches_lora_config_from_flags_and_files(case, source, tmp_path):
    flags, toml = FLAG_CASES[case]
    path = tmp_path / "run.toml"
    path.write_text(toml)
    config, names, model = _injected(flags) if source == "flags" else _injected([], str(path))
    fields, modules = _expected(case)
    assert {k: getattr(config, k) for k in fields} == fields
    assert _short(names) == modules
    magnitudes = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".magnitude")]
    assert len(magnitudes) == (len(modules) if case == "use_dora" else 0)


def test_residual_init_from_the_cli_moves_w0_into_the_adapter():
    _, _, plain = _injected(["--targets", "q"])
    _, _, pissa = _injected(["--init", "pissa", "--targets", "q"])
    w0 = plain.model.layers[0].self_attn.q_proj.base_layer.weight
    residual = pissa.model.layers[0].self_attn.q_proj.base_layer.weight
    # PiSSA's residual has W0's top singular values removed: its largest one is W0's (r+1)-th.
    s0, s1 = torch.linalg.svdvals(w0), torch.linalg.svdvals(residual)
    torch.testing.assert_close(s1[0], s0[8], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "argv,error,match",
    [
        (["--layers", "0,x"], ConfigError, r"layers = '0,x' is not a valid comma-separated list of integers"),
        (["--layers", "-1"], ConfigError, r"layers must be a non-empty list of layer indices >= 0"),
        (["--init", "svd"], ConfigError, r"init must be one of \['gaussian', 'kaiming', 'pissa', 'olora'\]"),
        (["--init", "pissa", "--use-dora"], ConfigError, r"init='pissa' cannot be combined with use_dora"),
        (["--method", "full", "--use-dora"], ConfigError, r"use_dora: LoRA settings, which method 'full'"),
        (["--method", "bitfit", "--layers", "1"], ConfigError, r"layers: LoRA settings"),
        (["--exclude", "(k"], TargetError, r"'\(k' is not a valid regular expression"),
        (["--use-dora=yes"], SystemExit, None),
        (["--quantize", "fp3"], ConfigError, r"unknown quantization scheme 'fp3'; choose from \['int8', 'nf4'\]"),
        (["--method", "full", "--quantize", "nf4"], ConfigError, r"quantize: LoRA settings, which method 'full'"),
    ],
)  # fmt: skip
def test_bad_variant_flags_fail_before_any_model_is_loaded(argv, error, match, capsys):
    with pytest.raises(error, match=match):
        parse_train_args([*REQUIRED, *argv])


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--targets", "q,v", "--exclude", "gate"], r"exclude"),
        (["--targets", "q,v", "--layers", "0,7"], r"7"),
    ],
)
def test_variant_options_that_match_nothing_on_the_model_are_errors(argv, match):
    with pytest.raises((ConfigError, TargetError), match=match):
        _injected(argv)


def test_a_bad_config_file_value_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('layers = ["a"]\n')
    with pytest.raises(ConfigError, match=r"run.toml: layers = \['a'\] is not a valid comma-separated"):
        parse_train_args([*REQUIRED, "--config", str(path)])
    path.write_text("use_dora = 3\n")
    with pytest.raises(ConfigError, match=r"run.toml: use_dora = 3 is not a valid bool"):
        parse_train_args([*REQUIRED, "--config", str(path)])


def test_resume_accepts_a_run_saved_before_the_variant_fields_existed(tmp_path, one_thread):
    model = make_tiny_bert(tmp_path / "tiny-bert")
    data = write_sentiment_csv(tmp_path / "data", n_train=16, n_test=8)
    cfg = base_cfg(model=str(model), task="text", data=str(data), out=str(tmp_path / "run"), max_steps=2,
                   save_interval=1)  # fmt: skip
    first = train(cfg)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    for name in ("use_dora", "exclude", "layers"):
        del saved[name]  # as written before these fields existed
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(saved))
    assert train(cfg, resume=True) == first
    changed = base_cfg(**{**cfg.to_dict(), "use_dora": True})
    with pytest.raises(ConfigError, match=r"different settings \(use_dora: False -> True\)"):
        train(changed, resume=True)


# -- PiSSA: checkpoints, resume, eval -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pissa_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pissa")
    # Dropout in the base model and in LoRA: the resumed run must also continue the same random stream.
    model = make_tiny_bert(root / "tiny-bert-dropout", dropout=0.1)
    data = write_sentiment_csv(root / "data", n_train=24, n_test=8)
    return root, model, data


def _pissa_cfg(model, data, out):
    # 3 steps per epoch, checkpoints at 2, 4 and 6.
    return base_cfg(
        model=str(model), task="text", data=str(data), out=str(out), max_steps=6, save_interval=2,
        eval_interval=3, dropout=0.1, lr=3e-3, keep_checkpoints=0, init="pissa", targets=["q", "v"], r=4,
    )  # fmt: skip


def _lose_work_after(out, step: int) -> None:
    """The run folder as a process killed after checkpoint ``step`` left it (its later work lost)."""
    for name in ("eval_results.json", "adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    for s, path in ckpt.list_checkpoints(out):
        if s > step:
            shutil.rmtree(path)


def test_a_resumed_pissa_run_equals_an_uninterrupted_one(pissa_setup, one_thread):
    root, model, data = pissa_setup
    out = root / "run"
    reference = train(_pissa_cfg(model, data, out))
    ref_file = load_file(out / "adapter_model.safetensors")
    ref_log = train_records(out)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lorakit"]["converted_from"]) == (8, "pissa")  # plain LoRA of rank 2r

    # The checkpoint holds the converted file (for eval) and the raw, rank-r A/B (for resume).
    step2 = out / "checkpoints" / "step-2"
    raw = load_file(step2 / ckpt.STATE_TENSORS)
    a_raw = [k for k in raw if k.startswith("param/") and ".A." in k]
    assert a_raw and all(raw[k].shape[0] == 4 for k in a_raw)
    assert json.loads((step2 / "adapter_config.json").read_text())["r"] == 8

    _lose_work_after(out, 2)
    resumed = train(_pissa_cfg(model, data, out), resume=True)
    assert resumed == pytest.approx(reference, abs=1e-6)
    res_file = load_file(out / "adapter_model.safetensors")
    assert sorted(res_file) == sorted(ref_file)
    for key in ref_file:
        assert (res_file[key] - ref_file[key]).abs().max().item() <= 1e-6, key
    again = train_records(out)
    assert [(r["split"], r["step"]) for r in again] == [(r["split"], r["step"]) for r in ref_log]
    for r, s in zip(ref_log, again):
        assert s == pytest.approx(r, abs=1e-6)


def test_eval_of_a_pissa_run_loads_the_converted_file_on_the_original_base(pissa_setup, capfd, one_thread):
    root, model, data = pissa_setup
    out = root / "eval-run"
    final = train(_pissa_cfg(model, data, out))
    capfd.readouterr()
    assert eval_main(["--adapter", str(out), "--json"]) == 0
    scored = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert scored == pytest.approx(final, abs=1e-5)
    # And in PEFT, on the original base: the same logits as lorakit's loaded model.
    ours, _ = load_model(str(model), "seq-cls", num_labels=2)
    load_trained(ours, out)
    theirs, tok = load_model(str(model), "seq-cls", num_labels=2)
    theirs = peft.PeftModel.from_pretrained(theirs, str(out)).eval()
    batch = tok(["the plot was wonderful great", "the music was awful terrible"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours.eval()(**batch).logits, atol=1e-5, rtol=1e-4)


# -- DoRA ----------------------------------------------------------------------------------------------------


def _train_tiny_chat_lm(tmp_path, monkeypatch, name: str, extra: list[str]):
    """12 steps of ``lorakit train --task sft --targets all-linear`` plus ``extra`` on a tiny Llama; returns
    (model folder, run folder) after checking that it learned."""
    import lorakit.metrics.d2t

    # METEOR starts a JVM; the real metrics are tested in test_d2t.py.
    monkeypatch.setattr(lorakit.metrics.d2t, "d2t_metrics", lambda h, r, seen=None: {"BLEU": 0.0})
    model = make_tiny_llama(tmp_path / "tiny-llama")
    data = write_chat_folder(tmp_path / "chat")
    out = tmp_path / name
    argv = ["--model", str(model), "--task", "sft", "--data", str(data), "--out", str(out), *extra,
            "--targets", "all-linear", "--max-steps", "12", "--batch-size", "8", "--lr", "1e-2", "--log-interval", "1",
            "--max-length", "96", "--num-beams", "1", "--max-new-tokens", "2", "--keep-checkpoints", "0",
            "--no-plot"]  # fmt: skip
    assert train_main(argv) == 0
    losses = [r["loss"] for r in train_records(out) if r["split"] == "train"]
    # 3 steps per epoch: the fourth pass over the training set has a mean loss > 0.2 nats below the first's
    # (0.30 measured with DoRA; a 49k-word vocabulary on a 32-wide model learns slowly).
    assert len(losses) == 12 and sum(losses[9:]) / 3 < sum(losses[:3]) / 3 - 0.2
    return model, out


def test_use_dora_trains_through_the_cli_and_loads_in_peft(tmp_path, capfd, monkeypatch, one_thread):
    model, out = _train_tiny_chat_lm(tmp_path, monkeypatch, "dora", ["--use-dora", "--save-interval", "6"])
    trained = json.loads((out / "checkpoints" / "step-6" / ckpt.STATE_JSON).read_text())["parameters"]
    assert sum(n.endswith(".magnitude") for n in trained) == 14  # all 7 linear layers of both blocks train m
    saved = load_file(out / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in saved.items() if "lora_magnitude_vector" in k}
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True and len(magnitudes) == 14

    base, tok = load_model(str(model))
    w0 = base.model.layers[0].self_attn.q_proj.weight
    key = next(k for k in magnitudes if "layers.0.self_attn.q_proj" in k)
    assert (magnitudes[key] - w0.norm(dim=1)).abs().max() > 1e-3  # m moved from its start, ‖W0‖
    ours, _ = load_model(str(model))
    load_trained(ours, out)
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    x = tok(["Colour 3? blue", "Colour 4? white"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).logits, ours.eval()(**x).logits, atol=1e-4, rtol=1e-4)


# -- QLoRA -----------------------------------------------------------------------------------------------------


def test_quantize_nf4_trains_through_the_cli_and_saves_a_plain_adapter(tmp_path, capfd, monkeypatch, one_thread):
    from lorakit.quant.linear import QuantizedLinear

    model, out = _train_tiny_chat_lm(tmp_path, monkeypatch, "qlora", ["--quantize", "nf4"])
    assert "quantized" in capfd.readouterr().out
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # LoRA only: no packed codes
    dense, _ = load_model(str(model))
    load_trained(dense, out)  # an ordinary adapter: it loads on the unquantized base
    assert not any(isinstance(m, QuantizedLinear) for m in dense.modules())

