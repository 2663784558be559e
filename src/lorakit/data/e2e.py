"""E2E NLG data: ``MR||reference`` text files (the LoRA repository's format) and their splits.

Each line holds one meaning representation (MR) and one human reference separated by ``||``.
An MR appears on several lines, once per reference. For training every (MR, reference) pair is
one example; for evaluation every MR is scored once against all of its references.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.data.splits import partition
from lorakit.data.text import DataError, utf8_error

__all__ = [
    "E2E_PROMPT_SEPARATOR",
    "E2E_ROLES",
    "E2EItem",
    "e2e_prompt",
    "e2e_splits",
    "e2e_training_pairs",
    "load_e2e",
]

E2E_ROLES = ("train", "valid", "test")
E2E_PROMPT_SEPARATOR = " ||"


def e2e_prompt(mr: str) -> str:
    """The conditioning text for an MR: ``"{mr} ||"``; the model continues with ``" {reference}<eos>"``.

    Used both to build training inputs and as the generation prompt, so the two always match.
    """
    return f"{mr.strip()}{E2E_PROMPT_SEPARATOR}"


@dataclass
class E2EItem:
    """One MR with all of its references, in file order."""

    mr: str
    references: list[str] = field(default_factory=list)


def load_e2e(path: str | Path) -> list[E2EItem]:
    """Read an ``MR||reference`` file, grouping references by MR in first-seen MR order.

    Blank lines are skipped; a line without exactly one ``||``, or with an empty MR or reference,
    raises :class:`DataError` naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: E2E file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise utf8_error(path, exc) from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc

    items: dict[str, E2EItem] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("||")
        if len(parts) != 2:
            raise DataError(
                f"{path}, line {lineno}: expected exactly one '||' separating MR and reference, "
                f"found {len(parts) - 1}"
            )
        mr, ref = parts[0].strip(), parts[1].strip()
        if not mr or not ref:
            raise DataError(f"{path}, line {lineno}: empty {'MR' if not mr else 'reference'}")
        items.setdefault(mr, E2EItem(mr)).references.append(ref)
    if not items:
        raise DataError(f"{path}: no MR||reference lines (empty file)")
    return list(items.values())


def e2e_training_pairs(items: Sequence[E2EItem]) -> list[tuple[str, str]]:
    """Flatten items into one ``(mr, reference)`` training pair per reference."""
    return [(it.mr, ref) for it in items for ref in it.references]


def _carve(
    items: list[E2EItem], roles: Sequence[str], fractions: dict[str, float], seed: int
) -> dict[str, list[E2EItem]]:
    """Partition items by MR into ``roles`` with sizes proportional to ``fractions`` (the shared rule,
    ``lorakit.data.splits.partition``)."""
    return partition(items, {r: fractions[r] for r in roles}, seed, key=lambda it: it.mr)


def _carve_source(loaded: dict[str, list[E2EItem]], files: dict[str, Path], missing: list[str]) -> str:
    """The role whose file missing roles are carved from: the largest file not serving as the test split.

    Carving train (or valid) out of the test file would put test MRs in the training data, so a folder
    whose only file is the test split is refused."""
    candidates = [r for r in loaded if r != "test"]
    if not candidates:
        raise DataError(
            f"only a test file ({files['test']}): the {missing} splits cannot be carved from it, because "
            "training and validation data must never come from the test split; add a train or valid "
            "file (or --train-file / --valid-file)"
        )
    return max(candidates, key=lambda r: len(loaded[r]))


def e2e_splits(
    data_dir: str | Path,
    seed: int = 0,
    train_file: str | Path | None = None,
    valid_file: str | Path | None = None,
    test_file: str | Path | None = None,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, list[E2EItem]]:
    """Return ``{"train", "valid", "test"}`` item lists: train on train, select on valid, report test.

    Missing roles are carved, MR-disjointly and deterministically (by a hash of ``(seed, MR)``), out of the
    largest file present that is not the test file, with a ``UserWarning``. With only ``valid.txt`` present
    this gives an 80/10/10 split of its MRs; with ``valid.txt`` and ``test.txt`` the train split is carved
    from ``valid.txt`` and ``test.txt`` is used as is. A test file alone is refused: its MRs may never
    become training data.

    Args:
        data_dir: where ``<role>.txt`` files are looked for.
        seed: the carving's seed.
        train_file, valid_file, test_file: a role's file (absolute, or relative to ``data_dir``), used
            instead of ``data_dir/<role>.txt``.
        fractions: the carved sizes' proportions (train, valid, test).
    """
    data_dir = Path(data_dir)
    if len(fractions) != 3 or any(f <= 0 for f in fractions):
        raise DataError(f"fractions must be three positive numbers (train, valid, test), got {fractions}")
    files = _role_files(data_dir, dict(zip(E2E_ROLES, (train_file, valid_file, test_file))))
    loaded = {role: load_e2e(p) for role, p in files.items()}
    splits: dict[str, list[E2EItem]] = dict(loaded)
    missing = [r for r in E2E_ROLES if r not in files]
    if missing:
        frac = dict(zip(E2E_ROLES, map(float, fractions)))
        splits.update(_carve_missing(loaded, files, missing, frac, seed, data_dir))
    _warn_shared_mrs(splits)
    return {r: splits[r] for r in E2E_ROLES}


def _role_files(data_dir: Path, overrides: dict[str, str | Path | None]) -> dict[str, Path]:
    """Each role's file: its override (which must exist) or ``data_dir/<role>.txt`` when present."""
    files: dict[str, Path] = {}
    for role, given in overrides.items():
        if given is not None:
            p = Path(given)
            p = p if p.is_absolute() else data_dir / p
            if not p.is_file():
                raise DataError(f"{role}_file {p} not found")
            files[role] = p
        elif (data_dir / f"{role}.txt").is_file():
            files[role] = data_dir / f"{role}.txt"
    if not files:
        raise DataError(
            f"no E2E data in {data_dir}: expected train.txt / valid.txt / test.txt or explicit *_file paths"
        )
    return files


def _carve_missing(loaded: dict[str, list[E2EItem]], files: dict[str, Path], missing: list[str],
                   frac: dict[str, float], seed: int, data_dir: Path) -> dict[str, list[E2EItem]]:
    """The missing roles (and the source's own), carved by MR out of the largest non-test file, with a warning."""
    source = _carve_source(loaded, files, missing)
    targets = [r for r in E2E_ROLES if r == source or r in missing]
    carved = _carve(loaded[source], targets, frac, seed)
    empty = [r for r, v in carved.items() if not v]
    if empty:
        raise DataError(
            f"{files[source]} has only {len(loaded[source])} MRs: too few to carve non-empty {empty} splits"
        )
    sizes = ", ".join(f"{r}={len(carved[r])}" for r in targets)
    warnings.warn(
        f"E2E: no file for {missing} in {data_dir}; split {files[source]} by MR (seed={seed}) into "
        f"{sizes} MRs. These are not the official E2E splits.",
        UserWarning,
        stacklevel=3,
    )
    return carved


def _warn_shared_mrs(splits: dict[str, list[E2EItem]]) -> None:
    """Warn (once per split) when an MR of one split also occurs in another: its scores are optimistic."""
    seen: dict[str, str] = {}
    for role in E2E_ROLES:
        for it in splits[role]:
            if it.mr in seen and seen[it.mr] != role:
                warnings.warn(
                    f"E2E: MR {it.mr!r} occurs in both the {seen[it.mr]} and {role} splits; "
                    "scores on that split are optimistic",
                    UserWarning,
                    stacklevel=3,
                )
                break
            seen.setdefault(it.mr, role)
