"""WebNLG / DART: linearisation as the LoRA paper's converters do it, strict loading, input-disjoint
splits of the dev files, BLEU/TER/METEOR on hand-checked cases, and a short run of each task."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest

from lorakit.data import DataError
from lorakit.data.webnlg import D2TItem, d2t_splits, linearise, load_dart, load_webnlg
from lorakit.metrics.d2t import d2t_metrics, ter
from lorakit.metrics.nlg import bleu, java_available
from train_util import base_cfg


def _webnlg(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"entries": [{str(i + 1): e} for i, e in enumerate(entries)]}))
    return path


def _entry(category: str, triples: list[tuple[str, str, str]], lexes: list[tuple[str, str]]) -> dict:
    return {
        "category": category,
        "modifiedtripleset": [{"subject": s, "property": p, "object": o} for s, p, o in triples],
        "lexicalisations": [{"lex": text, "comment": comment} for text, comment in lexes],
    }


def test_linearisation_is_the_papers():
    triples = [("Aarhus", "leaderName", "Jacob_Bundsgaard"), ("Aarhus", "country", "Denmark")]
    assert linearise(triples) == "Aarhus : leaderName : Jacob_Bundsgaard | Aarhus : country : Denmark"
    assert linearise([("Mars Hill College", "JOINED", "1973")], lowercase_relation=True) == (
        "Mars Hill College : joined : 1973"
    )


def test_webnlg_keeps_good_lexicalisations_categories_and_merges_equal_inputs(tmp_path):
    path = _webnlg(tmp_path / "dev.json", [
        _entry("Airport", [("A", "city", "B")], [("A is in B.", "good"), ("A B", "toFix")]),
        _entry("Politician", [("X", "party", "Y")], [("X is in Y.", "good")]),
        _entry("Food", [("F", "dish", "G")], [("bad", "toFix")]),  # no good text: dropped
        _entry("Airport", [("A", "city", "B")], [("B has A.", "good")]),  # same input: merged
    ])  # fmt: skip
    items = load_webnlg(path)
    assert items == [
        D2TItem("A : city : B", ["A is in B.", "B has A."], category="Airport", seen=True),
        D2TItem("X : party : Y", ["X is in Y."], category="Politician", seen=False),
    ]


def test_dart_lowercases_relations_and_errors_name_the_entry(tmp_path):
    path = tmp_path / "dart.json"
    path.write_text(json.dumps([
        {"tripleset": [["S", "LOCATION", "T"], ["S", "Founded", "1900"]], "annotations": [{"text": "S, in T."}]},
    ]))  # fmt: skip
    assert load_dart(path) == [D2TItem("S : location : T | S : founded : 1900", ["S, in T."])]
    path.write_text(json.dumps([{"tripleset": [["S", "", "T"]], "annotations": [{"text": "x"}]}]))
    with pytest.raises(DataError, match=r"dart\.json, tripleset 0: a triple must have a non-empty"):
        load_dart(path)
    _webnlg(tmp_path / "w.json", [{"category": "City", "lexicalisations": []}])
    with pytest.raises(DataError, match=r"w\.json, entry 1: missing 'modifiedtripleset'"):
        load_webnlg(tmp_path / "w.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON"):
        load_webnlg(tmp_path / "bad.json")


def test_real_dev_files_and_their_input_disjoint_splits(shared_data):
    webnlg = load_webnlg(shared_data / "webnlg" / "dev.json")
    dart = load_dart(shared_data / "dart" / "dev.json")
    assert webnlg[0].mr == "Aarhus : leaderName : Jacob_Bundsgaard" and webnlg[0].category == "Airport"
    assert sum(len(it.references) for it in webnlg) == 2258  # the 'good' lexicalisations of 872 entries
    assert sum(len(it.references) for it in dart) == 6980
    assert all(it.seen for it in webnlg)  # the 2017 dev set holds the seen categories only
    for items, path in ((webnlg, "webnlg"), (dart, "dart")):
        with pytest.warns(UserWarning, match=r"no file for \['train', 'test'\]"):
            splits = d2t_splits({"valid": items}, {"valid": shared_data / path / "dev.json"}, seed=0)
        inputs = {r: {it.mr for it in splits[r]} for r in splits}
        assert not inputs["train"] & inputs["valid"] and not inputs["train"] & inputs["test"]
        assert not inputs["valid"] & inputs["test"]
        assert sum(len(v) for v in splits.values()) == len(items) == len({it.mr for it in items})
        assert len(splits["train"]) == round(0.8 * len(items))
    with pytest.raises(DataError, match=r"only a test file"):
        d2t_splits({"test": webnlg}, {"test": Path("test.json")})


# -- metrics ---------------------------------------------------------------------------------------------
def test_bleu_and_ter_on_hand_checked_cases():
    assert bleu(["a b c d"], [["a b c d"]]) == pytest.approx(1.0)
    # 5/6 unigrams, 4/5 bigrams, 3/4 trigrams, 2/3 4-grams match; same length: BLEU = (1/3) ** (1/4).
    assert bleu(["a b c d e f"], [["a b c d e g"]]) == pytest.approx((1 / 3) ** 0.25, abs=1e-4)
    # Fewest edits over each segment's references / average reference length: (1 + 1) / (6 + 3).
    hyps = ["the cat sat on the mat", "a b c"]
    refs = [["the cat sat on a mat", "the cat is on the mat"], ["a b d"]]
    assert ter(hyps, refs) == pytest.approx(2 / 9, abs=1e-4)
    assert ter(["The Cat"], [["the cat"]]) == 0.0  # case-insensitive, as the challenges score it


def test_seen_and_unseen_columns_score_their_own_segments():
    hyps = ["a b c d", "x y z w", "p q r s"]
    refs = [["a b c d"], ["x y z v"], ["p q r t"]]
    out = d2t_metrics(hyps, refs, seen=[True, False, False], with_meteor=False)
    assert set(out) == {"BLEU", "TER", "BLEU_seen", "TER_seen", "BLEU_unseen", "TER_unseen"}
    assert out["BLEU_seen"] == pytest.approx(1.0) and out["TER_seen"] == 0.0
    assert out["TER_unseen"] == pytest.approx(ter(hyps[1:], refs[1:])) == pytest.approx(2 / 8)
    assert out["BLEU"] == pytest.approx(bleu(hyps, refs))
    only_seen = d2t_metrics(hyps, refs, seen=[True, True, True], with_meteor=False)
    assert "BLEU_unseen" not in only_seen and only_seen["BLEU_seen"] == only_seen["BLEU"]


@pytest.mark.slow  # three JVM starts (~30 s on 2 shared cores)
@pytest.mark.skipif(not java_available(), reason="METEOR needs java")
def test_meteor_is_the_e2e_scorer_and_ranks_sensibly():
    from lorakit.metrics.nlg import nlg_metrics

    refs = [["The Eagle is a coffee shop near the river."], ["Aromi serves Chinese food."]]
    good = ["The Eagle is a coffee shop by the river.", "Aromi serves Chinese food."]
    bad = ["A shop.", "Food."]
    out = d2t_metrics(good, refs)
    assert set(out) == {"BLEU", "METEOR", "TER"}
    assert out["METEOR"] == pytest.approx(nlg_metrics(good, refs)["METEOR"], abs=1e-9)
    assert d2t_metrics(bad, refs)["METEOR"] < out["METEOR"] <= 1.0


# -- runs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["webnlg", "dart"])
def test_short_run_scores_generations_with_the_d2t_metrics(
    task, tiny_llama, tmp_path, one_thread, shared_data, monkeypatch
):
    import lorakit.metrics.d2t
    from lorakit.training.trainer import train

    got = {}

    def fake(hypotheses, references, seen=None):  # the real metrics are tested above
        got.update(h=list(hypotheses), r=[list(r) for r in references], seen=seen)
        return {"BLEU": 0.5, "METEOR": 0.25, "TER": 0.5}

    monkeypatch.setattr(lorakit.metrics.d2t, "d2t_metrics", fake)
    out = tmp_path / "run"
    cfg = base_cfg(model=str(tiny_llama), task=task, data=str(shared_data / task), out=str(out),
                   max_length=256, max_train_samples=16, max_eval_samples=3, num_beams=2, max_new_tokens=6,
                   max_steps=2)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train(cfg) == {"BLEU": 0.5, "METEOR": 0.25, "TER": 0.5}
    preds = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert [p["references"] for p in preds] == got["r"] and len(preds) == 3
    assert all(" : " in p["mr"] for p in preds)
    assert got["seen"] == ([True] * 3 if task == "webnlg" else None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not math.isnan([r for r in records if r["split"] == "valid"][-1]["loss"])


def test_official_files_are_used_as_is_and_unseen_categories_are_kept(tmp_path):
    from lorakit.tasks import load_task

    def entries(prefix: str, category: str, n: int) -> list[dict]:
        return [_entry(category, [(f"{prefix}{i}", "p", "o")], [(f"{prefix}{i} is o.", "good")]) for i in range(n)]

    _webnlg(tmp_path / "train.json", entries("T", "Airport", 4))
    _webnlg(tmp_path / "dev.json", entries("V", "Food", 2))
    _webnlg(tmp_path / "test.json", entries("S", "City", 1) + entries("U", "Politician", 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing carved, nothing to warn about
        data = load_task(base_cfg(task="webnlg", data=str(tmp_path), max_valid_samples=None))
    assert [it.mr for it in data.train] == [f"T{i} : p : o" for i in range(4)]
    assert [it.mr for it in data.valid] == ["V0 : p : o", "V1 : p : o"]
    expected = [("City", True), ("Politician", False), ("Politician", False)]
    assert [(it.category, it.seen) for it in data.eval] == expected
    (tmp_path / "train.json").unlink()
    (tmp_path / "dev.json").unlink()
    with pytest.raises(DataError, match=r"only a test file"):
        load_task(base_cfg(task="webnlg", data=str(tmp_path)))
