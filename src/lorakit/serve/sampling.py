"""Per-row logits processing for one sequence: logit bias, presence/frequency/repetition penalties, top-k,
min-p and nucleus filtering. Every value here was validated by the HTTP layer (token ids inside the
vocabulary, finite bounded numbers), so nothing in it can raise on the engine thread.
"""

from __future__ import annotations

import torch
from torch import Tensor


def adjusts(params: object) -> bool:
    """Whether the request's bias or penalties change its logits (``adjusted`` returns them as they are if not).

    Args:
        params: a sequence's ``SamplingParams``.
    """
    return bool(params.logit_bias or params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0)


def adjusted(logits: Tensor, params: object, prompt_ids: list[int], tokens: list[int]) -> Tensor:
    """``logits`` (vocab,) after the request's bias and penalties (a new tensor when any applies).

    Args:
        logits: one row of the model's next-token logits.
        params: the sequence's ``SamplingParams``.
        prompt_ids: its prompt (repetition_penalty counts it, as transformers and vLLM do).
        tokens: the tokens generated so far (presence and frequency penalties count these only, as OpenAI).
    """
    if not adjusts(params):
        return logits
    bias, presence, frequency = params.logit_bias, params.presence_penalty, params.frequency_penalty
    repetition = params.repetition_penalty
    out = logits.float().clone()
    if bias:
        ids, values = zip(*bias)
        out[list(ids)] += torch.tensor(values, dtype=out.dtype)
    if tokens and (presence or frequency):
        counts = torch.bincount(torch.tensor(tokens), minlength=out.shape[0])[: out.shape[0]].to(out.dtype)
        out -= frequency * counts + presence * (counts > 0).to(out.dtype)
    if repetition != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(tokens)), dtype=torch.long)
        picked = out[seen]
        out[seen] = torch.where(picked > 0, picked / repetition, picked * repetition)
    return out


def filtered(probs: Tensor, top_k: int, top_p: float, min_p: float) -> Tensor:
    """``probs`` (vocab,) with the tokens top-k, top-p and min-p exclude set to zero (the likeliest stays).

    Args:
        probs: a probability row.
        top_k: keep the k likeliest (0: all).
        top_p: keep the smallest prefix whose mass reaches top_p (1: all).
        min_p: drop tokens less likely than min_p times the likeliest (0: none).
    """
    if min_p > 0:
        probs = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    if 0 < top_k < probs.shape[0]:
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if min_p > 0 or 0 < top_k < probs.shape[0]:
        probs = probs / probs.sum()  # top_p measures mass among the tokens still in
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return probs
