"""Structured output (``response_format``): JSON schemas compiled to grammars by llguidance, and one matcher
per sequence that masks its row of logits each step and advances with each sampled token.

Everything that can fail (a schema llguidance rejects, one no text satisfies) fails here, on the HTTP side,
as a 400 naming ``response_format``; the engine thread only masks and advances matchers it was handed.
docs/serving.md says why llguidance (measured against xgrammar, ``scripts/bench_grammar.py``).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Collection
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from torch import Tensor

from lorakit.serve.protocol import APIError

# JSON as json.dumps writes it, whitespace only inside its separators: a fixed layout, so a model cannot
# spin in whitespace instead of finishing the object.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FORMAT_TYPES = ("text", "json_object", "json_schema")
# OpenAI's rule for json_schema.name.
SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def bad(param: str, problem: str) -> APIError:
    """A 400 naming ``param``, with a library message folded onto one line (and cut to a readable length)."""
    line = " ".join(problem.split())
    return APIError(400, f"{param}: {line[:300]}", param=param)


class Constraint:
    """One sequence's place in its grammar (used on the engine thread only; nothing here raises)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        self._matcher = matcher
        self._words = np.zeros((vocab + 31) // 32, dtype="<i4")  # bit i of word w allows token 32 w + i

    def mask(self, logits: Tensor) -> Tensor:
        """``logits`` (vocab,) with every token the grammar does not allow next set to -inf (a new float32
        tensor)."""
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        # numpy, not torch: single-threaded, so a busy machine cannot stall the step in a thread barrier.
        allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: logits.shape[0]].astype(bool)
        return torch.from_numpy(np.where(allowed, logits.float().numpy(), np.float32(-np.inf)))

    def advance(self, token: int) -> bool:
        """Move past the sampled ``token``; False when the grammar refuses it (a bug, not a user error)."""
        return bool(self._matcher.consume_token(token))

    def error(self) -> str:
        return self._matcher.get_error()


class Grammar:
    """A grammar checked against the tokenizer: hands each sequence its own matcher."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        self._matcher, self._vocab = matcher, vocab

    def constraint(self) -> Constraint:
        return Constraint(self._matcher.deep_copy(), self._vocab)


class Grammars:
    """Compiles ``response_format`` values (and tool-call grammars) for one server's tokenizer.

    Args:
        tokenizer: the server's Hugging Face (fast) tokenizer.
        vocab: the width of the model's logits (at least the tokenizer's size).
        eos_ids: the tokens that end a sequence: the grammar allows them once the output is complete.
    """

    def __init__(self, tokenizer: Any, vocab: int, eos_ids: Collection[int]) -> None:
        self.vocab = max(vocab, len(tokenizer))
        self._hf, self._eos = tokenizer, sorted(eos_ids)
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built on first use (it takes a while, once)."""
        with self._lock:
            if self._ll is None:
                self._ll = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab, eos_token=self._eos)
            return self._ll

    def response_format(self, fmt: Any) -> Grammar | None:
        """The grammar a request's ``response_format`` asks for (None: free text); 400s name the field.

        Args:
            fmt: the parsed ``response_format`` (a ``ResponseFormat``), or None.
        """
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return self.json_schema({"type": "object"}, "response_format")
        if fmt.type != "json_schema":
            raise bad("response_format", f"type {fmt.type[:40]!r} is not one of {', '.join(FORMAT_TYPES)}")
        spec = fmt.json_schema
        if spec is None or spec.schema_ is None:
            raise bad("response_format", "json_schema needs json_schema.schema (a JSON schema)")
        if not SCHEMA_NAME.fullmatch(spec.name):
            raise bad("response_format", "json_schema.name must be 1..64 letters, digits, '_' or '-'")
        return self.json_schema(spec.schema_, "response_format")

    def json_schema(self, schema: dict[str, Any] | bool, param: str) -> Grammar:
        """A grammar for the JSON texts ``schema`` admits.

        Args:
            schema: a JSON schema.
            param: the request field it came from, for errors.
        """
        if isinstance(schema, bool):  # JSON Schema's true (anything) and false (nothing)
            if not schema:
                raise bad(param, "the schema is false: no text satisfies it")
            schema = {}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise bad(param, f"not a JSON schema: {exc}") from exc
        return self.checked(grammar, param)

    def lark(self, text: str, param: str) -> Grammar:
        """A grammar from Lark text in llguidance's dialect (``%json {...}`` embeds a schema).

        Args:
            text: the Lark grammar.
            param: the request field it came from, for errors.
        """
        return self.checked(llguidance.LLMatcher.grammar_from_lark(text), param)

    def checked(self, grammar: str, param: str) -> Grammar:
        """``grammar`` (llguidance's serialised form) built for this vocabulary; 400 when llguidance refuses
        it or no text can start it.

        Args:
            grammar: from ``LLMatcher.grammar_from_*``.
            param: the request field it came from, for errors.
        """
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise bad(param, f"the grammar library refused the schema: {matcher.get_error()}")
        if not any(matcher.compute_bitmask()) and not matcher.is_accepting():
            raise bad(param, "no text satisfies the schema")
        return Grammar(matcher, self.vocab)
