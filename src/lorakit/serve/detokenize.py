"""A sequence's generated text, grown one token at a time without re-decoding all of it every step.

Re-decoding every generated token at each step costs O(n) a step, O(n²) a request: at batch 32 and a
thousand tokens it is a noticeable share of a decode step. ``TextStream`` keeps the text of the tokens it
has settled and decodes only a short window each step, the way vLLM's incremental detokenizer does: the
window starts at settled tokens with some text before the unsettled ones, so a tokenizer that treats a
decode's first token specially (SentencePiece drops its leading space, WordPiece its separator) does so in
both decodes whose difference is the new text.
A window whose text ends in U+FFFD (half a multi-byte character) stays open until the character completes.
Where the window's head decodes differently inside the window (a clean-up that joins across tokens), the
whole text is decoded again, so the text always equals ``decode(tokens)``.
"""

from __future__ import annotations

from collections.abc import Callable

Decode = Callable[[list[int]], str]


class TextStream:
    """The text of a list of token ids that only grows, decoded a window at a time.

    Args:
        decode: token ids → text (the server's ``tokenizer.decode`` with its options).
        tokens: the list the caller appends generated ids to (read here, never changed).
    """

    def __init__(self, decode: Decode, tokens: list[int]) -> None:
        self.decode = decode
        self.tokens = tokens
        self.settled = ""  # decode(tokens[:read])
        self.start = 0  # the window's first token: context for the unsettled ones
        self.read = 0  # tokens whose text is settled

    def text(self) -> str:
        """The text of all tokens so far (call it after each append)."""
        head = self._head()
        window = self.decode(self.tokens[self.start :])
        if not window.startswith(head):
            return self._restart()
        if window.endswith("\ufffd"):
            return self.settled + window[len(head) :]
        self.settled += window[len(head) :]
        self.start, self.read = self.read, len(self.tokens)
        return self.settled

    def _head(self) -> str:
        """The text of the window's settled tokens, widened back until it has some: a decode treats its first
        visible token specially, and skipped special tokens are not visible."""
        head = self.decode(self.tokens[self.start : self.read])
        while not head and self.start > 0:
            self.start -= 1
            head = self.decode(self.tokens[self.start : self.read])
        return head

    def _restart(self) -> str:
        """Decode everything again and settle it (the window's head did not decode as it did alone)."""
        self.settled = self.decode(self.tokens)
        self.start, self.read = self.read, len(self.tokens)
        return self.settled
