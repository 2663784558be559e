"""Build the bring-your-own-data check folders of docs/training.md from the shipped E2E file: the same
(MR, reference) pairs as Alpaca JSONL, ShareGPT JSONL, a Parquet copy of the Alpaca files and a
``datasets.save_to_disk`` folder of the ShareGPT records. Train, valid and test are disjoint by MR.

    python scripts/byod_data.py ../shared/data/e2e/valid.txt OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.data.e2e import load_e2e

INSTRUCTION = "Write one sentence describing the restaurant."


def alpaca(mr: str, ref: str) -> dict[str, str]:
    return {"instruction": INSTRUCTION, "input": mr, "output": ref}


def sharegpt(mr: str, ref: str) -> dict[str, list[dict[str, str]]]:
    return {"conversations": [{"from": "human", "value": f"{INSTRUCTION}\n{mr}"}, {"from": "gpt", "value": ref}]}


def splits(e2e: Path, n_valid: int, n_test: int) -> dict[str, list[tuple[str, str]]]:
    """Train: every pair of the first MRs; valid and test: one pair (the first reference) per later MR."""
    items = load_e2e(e2e)
    held = n_valid + n_test
    train = [(it.mr, ref) for it in items[:-held] for ref in it.references]
    tail = [(it.mr, it.references[0]) for it in items[-held:]]
    return {"train": train, "valid": tail[:n_valid], "test": tail[n_valid:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("e2e", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--valid", type=int, default=32)
    p.add_argument("--test", type=int, default=16)
    args = p.parse_args()
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = splits(args.e2e, args.valid, args.test)
    for name, make in (("alpaca", alpaca), ("sharegpt", sharegpt)):
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for role, pairs in parts.items():
            rows = [make(mr, ref) for mr, ref in pairs]
            (folder / f"{role}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            if name == "alpaca":
                (args.out / "parquet").mkdir(exist_ok=True)
                pq.write_table(pa.Table.from_pylist(rows), args.out / "parquet" / f"{role}.parquet")
    roles = {"train": "train", "valid": "validation", "test": "test"}
    datasets.DatasetDict({
        split: datasets.Dataset.from_list([sharegpt(mr, ref) for mr, ref in parts[role]])
        for role, split in roles.items()
    }).save_to_disk(str(args.out / "save_to_disk"))  # fmt: skip
    print({role: len(pairs) for role, pairs in parts.items()})


if __name__ == "__main__":
    main()
