"""xgrammar against llguidance for `lorakit serve`'s ``response_format``: grammar compile time and per-token
mask cost on SmolLM2's 49k vocabulary, side by side in one process.

For each library: the one-off tokenizer wrapping; the compile of a realistic JSON schema (an E2E restaurant
record: enums, a bounded number, a nullable string, an array, a nested object with a pattern) and of
``{"type": "object"}`` (``json_object``), cold each time (xgrammar's cache off); and the walk of a valid
instance's tokens, timing each step's mask fill (median, mean and slowest step) and token commit separately.
Rounds alternate the libraries, so machine load hits both alike; medians over rounds are reported. Last,
lorakit's whole per-row cost with the chosen library (``Constraint.mask`` + ``advance``, median per token).

xgrammar is not a lorakit dependency (docs/serving.md says why): ``pip install xgrammar`` first.

Usage: ``python scripts/bench_grammar.py [--rounds 5] [--tokenizer ~/.cache/lorakit/smollm2-135m]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "eatType": {"enum": ["restaurant", "pub", "coffee shop"]},
        "food": {"type": "string"},
        "priceRange": {"enum": ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]},
        "customerRating": {"type": "number", "minimum": 1, "maximum": 5},
        "familyFriendly": {"type": "boolean"},
        "near": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"street": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "zip"], "additionalProperties": False},
    },
    "required": ["name", "eatType", "priceRange", "familyFriendly", "address"],
    "additionalProperties": False,
}
INSTANCE = {"name": "The Golden Curry", "eatType": "restaurant", "food": "Indian", "priceRange": "£20-25",
            "customerRating": 4.5, "familyFriendly": True, "near": None, "tags": ["spicy", "riverside"],
            "address": {"street": "12 Market Street", "zip": "90210"}}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Any, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), strict_mode=True)

    def walk(self, grammar: Any, tokens: list[int]) -> tuple[list[float], list[float]]:
        matcher = self.xgr.GrammarMatcher(grammar)
        mask = self.xgr.allocate_token_bitmask(1, self.vocab)
        fills, commits = [], []
        for t in tokens:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            t1 = time.perf_counter()
            assert _allowed(mask[0], t), f"xgrammar masks out token {t}"
            ok = matcher.accept_token(t)
            commits.append(time.perf_counter() - t1)
            fills.append(t1 - t0)
            assert ok, f"xgrammar refused token {t}"
        return fills, commits


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return grammar, matcher

    def walk(self, compiled: Any, tokens: list[int]) -> tuple[list[float], list[float]]:
        matcher = compiled[1]
        mask = torch.full((1, (self.vocab + 31) // 32), -1, dtype=torch.int32)
        fills, commits = [], []
        for t in tokens:
            t0 = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(mask[0].data_ptr(), mask[0].numel() * 4)
            t1 = time.perf_counter()
            assert _allowed(mask[0], t), f"llguidance masks out token {t}"
            ok = matcher.consume_token(t)
            commits.append(time.perf_counter() - t1)
            fills.append(t1 - t0)
            assert ok, f"llguidance refused token {t}: {matcher.get_error()}"
        return fills, commits


def _allowed(row: torch.Tensor, token: int) -> bool:
    return bool((int(row[token // 32]) >> (token % 32)) & 1)


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokenizer", default=str(Path.home() / ".cache/lorakit/smollm2-135m"))
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = len(tok)
    tokens = tok(json.dumps(INSTANCE, ensure_ascii=False), add_special_tokens=False).input_ids
    sides, wrap = {}, {}
    for cls in (XGrammar, LLGuidance):
        wrap[cls.name], sides[cls.name] = _timed(lambda c=cls: c(tok, vocab))
    rows: dict[str, dict[str, list[float]]] = {n: {"schema": [], "object": [], "fill": [], "fill_mean": [],
                                                   "fill_max": [], "commit": []} for n in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            seconds, compiled = _timed(lambda s=side: s.compile(SCHEMA))
            rows[name]["schema"].append(seconds)
            rows[name]["object"].append(_timed(lambda s=side: s.compile({"type": "object"}))[0])
            fills, commits = side.walk(compiled, tokens)
            rows[name]["fill"].append(statistics.median(fills))
            rows[name]["fill_mean"].append(statistics.fmean(fills))
            rows[name]["fill_max"].append(max(fills))
            rows[name]["commit"].append(statistics.median(commits))
    med = {n: {k: statistics.median(v) * 1e3 for k, v in r.items()} for n, r in rows.items()}
    out = {"vocab": vocab, "instance_tokens": len(tokens), "rounds": args.rounds, "torch_threads":
           torch.get_num_threads(), "tokenizer_wrap_ms": {n: s * 1e3 for n, s in wrap.items()},
           "median_ms": med,
           "xgrammar_over_llguidance": {k: med["xgrammar"][k] / med["llguidance"][k] for k in med["xgrammar"]}}
    out["lorakit_row_ms"] = _lorakit_row(tok, vocab, tokens) * 1e3
    print(json.dumps(out, indent=1))


def _lorakit_row(tok: Any, vocab: int, tokens: list[int]) -> float:
    """What the engine pays per constrained row and token: ``Constraint.mask`` (fill, unpack, masked_fill
    of a 49k row) plus ``advance``, the median over the instance's tokens."""
    from lorakit.serve.structured import Grammars

    constraint = Grammars(tok, vocab, [tok.eos_token_id]).json_schema(SCHEMA, "bench").constraint()
    logits, times = torch.randn(vocab), []
    for t in tokens:
        t0 = time.perf_counter()
        constraint.mask(logits)
        constraint.advance(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    main()
