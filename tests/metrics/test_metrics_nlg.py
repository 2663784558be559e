"""E2E NLG metrics against hand-computed values. BLEU/NIST follow mteval-v13a; ROUGE_L/CIDEr/METEOR
the COCO caption scorers. METEOR starts one JVM for the whole module (it takes seconds)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from lorakit.metrics import (
    MeteorScorer,
    MetricError,
    MissingJavaError,
    bleu,
    cider,
    coco_tokenize,
    java_available,
    mteval_tokenize,
    nist,
    nlg_metrics,
    rouge_l,
)
from lorakit.metrics import nlg as nlg_module

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_java = pytest.mark.skipif(not java_available(), reason="java not on PATH (METEOR / PTB tokenizer)")
NIST_BETA = math.log(2) / math.log(1.5) ** 2


@pytest.fixture(scope="module")
def meteor():
    if not java_available():
        pytest.skip("java not on PATH: METEOR cannot run")
    with MeteorScorer() as scorer:
        yield scorer


# ----------------------------------------------------------------------------- BLEU


def test_bleu_identical_is_one():
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)


def test_bleu_closed_form_precisions():
    # 1-4gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so BP = 1.
    got = bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert got == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_bleu_corpus_level_with_variable_reference_counts():
    # Segment 1 as above; segment 2 matches every n-gram through its two references.
    # Corpus precisions: 11/12, 8/10, 6/8, 4/6 (counts summed before dividing), BP = 1.
    got = bleu(
        ["the cat sat on the mat", "a dog ran in the park"],
        [["the cat sat on a mat"], ["the dog ran in the park", "a dog ran in a park"]],
    )
    assert got == pytest.approx((11 / 12 * 8 / 10 * 6 / 8 * 4 / 6) ** 0.25)


def test_bleu_brevity_penalty_uses_closest_reference():
    # Hypothesis (6 tokens) is a prefix of the 8-token reference; closest lengths: 8 (|2|), 3 (|3|), 10 (|4|).
    refs = [["the cat sat on the mat today again", "x y z", "a b c d e f g h i j"]]
    assert bleu(["the cat sat on the mat"], refs) == pytest.approx(math.exp(1 - 8 / 6))
    # Tie between 5 and 7 tokens: the shorter wins, so the 6-token hypothesis is not penalised.
    tie = [["the cat sat on the mat x", "q r s t u"]]
    assert bleu(["the cat sat on the mat"], tie) == pytest.approx(1.0)


def test_bleu_mteval_smoothing_for_zero_matches():
    # Precisions 3/4, 2/3, 1/2 and no 4-gram match: mteval uses 1/(2*1) for it.
    got = bleu(["the cat sat on"], [["the cat sat in"]])
    assert got == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)


def test_bleu_lowercases_and_tokenizes_like_mteval():
    assert mteval_tokenize("The cat, sat on the mat.") == ["the", "cat", ",", "sat", "on", "the", "mat", "."]
    assert mteval_tokenize("£20-25") == ["£20", "-", "25"]
    assert bleu(["The cat, sat on the mat."], [["the cat , sat on the mat ."]]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- NIST


def test_nist_equals_nltk_with_single_references():
    # With one reference per segment nltk's corpus_nist and mteval agree exactly.
    from nltk.translate.nist_score import corpus_nist

    hyps = ["the cat sat on the mat today", "a dog ran in the park", "it is a nice shop near the river"]
    refs = ["the cat sat on a mat", "the dog ran in the big park", "it is a shop by the river serving food"]
    expected = corpus_nist([[r.split()] for r in refs], [h.split() for h in hyps], 5)
    assert nist(hyps, [[r] for r in refs]) == pytest.approx(expected)


def test_nist_multi_reference_closed_form():
    # References: "a b c", "a b" | "c d" -> 7 words; counts a2 b2 c2 d1, "a b"2 "b c"1 "c d"1.
    # info(a)=info(b)=info(c)=log2(7/2), info(d)=log2(7), info(a b)=log2(2/2)=0, info(c d)=log2(2/1)=1.
    # Unigrams: (3*log2(3.5) + log2(7)) / 4; bigrams: (0 + 1) / 2; length ratio 4/(7/2) >= 1.
    got = nist(["a b", "c d"], [["a b c", "a b"], ["c d"]])
    assert got == pytest.approx((3 * math.log2(3.5) + math.log2(7)) / 4 + 0.5)


def test_nist_length_penalty_follows_mteval_reference_count():
    # 3 hypothesis words; mteval's average reference length = 7 words / 2 reference sets = 3.5,
    # so the penalty is exp(-beta * ln(6/7)^2) (a per-segment average would give ratio 2/3 -> 0.5).
    got = nist(["a b", "c"], [["a b c", "a b"], ["c d"]])
    assert got == pytest.approx(math.log2(3.5) * math.exp(-NIST_BETA * math.log(6 / 7) ** 2))


# ----------------------------------------------------------------------------- ROUGE-L / CIDEr


def test_rouge_l_lcs_closed_form():
    # LCS("the cat sat down", "the dog sat down quickly") = 3 -> P = 3/4, R = 3/5, beta = 1.2
    p, r, b2 = 3 / 4, 3 / 5, 1.2**2
    expected = (1 + b2) * p * r / (r + b2 * p)
    assert rouge_l(["the cat sat down"], [["the dog sat down quickly"]]) == pytest.approx(expected)


def test_rouge_l_takes_max_precision_and_max_recall_separately():
    # "a b": P = 2/4, R = 1; "a b c d e f g h": P = 1, R = 1/2 -> COCO combines max P = 1 and max R = 1.
    assert rouge_l(["a b c d"], [["a b", "a b c d e f g h"]]) == pytest.approx(1.0)
    # Corpus value is the mean over segments.
    assert rouge_l(["a b c d", "x y"], [["a b c d"], ["z w"]]) == pytest.approx(0.5)


def test_cider_idf_behaviour():
    # One segment: every n-gram occurs in all (1) documents, idf = log(1/1) = 0 -> score 0.
    assert cider(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(0.0)
    # Two segments with disjoint words, hypothesis = reference: cosine 1 for n = 1..4, no length
    # penalty, times 10 -> 10.
    assert cider(["the cat sat on the mat", "a dog ran in a park"],
                 [["the cat sat on the mat"], ["a dog ran in a park"]]) == pytest.approx(10.0)


# ----------------------------------------------------------------------------- tokenization


def test_python_tokenizer_strips_punctuation_and_lowercases():
    got = coco_tokenize(["The Eagle (cheap) isn 't near Café Rouge ; £20-25 ."], tokenizer="python")
    assert got == ["the eagle -lrb- cheap -rrb- isn t near café rouge # 20-25"]


@needs_java
def test_ptb_tokenizer_matches_pycocoevalcap_wrapper():
    # Our java call must give what pycocoevalcap's own PTBTokenizer wrapper gives.
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    jar_dir = nlg_module._pycocoevalcap_dir() / "tokenizer"
    if not os.access(jar_dir, os.W_OK):
        pytest.skip("pycocoevalcap's wrapper writes its temp file next to the jar; that folder is read-only")
    sents = [
        "The Eagle costs £20-25, it's \"near\" Café Rouge.",
        "A man (cheap) -- ok...",
        "Alimentum isn 't family - friendly .",
        "",
        "Browns Cambridge- a family-friendly coffee shop .. It has 5 out of 5.",
    ]
    official = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sents)})
    assert coco_tokenize(sents, tokenizer="ptb") == [official[i][0] for i in range(len(sents))]


@needs_java
def test_python_tokenizer_close_to_ptb_on_e2e_references():
    path = SHARED_DATA / "e2e" / "valid.txt"
    if not path.is_file():
        pytest.skip(f"E2E data not found at {path}")
    refs = [line.split("||")[1].strip() for line in path.read_text().splitlines()[:1500]]
    java, py = coco_tokenize(refs, "ptb"), coco_tokenize(refs, "python")
    agree = sum(a == b for a, b in zip(java, py)) / len(refs)
    assert agree > 0.99


# ----------------------------------------------------------------------------- METEOR + all


def test_meteor_identical_and_disjoint(meteor):
    corpus, segs = meteor.score(
        ["the cat sat on the mat", "xq zv wb"], [["the cat sat on the mat"], ["the cat sat"]]
    )
    assert segs[0] > 0.99
    assert segs[1] == 0.0
    assert 0.0 < corpus < 1.0


def test_nlg_metrics_all_five(meteor):
    hyps = ["The cat sat on the mat.", "A dog ran in a park."]
    refs = [["the cat sat on the mat ."], ["a dog ran in a park .", "some dog ran ."]]
    scores = nlg_metrics(hyps, refs, meteor_scorer=meteor, tokenizer="ptb")
    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert scores["BLEU"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["METEOR"] > 0.99
    # NIST of a perfect output equals the summed information of its own n-grams; > 0 and finite.
    assert scores["NIST"] == pytest.approx(nist(hyps, refs)) and scores["NIST"] > 1.0
    # CIDEr: segment 1 scores 10 (its only reference is identical); segment 2 averages over two refs.
    assert 5.0 < scores["CIDEr"] < 10.0


def test_missing_java(monkeypatch):
    monkeypatch.setattr(nlg_module.shutil, "which", lambda _name: None)
    with pytest.raises(MissingJavaError, match=r"meteor=False"):
        nlg_metrics(["a b c d"], [["a b c d"]])
    with pytest.raises(MissingJavaError, match="java"):
        MeteorScorer()
    with pytest.warns(UserWarning, match="approximate Python PTB tokenization"):
        scores = nlg_metrics(["a b c d"], [["a b c d"]], meteor=False)
    assert set(scores) == {"BLEU", "NIST", "ROUGE_L", "CIDEr"}
    assert scores["BLEU"] == pytest.approx(1.0) and scores["ROUGE_L"] == pytest.approx(1.0)


def test_input_errors():
    with pytest.raises(MetricError, match="2 hypotheses but 1 reference lists"):
        nlg_metrics(["a", "b"], [["a"]], meteor=False, tokenizer="python")
    with pytest.raises(MetricError, match=r"references\[0\] must be a non-empty list"):
        nlg_metrics(["a"], [[]], meteor=False, tokenizer="python")
    with pytest.raises(MetricError, match=r"references\[0\] must be a non-empty list"):
        nlg_metrics(["a"], ["a"], meteor=False, tokenizer="python")
    with pytest.raises(MetricError, match="empty or non-string reference"):
        nlg_metrics(["a"], [["  "]], meteor=False, tokenizer="python")
    with pytest.raises(MetricError, match="no hypotheses"):
        nlg_metrics([], [], meteor=False, tokenizer="python")
