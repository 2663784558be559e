"""Log-probs in OpenAI's two shapes: completions' parallel lists (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``) and chat's ``content`` list of ``{token, logprob, bytes, top_logprobs}``.

The engine records token ids and floats only; token strings are decoded here, on the HTTP side.
"""

from __future__ import annotations

from typing import Any

from lorakit.serve.sequence import TokenLogprob


class LogprobFormatter:
    """Turns recorded entries into OpenAI's JSON, keeping the running text offset across stream chunks.

    Args:
        tokenizer: the served model's tokenizer (token ids become their decoded text).
        chat: chat's shape instead of completions'.
    """

    def __init__(self, tokenizer: Any, *, chat: bool) -> None:
        self.tokenizer, self.chat, self.offset = tokenizer, chat, 0

    def _strings(self, ids: list[int]) -> list[str]:
        return self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False) if ids else []

    def format(self, entries: list[TokenLogprob | None]) -> dict[str, Any]:
        """The ``logprobs`` object of one choice (or one chunk of it) for ``entries`` in text order.

        Args:
            entries: scored tokens; None marks a prompt's first token, which has no log-prob.
        """
        ids = [e[0] for e in entries if e is not None]
        ids += [a for e in entries if e is not None for a, _ in e[2]]
        names = dict(zip(ids, self._strings(ids)))
        return self._chat(entries, names) if self.chat else self._completion(entries, names)

    def format_prompt(self, prompt_ids: list[int], entries: list[TokenLogprob | None]) -> dict[str, Any]:
        """Completions' ``echo``: the prompt's tokens (the first one without a log-prob) then ``entries``."""
        first = self._completion([None], dict(zip(prompt_ids[:1], self._strings(prompt_ids[:1]))),
                                 first_id=prompt_ids[0])
        rest = self.format(entries[1:])
        return {key: first[key] + rest[key] for key in first}

    def _completion(self, entries: list[TokenLogprob | None], names: dict[int, str],
                    first_id: int | None = None) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            token = names[entry[0]] if entry is not None else names[first_id]  # type: ignore[index]
            out["tokens"].append(token)
            out["text_offset"].append(self.offset)
            self.offset += len(token)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {names[a]: lp for a, lp in entry[2]}
            top.setdefault(token, entry[1])  # the chosen token is always among them (vLLM does the same)
            out["token_logprobs"].append(entry[1])
            out["top_logprobs"].append(top)
        return out

    def _chat(self, entries: list[TokenLogprob | None], names: dict[int, str]) -> dict[str, Any]:
        content = []
        for entry in entries:
            if entry is None:
                continue
            content.append({**_token(names[entry[0]], entry[1]),
                            "top_logprobs": [_token(names[a], lp) for a, lp in entry[2]]})
        return {"content": content}


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}
