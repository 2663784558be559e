"""Data-to-text metrics as WebNLG and DART report them: BLEU, METEOR and TER, on all segments and, for
WebNLG, on the seen and unseen categories.

* **BLEU**: :func:`lorakit.metrics.nlg.bleu` (sacrebleu corpus BLEU, 13a tokenization, lowercased,
  multi-reference), 0–1.
* **TER**: sacrebleu's corpus TER (case-insensitive, multi-reference: the fewest edits over a segment's
  references, divided by the average reference length, summed over the corpus), 0–1 (lower is better).
* **METEOR**: Meteor 1.5 (``-l en -norm``) on COCO-tokenized text, the scorer used for E2E; needs java.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorakit.metrics.nlg import MeteorScorer, _check_inputs, bleu, coco_tokenize

__all__ = ["D2T_METRIC_NAMES", "d2t_metrics", "meteor", "ter"]

D2T_METRIC_NAMES = ("BLEU", "METEOR", "TER")


def _streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    width = max(len(rs) for rs in refs)
    return [[rs[j] if j < len(rs) else None for rs in refs] for j in range(width)]


def ter(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus TER (0–1) via sacrebleu, every reference of a segment considered.

    Args:
        hypotheses: one text per segment.
        references: all references of each segment.
    """
    from sacrebleu.metrics import TER

    hyps, refs = _check_inputs(hypotheses, references)
    return TER().corpus_score(hyps, _streams(refs)).score / 100.0


def meteor(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], scorer: MeteorScorer | None = None
) -> float:
    """Corpus METEOR 1.5 on COCO-tokenized text (the E2E scorer), reusing ``scorer`` when given.

    Args:
        hypotheses / references: as for :func:`ter`.
        scorer: a running MeteorScorer (starting one takes seconds).
    """
    hyps, refs = _check_inputs(hypotheses, references)
    flat = coco_tokenize(hyps + [r for rs in refs for r in rs], tokenizer="ptb")
    tok_hyps, rest, tok_refs = flat[: len(hyps)], flat[len(hyps) :], []
    for rs in refs:
        tok_refs.append(rest[: len(rs)])
        rest = rest[len(rs) :]
    if scorer is not None:
        return scorer.score(tok_hyps, tok_refs)[0]
    with MeteorScorer() as own:
        return own.score(tok_hyps, tok_refs)[0]


def d2t_metrics(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    seen: Sequence[bool | None] | None = None,
    with_meteor: bool = True,
) -> dict[str, float]:
    """``BLEU, METEOR, TER`` over all segments; with ``seen`` (WebNLG) also ``<metric>_seen`` and
    ``<metric>_unseen`` for each group that has segments.

    Args:
        hypotheses / references: as for :func:`ter`.
        seen: per segment, whether its category is a seen one (None: unknown, counted in "all" only).
        with_meteor: compute METEOR (needs java).
    """
    hyps, refs = _check_inputs(hypotheses, references)
    groups: dict[str, list[int]] = {"": list(range(len(hyps)))}
    if seen is not None:
        for name, flag in (("_seen", True), ("_unseen", False)):
            members = [i for i, s in enumerate(seen) if s is flag]
            if members:
                groups[name] = members
    out: dict[str, float] = {}
    scorer = MeteorScorer() if with_meteor else None
    try:
        for suffix, idx in groups.items():
            h, r = [hyps[i] for i in idx], [refs[i] for i in idx]
            out[f"BLEU{suffix}"] = bleu(h, r)
            if scorer is not None:
                out[f"METEOR{suffix}"] = meteor(h, r, scorer)
            out[f"TER{suffix}"] = ter(h, r)
    finally:
        if scorer is not None:
            scorer.close()
    return out
