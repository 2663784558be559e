"""The engine's per-token text: equal to decoding every generated token at each step, at a window's cost."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from lorakit.serve.detokenize import TextStream

MIXED_TEXT = "Caf\u00e9 na\u00efve \u00fcber \u4e16\u754c \U0001f642\U0001f680 -- tokens, numbers 12345 and  spaces.\n"


def _texts(stream: TextStream, ids: list[int]) -> list[str]:
    """The stream's text after each id is appended to the list it reads."""
    texts = []
    for token in ids:
        stream.tokens.append(token)
        texts.append(stream.text())
    return texts


def _streams(tokenizer, ids: list[int]) -> tuple[list[str], list[str], int]:
    """(each step's streamed text, each step's full decode, the longest id list the stream decoded)."""
    calls: list[int] = []

    def decode(tokens: list[int]) -> str:
        calls.append(len(tokens))
        return tokenizer.decode(tokens, skip_special_tokens=True)

    streamed = _texts(TextStream(decode, []), ids)
    full = [tokenizer.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]
    return streamed, full, max(calls)


@pytest.fixture(scope="module", params=["smollm2_path", "minilm_path"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.getfixturevalue(request.param))


def test_streamed_text_equals_the_full_decode_at_every_token_of_real_text(tokenizer):
    ids = tokenizer(MIXED_TEXT * 12, add_special_tokens=False).input_ids
    streamed, full, longest = _streams(tokenizer, ids)
    assert streamed == full
    assert len(ids) > 200 and longest <= 16  # a window, not the whole text


def test_streamed_text_equals_the_full_decode_for_random_ids_specials_and_split_characters(tokenizer):
    rng = random.Random(0)
    specials = list(tokenizer.all_special_ids)
    # byte-level pieces of multi-byte characters, special tokens and arbitrary ids, in any order
    pieces = tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids
    ids = [rng.choice((rng.randrange(tokenizer.vocab_size), rng.choice(specials), rng.choice(pieces)))
           for _ in range(400)]
    streamed, full, _ = _streams(tokenizer, ids)
    assert streamed == full


def test_half_a_character_stays_unsettled_until_it_completes(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    ids = tokenizer("\U0001f642", add_special_tokens=False).input_ids
    assert len(ids) > 1  # the emoji's four bytes span tokens in this vocabulary
    partial = _texts(TextStream(lambda t: tokenizer.decode(t, skip_special_tokens=True), []), ids)
    assert partial[0].endswith("\ufffd") and partial[-1] == "\U0001f642"


def test_a_decode_that_rewrites_the_settled_text_is_followed_by_decoding_everything_again():
    words = {0: "loud", 1: " words", 2: "!", 3: " quiet"}

    def shouting(ids: list[int]) -> str:  # "!" rewrites the word before it, which a window has settled
        pieces = [words[i] for i in ids]
        return "".join(p.upper() if nxt == "!" else p for p, nxt in zip(pieces, [*pieces[1:], ""]))

    ids = [0, 1, 3, 2, 3, 0, 2, 1]
    assert _texts(TextStream(shouting, []), ids) == [shouting(ids[: i + 1]) for i in range(len(ids))]
