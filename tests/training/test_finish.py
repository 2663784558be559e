"""Short real runs on tiny models, end to end: each task kind learns, is scored and writes every output."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lorakit.data import DataError
from lorakit.tasks import TaskSpec, load_task
from lorakit.training import checkpoint as ckpt
from lorakit.training.config import TrainConfig
from lorakit.training.evaluate import encode, generate_e2e
from lorakit.training.trainer import train
from train_util import base_cfg, stsb_folder, write_sentiment_csv

# -- short real runs -------------------------------------------------------------------------------------


def test_text_classification_run_learns_and_writes_every_output(tiny_bert, tmp_path, one_thread):
    data = write_sentiment_csv(tmp_path / "data")
    (data / "dev.csv").write_text((data / "test.csv").read_text())  # a valid file: all of train is trained on
    out = tmp_path / "out"
    cfg = base_cfg(
        model=str(tiny_bert), task="text", data=str(data), out=str(out), method="full", lr=3e-3,
        max_steps=None, epochs=4, warmup_ratio=0.0, plot=True, save_interval=3,
    )  # fmt: skip
    result = train(cfg)
    assert set(result) == {"accuracy", "macro_f1"} and result["accuracy"] > 0.9
    for name in ("method_model.safetensors", "method_config.json", "train_config.json", "metrics.jsonl",
                 "eval_results.json", "training.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert json.loads((out / "train_config.json").read_text())["label_names"] == ["neg", "pos"]
    assert json.loads((out / "eval_results.json").read_text()) == result
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 24 and losses[-1] < 0.8 * losses[0]
    assert [r["step"] for r in records if r["split"] == "valid"] == [6, 12, 18, 24]  # each epoch end
    assert {"lr", "tokens_per_s", "epoch"} <= set(records[0])
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [18, 21]  # keep_checkpoints=2
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_stsb_regression_fixture(tiny_bert, tmp_path, one_thread):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    folder = tmp_path / "STS-B"
    folder.mkdir()
    for split, n in (("train", 16), ("dev", 8)):
        rows = [header] + [
            "\t".join(
                [
                    str(i),
                    "main-news",
                    "f",
                    "2012",
                    str(i),
                    "none",
                    "none",
                    f"a man plays {i}",
                    f"a man is playing {i}",
                    f"{i * 0.7 % 5:.3f}",
                ]
            )
            for i in range(n)
        ]
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    data = load_task(base_cfg(task="stsb", data=str(folder)))
    assert data.spec.kind == "regression" and data.spec.num_labels == 1
    assert data.train[3].label == pytest.approx(2.1)
    result = train(base_cfg(model=str(tiny_bert), task="stsb", data=str(folder), out=str(tmp_path / "out")))
    assert set(result) == {"pearson", "spearman"}
    assert all(-1.0 <= v <= 1.0 for v in result.values() if not math.isnan(v))


def test_stsb_targets_are_scaled_to_unit_range_and_predictions_back(tiny_bert, tmp_path):
    """The STS-B collapse: raw 0-5 targets drove MiniLM's tanh pooler into saturation (Pearson 0.09).
    Training sees scores in [0, 1]; predictions come back in 0-5."""
    from transformers import AutoTokenizer

    from lorakit.io.models import load_model
    from lorakit.training.evaluate import predict_classification

    data = load_task(base_cfg(task="stsb", data=str(stsb_folder(tmp_path))))
    assert data.spec.target_range == (0.0, 5.0)
    rows = encode(data.spec, data.train, AutoTokenizer.from_pretrained(tiny_bert), 32)
    labels = [r["labels"] for r in rows]
    assert labels == pytest.approx([ex.label / 5.0 for ex in data.train]) and max(labels) <= 1.0
    assert max(labels) > 0.5  # the fixture has scores above 2.5
    model, tok = load_model(str(tiny_bert), "seq-cls", num_labels=1)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(0.5)  # the middle of the training scale …
    cfg = base_cfg(task="stsb", data="x")
    preds = predict_classification(model, tok, data.spec, data.eval, cfg, torch.device("cpu"))
    assert preds == pytest.approx([2.5] * len(data.eval))  # … is the middle of STS-B's 0-5


def test_glue_folder_without_dev_file_scores_a_carved_disjoint_split(tmp_path):
    folder = stsb_folder(tmp_path, splits=(("train", 40),))
    data = load_task(base_cfg(task="stsb", data=str(folder)))
    assert (len(data.train), len(data.eval)) == (36, 4) and data.valid is data.eval
    train_texts = {ex.text for ex in data.train}
    assert not train_texts & {ex.text for ex in data.eval} and len(train_texts | {e.text for e in data.eval}) == 40
    assert "carved 4 of 40 records of train.tsv" in data.notes[0] and "no dev file" in data.notes[0]
    again = load_task(base_cfg(task="stsb", data=str(folder)))
    assert [e.text for e in again.eval] == [e.text for e in data.eval]  # deterministic: eval rescores the same
    other = load_task(base_cfg(task="stsb", data=str(folder), split_seed=5))
    assert [e.text for e in other.eval] != [e.text for e in data.eval]
    with pytest.raises(DataError, match="not found"):  # a split asked for by name must exist
        load_task(base_cfg(task="stsb", data=str(folder), eval_split="dev"))


def test_balanced_class_weights_closed_form_and_cola_default(tmp_path):
    from lorakit.data import Example
    from lorakit.training.evaluate import balanced_class_weights, set_class_weights

    assert balanced_class_weights([1, 1, 1, 0], 2) == pytest.approx([2.0, 2 / 3])  # 4/(2*1), 4/(2*3)
    with pytest.raises(DataError, match="label"):
        balanced_class_weights([1, 1], 2)
    train = [Example("a", None, 1)] * 7 + [Example("b", None, 0)] * 3
    cola = TaskSpec("cola", "classification", "seq-cls", 2, ["0", "1"], metrics=("matthews_corr",))
    set_class_weights(cola, train, "auto")  # MCC scores the majority class at 0: balance it
    assert cola.class_weights == pytest.approx([10 / 6, 10 / 14])
    sst2 = TaskSpec("sst2", "classification", "seq-cls", 2, ["0", "1"], metrics=("accuracy",))
    set_class_weights(sst2, train, "auto")
    assert sst2.class_weights is None
    set_class_weights(sst2, train, "balanced")
    assert sst2.class_weights == pytest.approx([10 / 6, 10 / 14])


def test_weighted_loss_sum_equals_closed_form():
    from lorakit.training.evaluate import loss_sum

    class Fixed(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])})()

    spec = TaskSpec("cola", "classification", "seq-cls", 2, ["0", "1"], class_weights=[3.0, 0.5])
    batch = {"input_ids": torch.zeros(3, 1, dtype=torch.long), "labels": torch.tensor([0, 1, 1])}
    logp = torch.log_softmax(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), -1)
    expected = -(3.0 * logp[0, 0] + 0.5 * logp[1, 1] + 0.5 * logp[2, 1])
    assert float(loss_sum(spec, Fixed(), batch)) == pytest.approx(float(expected))


@pytest.mark.slow
def test_cola_beats_the_majority_class_on_minilm(shared_data, tmp_path):
    """CoLA at lorakit's defaults: MCC 0.0 (every sentence "acceptable") before the recipe fix."""
    cfg = TrainConfig(
        model="minilm-l6", task="cola", data=str(shared_data / "glue" / "CoLA"), max_train_samples=2000,
        epochs=2, batch_size=32, out=str(tmp_path / "run"), plot=False, seed=1,
    )  # fmt: skip
    assert train(cfg)["matthews_corr"] > 0.0  # measured 0.020 / 0.037 / 0.078 over seeds 1-3; PEFT 0.0


@pytest.mark.slow
def test_stsb_learns_on_minilm(shared_data, tmp_path):
    """The issue's command at a smaller budget: lorakit's defaults must give a real correlation."""
    cfg = TrainConfig(
        model="minilm-l6", task="stsb", data=str(shared_data / "glue" / "STS-B"), max_train_samples=1000,
        epochs=2, batch_size=32, out=str(tmp_path / "run"), plot=False, seed=1,
    )  # fmt: skip
    assert train(cfg)["pearson"] > 0.6


def test_e2e_loss_covers_reference_tokens_only(tiny_llama):
    from transformers import AutoTokenizer

    from lorakit.data import E2EItem

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    spec = TaskSpec("e2e", "generation", "causal-lm")
    (row,) = encode(spec, [E2EItem("name : Aromi | area : city centre", ["Aromi is central ."])], tok, 64)
    target = tok(" Aromi is central .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labelled = [t for t in row["labels"] if t != -100]
    assert labelled == target and row["n_targets"] == len(target)
    assert row["input_ids"][-len(target) :] == target


def test_left_padded_beam_search_matches_one_prompt_at_a_time(tiny_llama, one_thread):
    from lorakit.data import E2EItem
    from lorakit.io.models import load_model

    model, tok = load_model(tiny_llama)
    items = [
        E2EItem("name : A", ["x"]),
        E2EItem("name : The Golden Palace | food : Italian | area : riverside", ["y"]),
    ]
    cfg = base_cfg(task="e2e", data="d", num_beams=3, max_new_tokens=6, no_repeat_ngram_size=0)
    together = generate_e2e(model, tok, items, cfg, torch.device("cpu"))
    alone = [generate_e2e(model, tok, [it], cfg, torch.device("cpu"))[0] for it in items]
    assert together == alone and all(together)


def test_e2e_run_scores_one_hypothesis_per_mr_against_all_references(
    tiny_llama, tmp_path, one_thread, shared_data, monkeypatch
):
    import lorakit.metrics.nlg

    seen = {}

    def fake_nlg_metrics(hypotheses, references):
        # METEOR starts a JVM (seconds); the real metrics are tested with the metrics and by the slow test.
        seen.update(hypotheses=list(hypotheses), references=[list(r) for r in references])
        return {"BLEU": 0.5, "NIST": 1.0, "METEOR": 0.25, "ROUGE_L": 0.5, "CIDEr": 0.1}

    monkeypatch.setattr(lorakit.metrics.nlg, "nlg_metrics", fake_nlg_metrics)
    out = tmp_path / "out"
    cfg = base_cfg(
        model=str(tiny_llama), task="e2e", data=str(shared_data / "e2e"), out=str(out), max_train_samples=16,
        max_eval_samples=3, num_beams=2, max_new_tokens=8, max_length=64, max_steps=2,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="not the official E2E splits"):
        result = train(cfg)
    assert result["METEOR"] == 0.25
    predictions = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] or "<empty>" for p in predictions] == seen["hypotheses"]
    assert [p["references"] for p in predictions] == seen["references"]
    assert len(seen["references"]) == 3 and max(len(r) for r in seen["references"]) > 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "perplexity"} <= set(next(r for r in records if r["split"] == "valid"))
    weights = load_file(out / "adapter_model.safetensors")
    assert any("q_proj.lora_B" in k for k in weights) and any("v_proj.lora_B" in k for k in weights)


@pytest.mark.slow
def test_e2e_run_and_eval_cli_json_with_real_metrics(tiny_llama, tmp_path, one_thread, capfd, shared_data):
    from lorakit.cli.evaluate import eval_main

    out = tmp_path / "out"
    cfg = base_cfg(
        model=str(tiny_llama), task="e2e", data=str(shared_data / "e2e"), out=str(out), max_train_samples=16,
        max_eval_samples=3, num_beams=2, max_new_tokens=8, max_length=64, max_steps=2,
    )  # fmt: skip
    result = train(cfg)
    assert list(result) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    capfd.readouterr()
    assert eval_main(["--model", str(tiny_llama), "--adapter", str(out), "--json"]) == 0
    stdout = capfd.readouterr().out
    assert stdout.count("\n") == 1  # exactly one JSON object, nothing else
    assert json.loads(stdout) == pytest.approx(result)




def test_classification_scoring_batches_by_length_and_returns_predictions_in_input_order(monkeypatch):
    """predict_classification sorts rows by length to pad less; each prediction must still land on its own
    example (a fake model predicts class = row length % 2, so a misplaced row shows)."""
    from lorakit.training import evaluate

    lengths = [7, 2, 9, 4, 4, 11, 1, 6, 3, 8]
    rows = [{"input_ids": list(range(1, n + 1)), "attention_mask": [1] * n, "labels": 0} for n in lengths]
    monkeypatch.setattr(evaluate, "encode", lambda spec, examples, tokenizer, max_length: rows)
    batches = []

    class LengthParity(torch.nn.Module):
        def forward(self, input_ids, attention_mask, **_):
            batches.append(input_ids.shape[1])
            n = attention_mask.sum(-1)
            return type("Out", (), {"logits": torch.stack([(n % 2 == 0).float(), (n % 2 == 1).float()], -1)})

    spec = TaskSpec(name="text", kind="classification", model_task="seq-cls", num_labels=2)
    cfg = TrainConfig(model="tiny", task="text", data="unused", eval_batch_size=4)
    tokenizer = type("Tok", (), {"pad_token_id": 0})()
    preds = evaluate.predict_classification(LengthParity(), tokenizer, spec, [None] * len(rows), cfg,
                                            torch.device("cpu"))  # fmt: skip
    assert preds == [n % 2 for n in lengths]
    assert batches == [4, 8, 11]  # the longest row of each sorted batch (in input order: 9, 11, 8)
