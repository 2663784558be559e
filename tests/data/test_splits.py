"""One rule for held-out splits in every task (lorakit.data.splits): the validation split comes from a
valid/dev file, else it is carved from train (stratified for classification, seeded, announced); the file
scored at the end never feeds training or validation; too little data trains without validation."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest

from lorakit.data import DataError
from lorakit.data.splits import MIN_TO_CARVE, carve_valid, partition
from lorakit.data.truncation import measure_truncation
from lorakit.tasks import load_task
from train_util import base_cfg, stsb_folder


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows), encoding="utf-8")
    return path


def _labelled(prefix: str, n: int) -> list[tuple[str, str]]:
    return [(f"{prefix} statement {i}", "yes" if i % 4 == 0 else "no") for i in range(n)]


# -- the helper ----------------------------------------------------------------------------------------------
def test_partition_is_seeded_stratified_and_disjoint_by_key():
    records = [(f"k{i % 50}", i % 5 == 0) for i in range(200)]  # 50 keys x 4, a 1:4 class balance
    parts = partition(records, {"valid": 0.2, "train": 0.8}, seed=3, key=lambda r: r[0], stratify=lambda r: r[1])
    assert not {r[0] for r in parts["valid"]} & {r[0] for r in parts["train"]}
    assert Counter(r[1] for r in parts["valid"]) == {False: 32, True: 8}  # 20 % of each class
    assert parts == partition(records, {"valid": 0.2, "train": 0.8}, seed=3, key=lambda r: r[0],
                              stratify=lambda r: r[1])  # fmt: skip
    assert parts != partition(records, {"valid": 0.2, "train": 0.8}, seed=4, key=lambda r: r[0])


def test_carve_valid_says_what_it_did_and_refuses_too_little():
    carved = carve_valid(list(range(40)), 0.1, 0, task="text", source="train.csv")
    assert len(carved.valid) == 4 and sorted(carved.train + carved.valid) == list(range(40))
    assert carved.note == ("text: no valid file; carved 4 of 40 records of train.csv (split_seed 0) as the "
                           "validation split")
    small = carve_valid(list(range(MIN_TO_CARVE - 1)), 0.1, 0, task="text", source="t.csv")
    assert small.valid == [] and len(small.train) == MIN_TO_CARVE - 1 and "training without validation" in small.note
    off = carve_valid(list(range(40)), 0.0, 0, task="text", source="t.csv")
    assert off.valid == [] and "--valid-split 0" in off.note


def test_truncation_line_counts_and_suggests_a_length():
    cut = measure_truncation("text", "train", [10] * 310 + [200] * 100 + [684] * 4, 128)
    assert (cut.cut, cut.examples, cut.longest) == (104, 414, 684)
    assert cut.line() == ("text: 104 of 414 training examples (25 %) are cut at --max-length 128; the longest "
                          "has 684 tokens; --max-length 200 would keep 95 % of them whole")
    assert "would keep" not in measure_truncation("text", "eval", [10] * 99 + [300], 128).line()


# -- text ----------------------------------------------------------------------------------------------------
def test_text_one_file_carves_a_stratified_validation_split_and_scores_it(tmp_path):
    train = _csv(tmp_path / "train.csv", _labelled("train", 80))
    data = load_task(base_cfg(task="text", train_file=str(train)))
    assert (len(data.train), len(data.valid)) == (72, 8) and data.eval is data.valid
    assert Counter(ex.label for ex in data.valid) == {0: 6, 1: 2}  # "no" 60, "yes" 20: 10 % of each
    assert "carved 8 of 80 records" in data.notes[0] and "stratified by label" in data.notes[0]
    assert data.scored_on == f"the validation split carved from {train} (no test file)"
    none = load_task(base_cfg(task="text", train_file=str(train), valid_split=0.0))
    assert none.valid == [] and none.eval == [] and len(none.train) == 80 and "--valid-split 0" in none.notes[0]


def test_text_test_file_is_never_the_validation_split(tmp_path):
    _csv(tmp_path / "train.csv", _labelled("train", 40))
    _csv(tmp_path / "test.csv", _labelled("test", 12))
    data = load_task(base_cfg(task="text", data=str(tmp_path)))
    seen = {ex.text for ex in data.train + data.valid}
    assert len(data.valid) == 4 and not any(t.startswith("test") for t in seen)
    assert {ex.text for ex in data.eval} == {t for t, _ in _labelled("test", 12)} and data.scored_on == ""
    _csv(tmp_path / "dev.csv", _labelled("dev", 6))
    data = load_task(base_cfg(task="text", data=str(tmp_path)))
    assert {ex.text for ex in data.valid} == {t for t, _ in _labelled("dev", 6)} and len(data.train) == 40
    assert all(ex.text.startswith("test") for ex in data.eval)


def test_text_eval_error_never_names_none(tmp_path):
    train = _csv(tmp_path / "train.csv", _labelled("train", 20))
    with pytest.raises(DataError) as err:
        load_task(base_cfg(task="text", train_file=str(train)), roles=("eval",))
    assert "None" not in str(err.value) and str(train) in str(err.value)


# -- GLUE, sft, E2E, WebNLG/DART -----------------------------------------------------------------------------
def test_glue_without_dev_carves_and_labels_the_scored_split(tmp_path):
    folder = stsb_folder(tmp_path, splits=(("train", 40),))
    data = load_task(base_cfg(task="stsb", data=str(folder)))
    assert (len(data.train), len(data.eval)) == (36, 4) and data.valid is data.eval
    assert not {e.text for e in data.train} & {e.text for e in data.eval}
    assert "carved 4 of 40" in data.notes[0] and data.scored_on.startswith("the validation split")


def test_sft_carves_from_train_never_from_test_and_small_trains_without(tmp_path):
    def jsonl(path: Path, prefix: str, n: int) -> Path:
        path.write_text("".join(json.dumps({"prompt": f"{prefix} {i}?", "completion": " ok"}) + "\n" for i in range(n)))
        return path

    jsonl(tmp_path / "train.jsonl", "train", 30)
    jsonl(tmp_path / "test.jsonl", "test", 5)
    with pytest.warns(UserWarning, match=r"carved 3 of 30 records"):
        data = load_task(base_cfg(task="sft", data=str(tmp_path)))
    assert all(r.prompt.startswith("train") for r in data.train + data.valid)
    assert all(r.prompt.startswith("test") for r in data.eval) and len(data.valid) == 3
    small = tmp_path / "small"
    small.mkdir()
    jsonl(small / "train.jsonl", "train", 4)
    with pytest.warns(UserWarning, match=r"training without validation"):
        data = load_task(base_cfg(task="sft", data=str(small)))
    assert (len(data.train), data.valid, data.eval) == (4, [], [])


def test_e2e_valid_is_carved_from_train_not_test(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"name[T{i}]||train text {i}\n" for i in range(30)))
    (tmp_path / "test.txt").write_text("".join(f"name[X{i}]||test text {i}\n" for i in range(5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_task(base_cfg(task="e2e", data=str(tmp_path)))
    assert all(it.mr.startswith("name[T") for it in data.train + data.valid) and data.valid
    assert all(it.mr.startswith("name[X") for it in data.eval)


def test_webnlg_valid_is_carved_from_train_not_test(tmp_path):
    def entries(prefix: str, n: int) -> dict:
        return {"entries": [{str(i + 1): {"category": "City", "modifiedtripleset": [
            {"subject": f"{prefix}{i}", "property": "p", "object": "o"}],
            "lexicalisations": [{"lex": f"{prefix} {i} text", "comment": "good"}]}} for i in range(n)]}

    (tmp_path / "train.json").write_text(json.dumps(entries("Train", 30)))
    (tmp_path / "test.json").write_text(json.dumps(entries("Test", 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_task(base_cfg(task="webnlg", data=str(tmp_path)))
    assert all(it.mr.startswith("Train") for it in data.train + data.valid) and data.valid
    assert all(it.mr.startswith("Test") for it in data.eval)
