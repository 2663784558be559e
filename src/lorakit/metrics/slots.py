"""E2E slot matching: which attribute values a text states, checked against its meaning representation (MR).

A deliberately simple lexical matcher, in the spirit of the E2E challenge's slot-error scripts:

* Each value of a closed-vocabulary attribute (``eatType``, ``food``, ``area``, ``priceRange``,
  ``customer rating``, ``familyFriendly``) has one case-insensitive regular expression for its usual surface
  forms (``SLOT_PATTERNS``): "Japanese" or "sushi" for ``food[Japanese]``, "£20-25" for ``priceRange[£20-25]``,
  "highly rated" for ``customer rating[high]``, "not family-friendly" for ``familyFriendly[no]``. A negated
  family phrase counts as ``no`` only, never also as ``yes``.
* Writers state ratings and prices as numbers or words interchangeably, so "1 out of 5" and "low",
  "3 out of 5" and "average", "5 out of 5" and "high" are one rating each, and "less than £20" and "cheap",
  "£20-25" and "moderate", "more than £30" and "high" one price each. Values compare without case and
  spaces ("£ 20 - 25" is "£20-25"). "restaurant" is also the generic word for any eating place, so it can
  state ``eatType[restaurant]`` but never contradicts another eatType.
* ``name`` and ``near`` values are restaurant names, matched as whole strings (a name inside a longer
  matched name does not count on its own). The names known are the MR's own and any others given (in
  practice every name of the data set). Names are matched first and blanked, so "Raja Indian Cuisine" does
  not state ``food[Indian]``.

For one text and its MR:

* a **wrong** mention is a value stated for an attribute the MR gives a *different* value, or a restaurant
  name that is neither the MR's ``name`` nor its ``near``;
* an **added** mention is a value of an attribute the MR does not have;
* a **missing** slot is an MR attribute none of whose value's forms occurs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["SLOT_PATTERNS", "SlotCheck", "check_slots", "parse_mr", "slot_report"]

_RATED = r"(?:customer )?(?:rat(?:ed|ings?)|reviews?|scores?)"
SLOT_PATTERNS: dict[str, dict[str, str]] = {
    "eatType": {"pub": r"\bpubs?\b", "coffee shop": r"\bcoffee[- ]?(?:shop|house)s?\b",
                "restaurant": r"\brestaurants?\b"},
    "food": {"Chinese": r"\bchinese\b", "English": r"\b(?:english|british)\b", "French": r"\bfrench\b",
             "Fast food": r"\bfast[- ]food\b", "Indian": r"\bindian\b", "Italian": r"\bitalian\b",
             "Japanese": r"\b(?:japanese|sushi)\b"},
    "area": {"city centre": r"\b(?:city|town)[- ]cent(?:re|er)\b|\bcent(?:re|er) of (?:the )?(?:city|town)\b",
             "riverside": r"\briver(?:side)?\b"},
    "priceRange": {
        "cheap": r"\b(?:cheap(?:ly)?|inexpensive|low[- ](?:cost|price[sd]?))\b",
        "moderate": r"\bmoderate(?:ly)?\b|\baverage(?:ly)?[- ]?pric\w*",
        "high": r"\b(?:expensive|pricey|high[- ](?:end|cost|price[sd]?))\b|\bprice[sd]? (?:is |are )?high\b",
        "less than £20": r"(?:less than|under|below|cheaper than) £ ?20\b",
        "£20-25": r"£ ?20 ?(?:-|–|to) ?£? ?25\b",
        "more than £30": r"(?:more than|over|above) £ ?30\b"},
    "customer rating": {
        "1 out of 5": r"\b(?:1|one) (?:out )?of (?:5|five)\b|(?<!of )\b(?:1|one)[- ]stars?\b",
        "3 out of 5": r"\b(?:3|three) (?:out )?of (?:5|five)\b|(?<!of )\b(?:3|three)[- ]stars?\b",
        "5 out of 5": r"\b(?:5|five) (?:out )?of (?:5|five)\b|(?<!of )\b(?:5|five)[- ]stars?\b",
        "low": rf"\b(?:low(?:ly)?|poor(?:ly)?)[- ]{_RATED}|\b{_RATED} (?:is |are |as )?(?:very )?(?:low|poor)\b",
        "average": r"\baverage\b(?![- ]?pric)",
        "high": rf"\bhigh(?:ly)?[- ]{_RATED}|\b{_RATED} (?:is |are |as )?(?:very )?high(?:ly)?\b"},
    "familyFriendly": {
        "no": r"\b(?:not|isn't|aren't|non|none|never)(?:[- ](?:a|very|being|really))*[- ]?(?:family|child|kid)"
              r"|\bnot (?:for|suitable for|good for|welcoming to|open to) (?:famil(?:y|ies)|child(?:ren)?|kids)\b"
              r"|\bno (?:children|kids|families)\b|\badults?[- ]only\b",
        "yes": r"\b(?:family|child|children|kids?)[- ]?friendly\b|"
               r"\bwelcom\w* (?:to )?(?:famil(?:y|ies)|children|kids)\b|\bfor (?:the )?(?:whole )?famil(?:y|ies)\b"},
}  # fmt: skip
_COMPILED = {a: {v: re.compile(p, re.IGNORECASE) for v, p in values.items()} for a, values in SLOT_PATTERNS.items()}
NAME_SLOTS = ("name", "near")
# lorakit's E2E prompt names some attributes differently from the E2E files.
ATTRIBUTE_ALIASES = {"type": "eatType", "eattype": "eatType", "price": "priceRange", "pricerange": "priceRange",
                     "family friendly": "familyFriendly", "familyfriendly": "familyFriendly",
                     "customerrating": "customer rating"}  # fmt: skip
# Writers state a rating or a price as a number or a word interchangeably; either form states the same value.
SAME_VALUE = {
    "customer rating": {"1 out of 5": "low", "3 out of 5": "average", "5 out of 5": "high"},
    "priceRange": {"less than £20": "cheap", "£20-25": "moderate", "more than £30": "high"},
}
# "restaurant" is also the generic word for any eating place: it can state eatType[restaurant], never contradict.
GENERIC = {("eatType", "restaurant")}


@dataclass(frozen=True)
class SlotCheck:
    """What one text states against its MR (see the module docstring for the definitions).

    Attributes:
        wrong: ``(attribute, value stated)`` pairs that contradict the MR (``name`` for a foreign restaurant).
        added: ``(attribute, value stated)`` pairs for attributes the MR does not have.
        missing: MR attributes whose value the text does not state.
    """

    wrong: tuple[tuple[str, str], ...]
    added: tuple[tuple[str, str], ...]
    missing: tuple[str, ...]


def parse_mr(mr: str) -> dict[str, str]:
    """``"name[X], food[Y]"`` (E2E's form) or ``"name : X | food : Y"`` (lorakit's prompt) -> ``{name: X, ...}``,
    with E2E's attribute names (``Type`` -> ``eatType``, ``price`` -> ``priceRange``, ...).

    Args:
        mr: the meaning representation; a trailing ``||`` (lorakit's E2E prompt) is ignored.
    """
    mr = mr.strip().removesuffix("||").strip()
    if "[" in mr:
        pairs = re.findall(r"([^,\[]+)\[([^\]]*)\]", mr)
    else:
        pairs = [part.partition(":")[::2] for part in mr.split("|") if part.strip()]
    return {ATTRIBUTE_ALIASES.get(k.strip().lower(), k.strip()): v.strip() for k, v in pairs}


def _canonical(attr: str, value: str) -> str:
    """The value compared: no case, no spaces, one form per rating and per price."""
    value = re.sub(r"\s+", "", value.lower())
    same = {re.sub(r"\s+", "", k.lower()): v for k, v in SAME_VALUE.get(attr, {}).items()}
    return same.get(value, value)


def _names_stated(text: str, names: Iterable[str]) -> tuple[set[str], str]:
    """(restaurant names in ``text``, the text with them blanked); longest first, so a shorter name inside a
    matched one is not seen."""
    found = set()
    for name in sorted(set(names), key=len, reverse=True):
        pattern = re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)
        if pattern.search(text):
            found.add(name)
            text = pattern.sub(" ", text)
    return found, text


def _values_stated(text: str) -> dict[str, set[str]]:
    stated = {attr: {v for v, rx in values.items() if rx.search(text)} for attr, values in _COMPILED.items()}
    if "no" in stated["familyFriendly"]:
        stated["familyFriendly"].discard("yes")  # "not family-friendly" also contains "family-friendly"
    return stated


def check_slots(mr: str | dict[str, str], text: str, names: Iterable[str] = ()) -> SlotCheck:
    """The wrong, added and missing slots of ``text`` for ``mr``.

    Args:
        mr: the MR (string in either form, or parsed).
        text: the generated (or reference) text.
        names: restaurant names besides the MR's own that count as wrong when stated.
    """
    slots = parse_mr(mr) if isinstance(mr, str) else mr
    text = re.sub(r" ?' ?", "'", re.sub(r" ?- ?", "-", text))  # E2E's tokenized "family - friendly", "isn 't"
    own = {slots[s] for s in NAME_SLOTS if s in slots}
    stated_names, rest = _names_stated(text, set(names) | own)
    wrong = [("name", n) for n in sorted(stated_names - own)]
    added, missing = [], [s for s in NAME_SLOTS if s in slots and slots[s] not in stated_names]
    for attr, values in _values_stated(rest).items():
        if attr not in slots:
            added += [(attr, v) for v in sorted(values) if (attr, v) not in GENERIC]
            continue
        expected = _canonical(attr, slots[attr])
        wrong += [(attr, v) for v in sorted(values) if _canonical(attr, v) != expected and (attr, v) not in GENERIC]
        if expected not in {_canonical(attr, v) for v in values}:
            missing.append(attr)
    return SlotCheck(tuple(wrong), tuple(added), tuple(missing))


def slot_report(mrs: Sequence[str], texts: Sequence[str], names: Iterable[str] = ()) -> dict[str, float]:
    """Totals over texts: how many state a wrong value, the wrong/added/missing counts and the MR slot total.

    Args:
        mrs: each text's MR.
        texts: the texts, aligned with ``mrs``.
        names: restaurant names that count as wrong when not the MR's own (e.g. every name in the data).
    """
    if len(mrs) != len(texts):
        raise ValueError(f"{len(mrs)} MRs but {len(texts)} texts")
    names = set(names)
    checks = [check_slots(mr, text, names) for mr, text in zip(mrs, texts)]
    slots = sum(len(parse_mr(mr)) for mr in mrs)
    return {"texts": len(texts), "texts_with_wrong": sum(bool(c.wrong) for c in checks),
            "wrong": sum(len(c.wrong) for c in checks), "added": sum(len(c.added) for c in checks),
            "missing": sum(len(c.missing) for c in checks), "mr_slots": slots}  # fmt: skip
