"""Build a preference set (``{prompt, chosen, rejected}``) from an E2E ``MR||reference`` file.

For each meaning representation (MR), ``chosen`` is one of its human references and ``rejected`` a human
reference written for a *different* MR of the same restaurant (same ``name`` slot) whose slots differ in at
least one attribute or value, so the rejected text states wrong or missing facts for this MR. The prompt is
lorakit's E2E prompt (``"{mr} ||"``) and the answers start with a space, as E2E training targets do.

The split is by restaurant name: every MR of a held-out restaurant goes to ``valid.jsonl``, so no chosen or
rejected text of a held-out pair (nor any MR of its restaurant) is seen in training. ``sft/train.jsonl``
holds the training MRs' references as prompt/completion records, for the SFT stage before DPO.

    python scripts/e2e_preference.py ../shared/data/e2e/valid.txt --out /tmp/e2e-pref

Writes ``OUT/train.jsonl``, ``OUT/valid.jsonl``, ``OUT/sft/train.jsonl`` and ``OUT/build.json`` (counts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from collections import defaultdict
from pathlib import Path

from lorakit.data.e2e import E2EItem, e2e_prompt, load_e2e


def slots(mr: str) -> dict[str, str]:
    """``"name : X | food : Y"`` -> ``{"name": "X", "food": "Y"}``."""
    out = {}
    for part in mr.split("|"):
        key, _, value = part.partition(":")
        out[key.strip()] = value.strip()
    return out


def held_out_names(items: list[E2EItem], share: float, seed: int) -> set[str]:
    """Restaurant names, in a seeded hash order, until their MRs make up ``share`` of all MRs."""
    count: dict[str, int] = defaultdict(int)
    for it in items:
        count[slots(it.mr)["name"]] += 1
    order = sorted(count, key=lambda n: hashlib.sha256(f"{seed}\x00{n}".encode()).hexdigest())
    chosen: set[str] = set()
    for name in order:
        if sum(count[n] for n in chosen) >= share * len(items):
            break
        chosen.add(name)
    return chosen


def pairs_for(item: E2EItem, rivals: list[E2EItem], rng: random.Random, per_mr: int) -> list[dict[str, str]]:
    """Up to ``per_mr`` pairs for ``item``: its reference against a reference of a same-name, other-slot MR."""
    mine = slots(item.mr)
    others = [r for r in rivals if r.mr != item.mr and slots(r.mr) != mine]
    out = []
    for _ in range(per_mr if others else 0):
        rival = rng.choice(others)
        out.append({"prompt": e2e_prompt(item.mr), "chosen": " " + rng.choice(item.references).strip(),
                    "rejected": " " + rng.choice(rival.references).strip()})  # fmt: skip
    return out


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    """Write ``records`` one JSON object a line, atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def build(source: Path, out: Path, share: float, seed: int, per_mr: int) -> dict[str, int]:
    """Write the set; returns the counts written to ``build.json``."""
    items = load_e2e(source)
    by_name: dict[str, list[E2EItem]] = defaultdict(list)
    for it in items:
        by_name[slots(it.mr)["name"]].append(it)
    held = held_out_names(items, share, seed)
    rng = random.Random(seed)
    split: dict[str, list[dict[str, str]]] = {"train": [], "valid": []}
    sft: list[dict[str, str]] = []
    for it in items:
        name = slots(it.mr)["name"]
        role = "valid" if name in held else "train"
        split[role] += pairs_for(it, by_name[name], rng, per_mr)
        if role == "train":
            sft += [{"prompt": e2e_prompt(it.mr), "completion": " " + ref.strip()} for ref in it.references]
    for role, records in split.items():
        write_jsonl(out / f"{role}.jsonl", records)
    write_jsonl(out / "sft" / "train.jsonl", sft)
    counts = {"mrs": len(items), "names": len(by_name), "held_out_names": len(held), "train_pairs": len(split["train"]),
              "valid_pairs": len(split["valid"]), "sft_records": len(sft)}  # fmt: skip
    (out / "build.json").write_text(json.dumps({**counts, "source": str(source), "seed": seed}, indent=1) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="an E2E MR||reference file (e.g. valid.txt)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (outside the repository)")
    parser.add_argument("--held-out", type=float, default=0.2, help="share of MRs (whole restaurants) held out")
    parser.add_argument("--pairs-per-mr", type=int, default=1, help="pairs drawn for each MR")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = build(args.source, args.out, args.held_out, args.seed, args.pairs_per_mr)
    print(json.dumps(counts), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
