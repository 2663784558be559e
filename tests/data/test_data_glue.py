"""GLUE loader: real GLUE files (counts from shared/data/PROVENANCE.md), tiny fixtures for the tasks
not shipped (STS-B, QQP, MNLI), and one test per malformed-input error."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lorakit.data import GLUE_TASKS, DataError, Example, get_glue_task, load_glue

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "glue"


@pytest.fixture(scope="module")
def glue_root() -> Path:
    root = SHARED_DATA / "glue"
    if not root.is_dir():
        pytest.skip(f"GLUE data not found at {root} (expected a 'shared' folder next to the repo)")
    return root


# (task, split, rows, label counts by label *name*) as stated in PROVENANCE.md.
REAL = [
    ("sst2", "dev", 872, {"0": 428, "1": 444}),
    ("sst2", "train", 67349, {"0": 29780, "1": 37569}),
    ("mrpc", "dev", 408, {"0": 129, "1": 279}),
    ("mrpc", "train", 3668, {"0": 1194, "1": 2474}),
    ("cola", "dev", 1043, {"0": 322, "1": 721}),
    ("cola", "train", 8551, {"0": 2528, "1": 6023}),
    ("rte", "dev", 277, {"entailment": 146, "not_entailment": 131}),
    ("rte", "train", 2490, {"entailment": 1249, "not_entailment": 1241}),
    ("qnli", "dev", 5463, {"entailment": 2702, "not_entailment": 2761}),
]


@pytest.mark.parametrize(("task", "split", "rows", "counts"), REAL, ids=[f"{t}-{s}" for t, s, *_ in REAL])
def test_real_glue_counts(glue_root, task, split, rows, counts):
    examples = load_glue(task, glue_root, split)
    spec = get_glue_task(task)
    assert len(examples) == rows
    got = Counter(spec.labels[ex.label] for ex in examples)
    assert dict(got) == counts
    has_pair = spec.text_pair_col is not None
    assert all((ex.text_pair is not None) == has_pair for ex in examples)
    assert all(isinstance(ex.text, str) and ex.text.strip() for ex in examples)


def test_mrpc_bom_and_literal_quotes(glue_root):
    # First dev row (see `head glue/MRPC/dev.tsv`): its second sentence opens a quote it never closes.
    # A quoting csv reader would swallow following lines; QUOTE_NONE keeps the quote as text.
    first = load_glue("MRPC", glue_root, "dev")[0]
    assert first.text.startswith("He said the foodservice pie business doesn't fit")
    assert first.text_pair.startswith('"The foodservice pie business does not fit our')
    assert first.label == 1


def test_cola_has_no_header_row(glue_root):
    first = load_glue("cola", glue_root, "dev")[0]
    assert first == Example("The sailors rode the breeze clear of the rocks.", None, 1)


def test_rte_string_labels_map_to_indices(glue_root):
    first = load_glue("rte", glue_root, "dev")[0]
    assert first.text.startswith("Dana Reeve, the widow of the actor Christopher Reeve")
    assert first.text_pair == "Christopher Reeve had an accident."
    assert GLUE_TASKS["rte"].labels[first.label] == "not_entailment"


def test_task_folder_may_be_given_directly(glue_root):
    assert load_glue("sst2", glue_root / "SST-2", "dev") == load_glue("sst2", glue_root, "dev")


def test_stsb_fixture_is_regression():
    spec = get_glue_task("STS-B")
    assert spec.is_regression and spec.num_labels == 1 and spec.metrics == ("pearson", "spearman")
    ex = load_glue("stsb", FIXTURES, "dev")
    assert [e.label for e in ex] == [4.75, 0.4, 3.0, 0.0, 5.0]
    assert all(isinstance(e.label, float) for e in ex)
    assert ex[0].text == "A man is playing a guitar." and ex[0].text_pair == "A man plays the guitar."
    assert ex[1].text_pair == 'Markets rose after the "good" news.'


def test_qqp_fixture():
    ex = load_glue("qqp", FIXTURES, "dev")
    assert [e.label for e in ex] == [1, 0, 1]
    assert ex[2].text == 'What does "LoRA" stand for?'
    assert get_glue_task("qqp").metrics == ("accuracy", "f1")


def test_mnli_splits_and_headers():
    spec = get_glue_task("mnli")
    assert spec.labels == ("contradiction", "entailment", "neutral") and spec.num_labels == 3
    matched = load_glue("mnli", FIXTURES, "dev_matched")
    assert [spec.labels[e.label] for e in matched] == ["entailment", "contradiction", "neutral"]
    assert matched[0] == Example("The cat sat on the mat.", "A cat is sitting.", 1)
    mism = load_glue("mnli", FIXTURES, "dev_mismatched")
    assert [spec.labels[e.label] for e in mism] == ["contradiction", "entailment"]
    # train has 12 columns, dev 16: both are accepted because the header decides the width.
    train = load_glue("mnli", FIXTURES, "train")
    assert [spec.labels[e.label] for e in train] == ["neutral", "entailment"]
    with pytest.raises(DataError, match=r"dev_matched.*dev_mismatched"):
        load_glue("mnli", FIXTURES, "dev")


def test_task_table_covers_glue():
    assert set(GLUE_TASKS) == {"sst2", "mrpc", "cola", "rte", "stsb", "qnli", "qqp", "mnli"}
    assert get_glue_task("SST-2") is get_glue_task("sst_2") is GLUE_TASKS["sst2"]
    assert get_glue_task("cola").metrics == ("matthews_corr",)
    assert all(GLUE_TASKS[t].num_labels == 2 for t in ("sst2", "mrpc", "cola", "rte", "qnli", "qqp"))


# ----------------------------------------------------------------------------- errors


def _write(root: Path, task_dir: str, split: str, text: str | bytes) -> Path:
    path = root / task_dir / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_unknown_task_lists_known(tmp_path):
    with pytest.raises(DataError, match=r"unknown GLUE task 'wnli'.*sst2.*mnli"):
        load_glue("wnli", tmp_path, "dev")


def test_unknown_split(tmp_path):
    with pytest.raises(DataError, match=r"sst2 has no labelled split 'test'"):
        load_glue("sst2", tmp_path, "test")


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match=r"SST-2/dev\.tsv") as err:
        load_glue("sst2", tmp_path, "dev")
    assert isinstance(err.value, ValueError)


def test_wrong_header(tmp_path):
    path = _write(tmp_path, "SST-2", "dev", "text\tlabel\ngood movie\t1\n")
    with pytest.raises(DataError, match=r"line 1: unexpected header for sst2") as err:
        load_glue("sst2", tmp_path, "dev")
    assert str(path) in str(err.value)


def test_wrong_field_count_names_line(tmp_path):
    _write(tmp_path, "SST-2", "dev", "sentence\tlabel\ngood movie\t1\nbad\tmovie\t0\n")
    with pytest.raises(DataError, match=r"dev\.tsv, line 3: expected 2 tab-separated fields, got 3"):
        load_glue("sst2", tmp_path, "dev")


def test_label_outside_set_names_line_value_and_set(tmp_path):
    header = "index\tsentence1\tsentence2\tlabel\n"
    _write(tmp_path, "RTE", "dev", header + "0\ta\tb\tentailment\n1\tc\td\tcontradiction\n")
    allowed = r"\['entailment', 'not_entailment'\]"
    with pytest.raises(DataError, match=r"line 3: label 'contradiction' not in the label set " + allowed):
        load_glue("rte", tmp_path, "dev")


def test_cola_wrong_field_count(tmp_path):
    _write(tmp_path, "CoLA", "dev", "gj04\t1\t\tFine sentence.\ngj04\t0\tNo mark field here.\n")
    with pytest.raises(DataError, match=r"line 2: expected 4 tab-separated fields, got 3"):
        load_glue("cola", tmp_path, "dev")


def test_empty_split(tmp_path):
    _write(tmp_path, "SST-2", "dev", "sentence\tlabel\n")
    with pytest.raises(DataError, match=r"dev split is empty"):
        load_glue("sst2", tmp_path, "dev")
    _write(tmp_path, "SST-2", "train", "")
    with pytest.raises(DataError, match=r"file is empty"):
        load_glue("sst2", tmp_path, "train")


def test_stsb_score_out_of_range_and_non_numeric(tmp_path):
    header = (FIXTURES / "STS-B" / "dev.tsv").read_text().splitlines()[0]
    row = "0\tg\tf\t2015\t1\tnone\tnone\ta\tb\t{}\n"
    _write(tmp_path, "STS-B", "dev", header + "\n" + row.format("5.5"))
    with pytest.raises(DataError, match=r"line 2: score '5.5' outside the allowed range \[0.0, 5.0\]"):
        load_glue("stsb", tmp_path, "dev")
    _write(tmp_path, "STS-B", "dev", header + "\n" + row.format("high"))
    with pytest.raises(DataError, match=r"line 2: score 'high' is not a number"):
        load_glue("stsb", tmp_path, "dev")


def test_mnli_header_checked_by_position(tmp_path):
    good = (FIXTURES / "MNLI" / "train.tsv").read_text().splitlines()
    bad_header = good[0].replace("gold_label", "label")
    _write(tmp_path, "MNLI", "train", "\n".join([bad_header, *good[1:]]) + "\n")
    with pytest.raises(DataError, match=r"column -1 is 'label', expected 'gold_label'"):
        load_glue("mnli", tmp_path, "train")


def test_invalid_utf8(tmp_path):
    _write(tmp_path, "SST-2", "dev", b"sentence\tlabel\ncaf\xe9 latte\t1\n")
    with pytest.raises(DataError, match=r"not valid UTF-8"):
        load_glue("sst2", tmp_path, "dev")
