"""WebNLG 2017 and DART data-to-text files in the layout of the LoRA repository's examples.

Both are JSON: WebNLG ``{"entries": [{"1": {"category", "modifiedtripleset": [{subject, property,
object}], "lexicalisations": [{"lex", "comment"}]}}, ...]}``, DART ``[{"tripleset": [[s, p, o]],
"annotations": [{"text"}]}, ...]``. Triples are linearised as the paper's code does
(``examples/NLG/src/format_converting_{webnlg,dart}.py``): ``"s : p : o | s : p : o"`` in file order,
DART's relations lowercased; WebNLG keeps only lexicalisations marked ``"good"``. The linearised triples
play the part of the E2E MR, so training, prompts (``"<triples> ||"``) and generation are E2E's.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.data.e2e import E2EItem, _carve, _carve_source
from lorakit.data.text import DataError

__all__ = ["WEBNLG_SEEN_CATEGORIES", "D2TItem", "d2t_splits", "linearise", "load_dart", "load_webnlg"]

# The WebNLG 2017 categories of the training data (the paper's converter marks these "seen").
WEBNLG_SEEN_CATEGORIES = frozenset({
    "Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument", "SportsTeam",
    "University", "WrittenWork",
})  # fmt: skip


@dataclass
class D2TItem(E2EItem):
    """One linearised tripleset (``mr``) with all its references; WebNLG items also carry their category
    and whether it is one of the seen categories."""

    category: str | None = None
    seen: bool | None = None


def linearise(triples: Sequence[Sequence[str]], lowercase_relation: bool = False) -> str:
    """``"s : p : o | s : p : o"``, the LoRA paper's input format for WebNLG and DART.

    Args:
        triples: (subject, relation, object) triples in order.
        lowercase_relation: lowercase the relation (the paper does for DART).
    """
    parts = []
    for subj, rel, obj in triples:
        parts.append(f"{subj} : {rel.lower() if lowercase_relation else rel} : {obj}")
    return " | ".join(parts)


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _merge(items: list[D2TItem]) -> list[D2TItem]:
    """Items with the same linearised input become one with all references, so splits stay disjoint."""
    merged: dict[str, D2TItem] = {}
    for it in items:
        if it.mr in merged:
            merged[it.mr].references.extend(it.references)
        else:
            merged[it.mr] = it
    return list(merged.values())


def _triple(t: Any, where: str) -> tuple[str, str, str]:
    if isinstance(t, dict):
        t = [t.get("subject"), t.get("property"), t.get("object")]
    if not isinstance(t, (list, tuple)) or len(t) != 3 or not all(isinstance(x, str) and x for x in t):
        raise DataError(f"{where}: a triple must have a non-empty subject, relation and object, got {t!r}")
    return t[0], t[1], t[2]


def load_webnlg(path: str | Path) -> list[D2TItem]:
    """WebNLG entries with at least one ``"good"`` lexicalisation, by linearised tripleset.

    Args:
        path: the JSON file (``{"entries": [...]}``).
    """
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise DataError(f"{path}: expected a JSON object with an 'entries' list (WebNLG layout)")
    items = []
    for i, wrapped in enumerate(data["entries"], start=1):
        where = f"{path}, entry {i}"
        entry = wrapped.get(str(i)) if isinstance(wrapped, dict) else None
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object keyed {str(i)!r}")
        for key in ("category", "modifiedtripleset", "lexicalisations"):
            if key not in entry:
                raise DataError(f"{where}: missing {key!r}")
        triples = [_triple(t, where) for t in entry["modifiedtripleset"]]
        if not triples:
            raise DataError(f"{where}: empty 'modifiedtripleset'")
        refs = [lx["lex"].strip() for lx in entry["lexicalisations"] if lx.get("comment") == "good" and
                isinstance(lx.get("lex"), str) and lx["lex"].strip()]  # fmt: skip
        if refs:
            cat = str(entry["category"])
            items.append(D2TItem(linearise(triples), refs, category=cat, seen=cat in WEBNLG_SEEN_CATEGORIES))
    if not items:
        raise DataError(f"{path}: no entry has a 'good' lexicalisation")
    return _merge(items)


def load_dart(path: str | Path) -> list[D2TItem]:
    """DART triplesets with their annotations, by linearised tripleset (relations lowercased).

    Args:
        path: the JSON file (a list of ``{"tripleset", "annotations"}``).
    """
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of triplesets (DART layout)")
    items = []
    for i, entry in enumerate(data):
        where = f"{path}, tripleset {i}"
        if not isinstance(entry, dict) or "tripleset" not in entry or "annotations" not in entry:
            raise DataError(f"{where}: expected an object with 'tripleset' and 'annotations'")
        triples = [_triple(t, where) for t in entry["tripleset"]]
        refs = [a["text"].strip() for a in entry["annotations"] if isinstance(a, dict) and
                isinstance(a.get("text"), str) and a["text"].strip()]  # fmt: skip
        if not triples or not refs:
            raise DataError(f"{where}: needs at least one triple and one non-empty annotation")
        items.append(D2TItem(linearise(triples, lowercase_relation=True), refs))
    return _merge(items)


def d2t_splits(
    loaded: dict[str, list[D2TItem]],
    files: dict[str, Path],
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, list[D2TItem]]:
    """``{"train", "valid", "test"}``: the roles given files keep them; the missing ones are carved out of
    the largest file that is not the test file (never out of the test file), disjoint by linearised input
    and by a hash of ``(seed, input)`` like E2E's carving, with a UserWarning.

    Args:
        loaded: items per role that has a file (e.g. only ``{"valid": ...}`` for the LoRA repo's dev.json).
        files: the file of each loaded role (for messages).
        seed: the split seed.
        fractions: train/valid/test shares.
    """
    roles = ("train", "valid", "test")
    missing = [r for r in roles if r not in loaded]
    if not missing:
        return {r: loaded[r] for r in roles}
    source = _carve_source(loaded, files, missing)  # type: ignore[arg-type]
    targets = [r for r in roles if r == source or r in missing]
    carved = _carve(loaded[source], targets, dict(zip(roles, fractions)), seed)
    empty = [r for r, v in carved.items() if not v]
    if empty:
        raise DataError(f"{files[source]}: only {len(loaded[source])} inputs, too few to carve {empty} splits")
    warnings.warn(
        f"no file for {missing}; split {files[source]} by input (seed={seed}) into "
        + ", ".join(f"{r}={len(carved[r])}" for r in targets) + " triplesets",
        UserWarning,
        stacklevel=2,
    )
    return {r: (carved[r] if r in carved else loaded[r]) for r in roles}  # type: ignore[misc]
