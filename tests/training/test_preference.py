"""Preference tuning (``--task dpo`` / ``orpo``): data, truncation, losses against closed forms and TRL, runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lorakit.data import DataError
from lorakit.data.preference import collate_preference, encode_preference, load_preference
from lorakit.errors import ConfigError
from lorakit.training.preference import PreferenceLoss, preference_loss, preference_step, sequence_logps
from train_util import base_cfg


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PAIRS = [{"prompt": f"Colour {i}?", "chosen": " red", "rejected": " blue"} for i in range(16)]


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "p", "chosen": " a"}, "line 2: missing field(s) ['rejected']"),
        ({"prompt": "p", "rejected": " a"}, "line 2: missing field(s) ['chosen']"),
        ({"prompt": "p", "chosen": " same", "rejected": " same"}, "line 2: 'chosen' and 'rejected' are identical"),
        ({"prompt": "p", "chosen": " a", "rejected": 3}, "line 2: 'rejected' must be text or chat messages"),
        ({"prompt": [{"role": "user", "content": "p"}], "chosen": " a", "rejected": " b"}, "line 2: mixes text"),
        ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "line 2: 'chosen' must hold the assistant's reply"),
    ],
)  # fmt: skip
def test_each_malformed_record_is_one_line_naming_file_and_line(tmp_path, record, message):
    path = _jsonl(tmp_path / "train.jsonl", [PAIRS[0], record])
    with pytest.raises(DataError) as err:
        load_preference(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_beta_must_be_finite_and_positive(beta):
    with pytest.raises(ConfigError, match="beta must be a finite"):
        base_cfg(task="dpo", data="x", beta=beta)


def test_loss_settings_are_checked_before_loading(tmp_path):
    from lorakit.tasks import load_task

    data = _jsonl(tmp_path / "train.jsonl", PAIRS)
    with pytest.raises(ConfigError, match="applies to the sigmoid loss only"):
        load_task(base_cfg(task="dpo", data=str(data), pref_loss="hinge", label_smoothing=0.1))
    with pytest.raises(ConfigError, match="task 'orpo' trains the ORPO loss"):
        load_task(base_cfg(task="orpo", data=str(data), pref_loss="sigmoid"))
    with pytest.raises(ConfigError, match=r"in \[0, 0.5\)"):
        load_task(base_cfg(task="dpo", data=str(data), label_smoothing=0.6))


# -- encoding ----------------------------------------------------------------------------------------------
def test_pairs_share_the_prompt_and_only_answers_plus_eos_are_scored(tok, tmp_path):
    [rec] = load_preference(_jsonl(tmp_path / "p.jsonl", [{"prompt": "Sky:", "chosen": " blue", "rejected": " green"}]))
    [row] = encode_preference([rec], tok, 64)
    prompt = tok("Sky:", add_special_tokens=False)["input_ids"]
    for side, answer in (("chosen", " blue"), ("rejected", " green")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert ids == [*prompt, *tok(answer, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        assert [t for t in labels if t != -100] == ids[len(prompt) :]
    batch = collate_preference([row, row], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["labels"][2].tolist()[: len(row["rejected_labels"])] == row[
        "rejected_labels"
    ]


def test_long_prompts_lose_the_same_left_tokens_and_answers_stay_whole(tok, tmp_path):
    long = " ".join(f"w{i}" for i in range(60))
    recs = load_preference(_jsonl(tmp_path / "p.jsonl", [{"prompt": long, "chosen": " yes indeed", "rejected": " no"}]))
    with pytest.warns(UserWarning, match="cut the prompt of 1 of 1 pairs"):
        [row] = encode_preference(recs, tok, 32)
    chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
    assert len(chosen) == 32 and len(rejected) < 32  # the longer answer decides the cut
    n_prompt = sum(1 for t in row["chosen_labels"] if t == -100)
    assert chosen[:n_prompt] == rejected[:n_prompt]  # the same prompt tokens for both
    assert chosen[n_prompt:] == [*tok(" yes indeed", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    with pytest.raises(DataError, match=r"p.jsonl, line 1: no room for the answers at max_length=3"):
        encode_preference(recs, tok, 3)


def test_chat_pairs_score_the_assistant_reply_in_the_template(tok, tmp_path):
    user = [{"role": "user", "content": "Name a colour."}]
    rec = {"prompt": user, "chosen": [{"role": "assistant", "content": "Red."}],
           "rejected": [{"role": "assistant", "content": "Seven."}]}  # fmt: skip
    [loaded] = load_preference(_jsonl(tmp_path / "c.jsonl", [rec]))
    [row] = encode_preference([loaded], tok, 128)
    full = tok.apply_chat_template([*user, {"role": "assistant", "content": "Red."}], tokenize=False)
    assert tok.decode(row["chosen_input_ids"]) == full
    scored = tok.decode([t for t in row["chosen_labels"] if t != -100])
    assert scored.startswith("Red.") and "Name a colour" not in scored


# -- losses ------------------------------------------------------------------------------------------------
@pytest.fixture
def smollm2_lora(smollm2):
    from lorakit import inject
    from lorakit.lora.config import LoraConfig

    model, tok = smollm2
    inject(model, LoraConfig(r=8, alpha=16, targets=("q", "v")))
    return model, tok


def test_step_zero_loss_is_ln2_exactly_on_smollm2(smollm2_lora, tok):
    """B = 0: the policy is its reference, so every log-ratio is 0 and each loss sits at its closed form."""
    model, _ = smollm2_lora
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = encode_preference(load_preference_pairs(tok), tok, 64)
    batch = collate_preference(rows, tok.pad_token_id)
    expected = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * 0.1)) ** 2}
    for kind, value in expected.items():
        summed, sums = preference_step(PreferenceLoss(kind, 0.1), model, batch)
        assert float(summed) / len(rows) == pytest.approx(value, rel=1e-7, abs=0)
        assert sums["reward_margin"] == 0.0 and sums["reward_accuracy"] == 0.0
    summed, _ = preference_step(PreferenceLoss("sigmoid", 0.1, label_smoothing=0.2), model, batch)
    assert float(summed) / len(rows) == pytest.approx(math.log(2), rel=1e-7)  # cDPO: ln 2 at 0 as well
    # The reference pass (adapters off) leaves the adapter active and trainable, and the mode as it was.
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable and not model.training


def load_preference_pairs(tok) -> list:
    from lorakit.data.preference import PreferenceRecord

    return [PreferenceRecord("t", "The sky is", " blue.", " made of cheese."),
            PreferenceRecord("t", "Two plus two is", " four.", " five, obviously.")]  # fmt: skip


def _per_sequence_grads(model, batch) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    logps, counts = sequence_logps(model, batch)
    grads = [torch.autograd.grad(lp, params, retain_graph=True) for lp in logps]
    return [torch.cat([g.flatten() for g in gs]) for gs in grads], logps.detach(), counts


@pytest.mark.parametrize(("kind", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.25), ("hinge", 0.0), ("ipo", 0.0)])
def test_gradient_matches_the_closed_form_on_a_tiny_model(tiny_llama, kind, eps):
    """dL/dθ = L'(h) · (∇log π(chosen) − ∇log π(rejected)), with h the log-ratio gap, per loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import inject
    from lorakit.lora.config import LoraConfig
    from tiny import randomize_lora

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    inject(model, LoraConfig(r=4, alpha=8, targets=("q", "v")))
    randomize_lora(model, std=0.5)
    batch = collate_preference(encode_preference(load_preference_pairs(tok)[:1], tok, 64), tok.pad_token_id)
    loss = PreferenceLoss(kind, 0.7, eps)
    summed, _ = preference_step(loss, model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.cat([g.flatten() for g in torch.autograd.grad(summed, params)])
    grads, logps, counts = _per_sequence_grads(model, batch)
    from lorakit.training.preference import reference_mode

    with torch.no_grad(), reference_mode(model):
        ref, _ = sequence_logps(model, batch)
    h = float((logps[0] - ref[0]) - (logps[1] - ref[1]))
    b = loss.beta
    if kind == "sigmoid":
        sig = 1 / (1 + math.exp(-b * h))
        expected = (-(1 - eps) * b * (1 - sig) + eps * b * sig) * (grads[0] - grads[1])
    elif kind == "hinge":
        expected = (-b if b * h < 1 else 0.0) * (grads[0] - grads[1])
    else:
        nc, nr = float(counts[0]), float(counts[1])
        gap = float((logps[0] - ref[0]) / nc - (logps[1] - ref[1]) / nr)
        expected = 2 * (gap - 1 / (2 * b)) * (grads[0] / nc - grads[1] / nr)
    assert float(expected.norm()) > 1e-4  # a real gradient, not two zeros
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_orpo_is_nll_plus_weighted_odds_ratio_and_matches_trl():
    pc, pr = torch.tensor([-6.0, -20.0]), torch.tensor([-12.0, -9.0])
    nc, nr = torch.tensor([3, 4]), torch.tensor([4, 3])
    per_pair, r_c, r_r = preference_loss(PreferenceLoss("orpo", 0.25), (pc, pr), None, (nc, nr))
    ac, ar = pc / nc, pr / nr
    odds = (ac - ar) - (torch.log(1 - ac.exp()) - torch.log(1 - ar.exp()))
    torch.testing.assert_close(per_pair, -ac - 0.25 * torch.nn.functional.logsigmoid(odds))
    torch.testing.assert_close(r_c, 0.25 * ac)
    trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    from types import SimpleNamespace

    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen, rejected, _, _ = trl_orpo.ORPOTrainer.odds_ratio_loss(fake, ac, ar)
    torch.testing.assert_close(per_pair, -ac - losses)  # TRL returns beta * logsigmoid(log_odds); loss = nll - it
    torch.testing.assert_close((chosen, rejected), (r_c, r_r))


def test_dpo_losses_equal_trl_dpotrainer_on_the_same_batch(tiny_llama, tmp_path):
    """TRL's DPOTrainer (PEFT, policy 'default' against its frozen 'ref' copy) and lorakit (the same weights,
    loaded from PEFT's files as 'default' and 'reference') on the same token ids: the same loss."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from lorakit.io.files import load_adapter
    from tiny import randomize_lora

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    randomize_lora(peft_model, std=0.3, seed=1)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to=[], use_cpu=True, max_length=64)
    one = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(model=peft_model, args=args, processing_class=tok, train_dataset=one)
    peft_model.save_pretrained(tmp_path / "ref", selected_adapters=["ref"])
    randomize_lora(peft_model, std=0.3, seed=2)  # the policy moves away from its reference ('ref' is frozen)
    peft_model.save_pretrained(tmp_path / "policy")
    rows = encode_preference(load_preference_pairs(tok), tok, 64)
    examples = [{"prompt_ids": r["chosen_input_ids"][: n], "chosen_ids": r["chosen_input_ids"][n:],
                 "rejected_ids": r["rejected_input_ids"][n:]}
                for r in rows for n in [sum(1 for t in r["chosen_labels"] if t == -100)]]  # fmt: skip
    trl_batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama)
    load_adapter(ours, tmp_path / "ref" / "ref", "reference", activate=False)
    load_adapter(ours, tmp_path / "policy")
    batch = collate_preference(rows, tok.pad_token_id)
    for kind, beta in (("sigmoid", 0.1), ("hinge", 0.5), ("ipo", 0.3)):
        trainer.loss_types, trainer.beta = [kind], beta
        theirs = float(trainer._compute_loss(peft_model, trl_batch, return_outputs=False))
        summed, _ = preference_step(PreferenceLoss(kind, beta), ours, batch)
        assert float(summed) / len(rows) == pytest.approx(theirs, rel=1e-5), kind
        assert abs(theirs - {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / 0.6) ** 2}[kind]) > 1e-3


# -- runs --------------------------------------------------------------------------------------------------
def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pref"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", PAIRS)
    _jsonl(folder / "valid.jsonl", [{"prompt": "Colour 99?", "chosen": " red", "rejected": " blue"}] * 4)
    return folder


def test_dpo_run_logs_rewards_per_step_and_on_valid_and_learns(tiny_llama, tmp_path, one_thread):
    from lorakit.training.trainer import train

    out = tmp_path / "run"
    cfg = base_cfg(model=str(tiny_llama), task="dpo", data=str(_folder(tmp_path)), out=str(out), max_length=32,
                   max_steps=6, batch_size=4, lr=5e-2, eval_interval=3, warmup_steps=0)  # fmt: skip
    result = train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if r["split"] == "train"]
    keys = {"loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"}
    assert keys <= set(train_lines[0]) and keys <= set(next(r for r in records if r["split"] == "valid"))
    assert train_lines[0]["loss"] == pytest.approx(math.log(2), rel=1e-7)
    assert result["reward_accuracy"] == 1.0 and result["loss"] < math.log(2) - 0.05  # the same pair, unseen prompt
    assert (out / "adapter_model.safetensors").is_file()


def test_orpo_run_needs_no_reference_pass(tiny_llama, tmp_path, one_thread, monkeypatch):
    import lorakit.training.preference as pref
    from lorakit.training.trainer import train

    def no_reference(model):
        raise AssertionError("ORPO ran a reference pass")

    monkeypatch.setattr(pref, "reference_mode", no_reference)
    cfg = base_cfg(model=str(tiny_llama), task="orpo", data=str(_folder(tmp_path)), out=str(tmp_path / "run"),
                   max_length=32, max_steps=4, batch_size=4, lr=5e-2, warmup_steps=0)  # fmt: skip
    result = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in lines if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0] and result["reward_accuracy"] == 1.0


def test_init_adapter_continues_it_and_it_is_the_reference(tiny_llama, tmp_path, one_thread, capsys):
    """Started from a trained adapter, step 1's loss is ln 2 (the reference is that adapter, not the base), the
    saved adapter is the continued one, of the same rank, and ``lorakit eval`` scores against that reference."""
    from transformers import AutoModelForCausalLM

    from lorakit import inject
    from lorakit.io.files import read_adapter, save_adapter
    from lorakit.lora.config import LoraConfig
    from lorakit.training.trainer import train
    from tiny import randomize_lora

    sft = AutoModelForCausalLM.from_pretrained(tiny_llama)
    inject(sft, LoraConfig(r=2, alpha=4, targets=("q", "v", "o")))
    randomize_lora(sft, std=0.5)
    save_adapter(sft, tmp_path / "sft")
    out = tmp_path / "run"
    cfg = base_cfg(model=str(tiny_llama), task="dpo", data=str(_folder(tmp_path)), out=str(out), max_length=32,
                   max_steps=3, batch_size=4, lr=5e-2, warmup_steps=0, init_adapter=str(tmp_path / "sft"))  # fmt: skip
    result = train(cfg)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-7)
    start, end = read_adapter(tmp_path / "sft"), read_adapter(out)
    assert end.config.r == 2 and set(end.pairs) == set(start.pairs)
    assert any(not torch.equal(end.pairs[k][s][1], start.pairs[k][s][1]) for k in start.pairs for s in start.pairs[k])
    from lorakit.cli.evaluate import eval_main

    capsys.readouterr()
    assert eval_main(["--model", str(tiny_llama), "--adapter", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(result, rel=1e-5)


@pytest.mark.parametrize(("fraction", "carved"), [(0.0, 0), (0.25, 4)])
def test_preference_carves_the_valid_split_that_valid_split_asks_for(tmp_path, fraction, carved):
    import warnings

    from lorakit.tasks import load_task

    (tmp_path / "d").mkdir()
    _jsonl(tmp_path / "d" / "train.jsonl", PAIRS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_task(base_cfg(task="dpo", data=str(tmp_path / "d"), valid_split=fraction))
    assert (len(data.train), len(data.valid)) == (16 - carved, carved)


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_preference_pairs_read_from_parquet_and_json_arrays_like_jsonl(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [*PAIRS[:3], {"prompt": [{"role": "user", "content": "Hi"}],
                         "chosen": [{"role": "assistant", "content": "Hello"}],
                         "rejected": [{"role": "assistant", "content": "Go away"}]}]  # fmt: skip
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows[:3]), path)  # one schema per file: text pairs
        rows = rows[:3]
    else:
        path.write_text(json.dumps(rows))
    from_jsonl = load_preference(_jsonl(tmp_path / "pairs.jsonl", rows))
    got = load_preference(path)
    assert [(r.prompt, r.chosen, r.rejected) for r in got] == [(r.prompt, r.chosen, r.rejected) for r in from_jsonl]
    bad = tmp_path / f"bad{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "a"}]), bad)
    else:
        bad.write_text(json.dumps([{"prompt": "p", "chosen": "a"}]))
    with pytest.raises(DataError, match=str(bad)):
        load_preference(bad)
