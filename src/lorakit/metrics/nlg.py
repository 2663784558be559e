"""Corpus-level, multi-reference NLG metrics computed the way the E2E NLG Challenge's
``e2e-metrics/measure_scores.py`` computes them (the script the LoRA paper's E2E numbers come from).

Where each number comes from:

* **BLEU** — ``sacrebleu`` corpus BLEU with the ``13a`` tokenizer (a port of mteval-v13a's
  tokenization), mteval's "exp" smoothing, closest-reference brevity penalty (ties: shorter), and
  text lowercased first (ASCII only, like mteval's ``tr/A-Z/a-z/``). e2e-metrics runs
  ``mteval-v13a-sig.pl`` without ``-c``, which is exactly that. Scale 0–1 (as mteval prints it;
  the LoRA paper multiplies by 100).
* **NIST** — implemented here, following ``mteval-v13a-sig.pl`` line by line: same tokenization,
  information weights from all reference n-grams of the corpus, n = 1..5, clipped multi-reference
  matches, and its length penalty, whose "average reference length" is total reference words
  divided by the *maximum* number of references per segment (the Perl script pads missing
  references with empty ones). ``nltk``'s ``corpus_nist`` is not used: with several references it
  scores each reference separately and keeps the best, which gives different numbers.
* **METEOR** — Meteor 1.5 (the jar bundled with ``pycocoevalcap``) with ``-l en -norm``, fed the
  same way pycocoevalcap's wrapper feeds it (one corpus-level ``EVAL``); needs ``java``.
* **ROUGE_L** and **CIDEr** — ``pycocoevalcap``'s ``Rouge`` (LCS F-measure, beta 1.2, max precision
  and max recall over references, averaged over segments) and ``Cider`` (CIDEr-D: sigma 6, clipped
  tf-idf, x10, idf from this corpus's references).

As in e2e-metrics, METEOR, ROUGE_L and CIDEr see text passed through the COCO caption tokenizer:
Stanford PTBTokenizer (``-preserveLines -lowerCase``, jar bundled with pycocoevalcap, needs
``java``) followed by removal of punctuation tokens. ``tokenizer="python"`` replaces it by an
approximation without java (nltk's Treebank tokenizer plus PTB's bracket/quote/currency
conventions); scores can then differ slightly from the official ones.

Remaining differences to the official script: inputs are passed in memory (the script reads files
and strips each line, which we replicate with ``str.strip``; newlines inside a hypothesis become
spaces). BLEU in degenerate corpora (no n-gram match at all, or fewer than 4 hypothesis tokens in
total) is 0 here while mteval reports a tiny smoothed value or ignores that order.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.metrics.glue import MetricError

__all__ = [
    "NLG_METRIC_NAMES",
    "MeteorScorer",
    "MissingJavaError",
    "bleu",
    "cider",
    "coco_tokenize",
    "java_available",
    "mteval_tokenize",
    "nist",
    "nlg_metrics",
    "rouge_l",
]

NLG_METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

# Tokens the COCO caption tokenizer drops after PTB tokenization (pycocoevalcap's PUNCTUATIONS).
_COCO_PUNCT = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # penalty 0.5 at 2/3 of the reference length


class MissingJavaError(LorakitError, RuntimeError):
    """``java`` is needed (METEOR, official PTB tokenization) but is not on PATH."""


def java_available(java: str = "java") -> bool:
    """Whether a ``java`` executable is on PATH."""
    return shutil.which(java) is not None


def _pycocoevalcap_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MetricError("pycocoevalcap is not installed (pip install 'lorakit[nlg]')")
    return Path(next(iter(spec.submodule_search_locations)))


def _check_inputs(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise MetricError("hypotheses must be a list of strings and references a list of lists of strings")
    if len(hypotheses) != len(references):
        raise MetricError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise MetricError("no hypotheses to score")
    hyps: list[str] = []
    refs: list[list[str]] = []
    for i, (h, rs) in enumerate(zip(hypotheses, references)):
        if not isinstance(h, str):
            raise MetricError(f"hypothesis {i} is {type(h).__name__}, not str")
        if isinstance(rs, str) or not rs:
            raise MetricError(f"references[{i}] must be a non-empty list of strings")
        clean = []
        for r in rs:
            if not isinstance(r, str) or not r.strip():
                raise MetricError(f"references[{i}] contains an empty or non-string reference: {r!r}")
            clean.append(" ".join(r.split("\n")).strip())
        hyps.append(" ".join(h.split("\n")).strip())
        refs.append(clean)
    return hyps, refs


# --------------------------------------------------------------------------- mteval (BLEU, NIST)


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a default normalization: ASCII lowercasing, then the 13a tokenization."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.translate(_ASCII_LOWER)).split()


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (0–1) as mteval-v13a computes it, via sacrebleu."""
    from sacrebleu.metrics import BLEU

    hyps, refs = _check_inputs(hypotheses, references)
    hyps = [h.translate(_ASCII_LOWER) for h in hyps]
    width = max(len(rs) for rs in refs)
    # sacrebleu takes reference *streams*; None marks a segment with fewer references.
    streams = [[rs[j].translate(_ASCII_LOWER) if j < len(rs) else None for rs in refs] for j in range(width)]
    scorer = BLEU(lowercase=False, tokenize="13a", smooth_method="exp", force=True)
    return scorer.corpus_score(hyps, streams).score / 100.0


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST-5 as ``mteval-v13a-sig.pl`` (e2e-metrics) computes it; see the module docstring.

    Args:
        hypotheses: one generated text per item.
        references: each item's reference texts.
        max_n: the longest n-gram counted.
    """
    hyps, refs = _check_inputs(hypotheses, references)
    hyp_toks = [mteval_tokenize(h) for h in hyps]
    ref_toks = [[mteval_tokenize(r) for r in rs] for rs in refs]
    info = _information_weights(ref_toks, max_n)
    match_info = [0.0] * (max_n + 1)
    hyp_ngrams = [0] * (max_n + 1)
    ref_words = 0
    for h, rs in zip(hyp_toks, ref_toks):
        ref_words += sum(len(r) for r in rs)
        for n in range(1, max_n + 1):
            hyp_ngrams[n] += max(len(h) - n + 1, 0)
            ref_max: Counter = Counter()
            for r in rs:
                for g, c in _ngram_counts(r, n).items():
                    ref_max[g] = max(ref_max[g], c)
            for g, c in _ngram_counts(h, n).items():
                if g in ref_max:
                    match_info[n] += info(g) * min(c, ref_max[g])
    score = sum(match_info[n] / max(hyp_ngrams[n], 1) for n in range(1, max_n + 1))
    # mteval's "average reference length": reference words / number of reference sets.
    num_ref_sets = max(len(rs) for rs in refs)
    return score * _nist_penalty(hyp_ngrams[1] / (ref_words / num_ref_sets) if ref_words else 0.0)


def _information_weights(ref_toks: list[list[list[str]]], max_n: int) -> Callable[[tuple[str, ...]], float]:
    """An n-gram's information weight, log2(count(prefix) / count(n-gram)) over all references."""
    counts: Counter = Counter()
    total_ref_words = 0
    for rs in ref_toks:
        for r in rs:
            total_ref_words += len(r)
            for n in range(1, max_n + 1):
                counts.update(_ngram_counts(r, n))

    def info(gram: tuple[str, ...]) -> float:
        prefix_count = counts[gram[:-1]] if len(gram) > 1 else total_ref_words
        return math.log2(prefix_count / counts[gram])

    return info


def _nist_penalty(ratio: float) -> float:
    """NIST's brevity penalty for a hypothesis/reference length ratio."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


# --------------------------------------------------------------------------- COCO tokenization


def _coco_strip_punct(line: str) -> str:
    # Same filtering as pycocoevalcap's PTBTokenizer.tokenize (split on single spaces, keep order).
    return " ".join(w for w in line.rstrip().split(" ") if w not in _COCO_PUNCT)


def _ptb_java(sentences: list[str], java: str) -> list[str]:
    jar = _pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if not jar.is_file():
        raise MetricError(f"Stanford CoreNLP jar not found at {jar}")
    with tempfile.TemporaryDirectory(prefix="lorakit-ptb-") as tmp:
        src = Path(tmp) / "sentences.txt"
        # One sentence per line, every line terminated, so empty sentences keep their place.
        src.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", "-encoding", "UTF-8", str(src)]
        proc = subprocess.run(cmd, capture_output=True, timeout=600, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")[-500:]
        raise MetricError(f"PTBTokenizer failed (exit {proc.returncode}): {err}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(sentences):
        raise MetricError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return lines


_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_CLITICS = frozenset(["'s", "'re", "'ve", "'m", "'ll", "'d"])
_ALL_PUNCT = re.compile(r"^[.,:;!?'`\-]+$")


def _ptb_python_token(word: str) -> list[str]:
    """Adjust one Treebank token towards Stanford PTBTokenizer's output (E2E-style text)."""
    if word in _PTB_BRACKETS:
        return [_PTB_BRACKETS[word]]
    if _ALL_PUNCT.match(word):
        return ["."]  # any run of these is dropped as punctuation either way
    parts: list[str] = []
    if word[0] in ".-" and len(word) > 1:  # ".price", "-friendly": PTB splits the mark off
        parts.append(word[0])
        word = word[1:]
    if word.startswith("'") and word.lower() not in _PTB_CLITICS and len(word) > 1:  # "isn 't" -> ' t
        parts.append("'")
        word = word[1:]
    if word.endswith("-") and len(word) > 1:  # "cambridge-", "20-"
        return [*parts, word[:-1], "-"]
    return [*parts, word]


def _ptb_python(sentences: list[str]) -> list[str]:
    from nltk.tokenize import TreebankWordTokenizer

    tok = TreebankWordTokenizer()
    out = []
    for s in sentences:
        # PTBTokenizer writes the pound sign as '#' and splits it from the amount.
        s = s.replace("£", " # ")
        words = [p for w in tok.tokenize(s) for p in _ptb_python_token(w)]
        out.append(" ".join(words).lower())
    return out


def coco_tokenize(sentences: Sequence[str], tokenizer: str = "ptb", java: str = "java") -> list[str]:
    """Lowercased PTB tokenization minus punctuation tokens, as pycocoevalcap prepares captions.

    ``tokenizer="ptb"`` runs Stanford PTBTokenizer (java, exactly as e2e-metrics);
    ``"python"`` is a java-free approximation.
    """
    sentences = [" ".join(s.split("\n")) for s in sentences]
    if tokenizer == "ptb":
        if not java_available(java):
            raise MissingJavaError("the PTB tokenizer needs java on PATH (or use tokenizer='python')")
        lines = _ptb_java(sentences, java)
    elif tokenizer == "python":
        lines = _ptb_python(sentences)
    else:
        raise MetricError(f"tokenizer must be 'ptb' or 'python', got {tokenizer!r}")
    return [_coco_strip_punct(line) for line in lines]


# --------------------------------------------------------------------------- COCO scorers


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap ROUGE-L on already tokenized, space-separated text (mean over segments)."""
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: list(rs) for i, rs in enumerate(references)}
    res = {i: [h] for i, h in enumerate(hypotheses)}
    return float(Rouge().compute_score(gts, res)[0])


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap CIDEr(-D) on already tokenized text; idf comes from these references."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: list(rs) for i, rs in enumerate(references)}
    res = {i: [h] for i, h in enumerate(hypotheses)}
    return float(Cider().compute_score(gts, res)[0])


class MeteorScorer:
    """A running Meteor 1.5 process (``java -jar meteor-1.5.jar - - -stdio -l en -norm``).

    Starting it loads paraphrase tables (several seconds), so reuse one scorer for many
    evaluations: ``with MeteorScorer() as m: nlg_metrics(h, r, meteor_scorer=m)``.
    """

    def __init__(self, java: str = "java", max_memory: str = "2G") -> None:
        if not java_available(java):
            raise MissingJavaError(
                "METEOR needs java on PATH (Meteor 1.5 is a Java program); install a JRE "
                "or call nlg_metrics(..., meteor=False) to compute the other metrics"
            )
        jar = _pycocoevalcap_dir() / "meteor" / "meteor-1.5.jar"
        if not jar.is_file():
            raise MetricError(f"Meteor jar not found at {jar}")
        # Kept open for the process's lifetime (closed in close()), so no context manager.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc: subprocess.Popen | None = subprocess.Popen(
            [java, "-jar", f"-Xmx{max_memory}", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=str(jar.parent),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )

    def _io(self, line: str, replies: int) -> list[str]:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise MetricError("MeteorScorer is closed")
        try:
            proc.stdin.write((line + "\n").encode("utf-8"))
            proc.stdin.flush()
        except BrokenPipeError:
            raise MetricError(f"Meteor process died: {self._stderr_tail()}") from None
        out = []
        for _ in range(replies):
            reply = proc.stdout.readline()
            if not reply:
                raise MetricError(f"Meteor process died: {self._stderr_tail()}")
            out.append(reply.decode("utf-8").strip())
        return out

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-500:]

    def score(
        self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[float, list[float]]:
        """Corpus METEOR and per-segment scores for (already tokenized) text."""
        if len(hypotheses) != len(references) or not hypotheses:
            raise MetricError("METEOR needs as many non-empty reference lists as hypotheses (at least one)")

        def clean(s: str) -> str:
            # '|||' is Meteor's field separator; pycocoevalcap strips it the same way.
            return s.replace("|||", "").replace("  ", " ")

        stats = []
        for h, rs in zip(hypotheses, references):
            stats += self._io(" ||| ".join(["SCORE", *(clean(r) for r in rs), clean(h)]), 1)
        replies = self._io(" ||| ".join(["EVAL", *stats]), len(stats) + 1)
        try:
            values = [float(x) for x in replies]
        except ValueError:
            raise MetricError(f"unexpected Meteor output: {replies[:3]}") from None
        return values[-1], values[:-1]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            self.close()


def nlg_metrics(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    meteor: bool = True,
    meteor_scorer: MeteorScorer | None = None,
    tokenizer: str = "auto",
) -> dict[str, float]:
    """E2E-challenge metrics ``BLEU, NIST, METEOR, ROUGE_L, CIDEr`` for one hypothesis per segment.

    ``references[i]`` holds all references of segment ``i`` (any number >= 1). BLEU, METEOR and
    ROUGE_L are in [0, 1]; NIST and CIDEr are unbounded, as e2e-metrics prints them.
    ``meteor=False`` skips METEOR (no java needed with ``tokenizer="python"``); pass a
    ``meteor_scorer`` to reuse a running Meteor process. ``tokenizer`` prepares text for
    METEOR/ROUGE_L/CIDEr: ``"ptb"`` (official, java), ``"python"`` (approximation), or ``"auto"``
    (``"ptb"`` when java is available, else ``"python"`` with a warning).
    Raises :class:`MissingJavaError` when METEOR is requested without java.

    Args:
        hypotheses: one generated text per segment.
        references: each segment's reference texts.
        meteor: compute METEOR (needs java, or ``meteor_scorer``).
        meteor_scorer: a running Meteor process to reuse.
        tokenizer: ``"ptb"``, ``"python"`` or ``"auto"`` (above).
    """
    hyps, refs = _check_inputs(hypotheses, references)
    if meteor and meteor_scorer is None and not java_available():
        raise MissingJavaError(
            "METEOR needs java on PATH; install a JRE or pass meteor=False to compute the other metrics"
        )
    scores = {"BLEU": bleu(hyps, refs), "NIST": nist(hyps, refs)}
    tok_hyps, tok_refs = _coco_tokenized(hyps, refs, _coco_tokenizer(tokenizer))
    if meteor:
        if meteor_scorer is not None:
            scores["METEOR"] = meteor_scorer.score(tok_hyps, tok_refs)[0]
        else:
            with MeteorScorer() as scorer:
                scores["METEOR"] = scorer.score(tok_hyps, tok_refs)[0]
    scores["ROUGE_L"] = rouge_l(tok_hyps, tok_refs)
    scores["CIDEr"] = cider(tok_hyps, tok_refs)
    return {name: scores[name] for name in NLG_METRIC_NAMES if name in scores}


def _coco_tokenizer(tokenizer: str) -> str:
    """``"auto"`` resolved: the official PTB tokenizer when java is available, else the Python one (warned)."""
    if tokenizer != "auto":
        return tokenizer
    if java_available():
        return "ptb"
    warnings.warn(
        "java not found: METEOR/ROUGE_L/CIDEr use an approximate Python PTB tokenization; "
        "scores may differ slightly from the official e2e-metrics",
        UserWarning,
        stacklevel=3,
    )
    return "python"


def _coco_tokenized(hyps: list[str], refs: list[list[str]], tokenizer: str) -> tuple[list[str], list[list[str]]]:
    """Hypotheses and references tokenized in one call (one java process for the PTB tokenizer)."""
    flat = coco_tokenize(hyps + [r for rs in refs for r in rs], tokenizer=tokenizer)
    tok_hyps, rest = flat[: len(hyps)], flat[len(hyps) :]
    tok_refs, k = [], 0
    for rs in refs:
        tok_refs.append(rest[k : k + len(rs)])
        k += len(rs)
    return tok_hyps, tok_refs
