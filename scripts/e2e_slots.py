"""Count wrong, added and missing E2E slots in ``lorakit generate`` outputs, per adapter (``lorakit.metrics.slots``).

Reads the JSONL that ``lorakit generate`` writes (``prompt``, ``adapter``, ``output``; the prompt is lorakit's
E2E prompt ``"{mr} ||"``) and prints one Markdown row per adapter, plus the first human reference of the same
MRs as a yardstick for the matcher itself. Every restaurant name of the E2E file counts when it is not the MR's.

    python scripts/e2e_slots.py runs/results/dpo/greedy.jsonl --mrs ../shared/data/e2e/valid.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from lorakit.data.e2e import e2e_prompt, load_e2e
from lorakit.metrics.slots import NAME_SLOTS, parse_mr, slot_report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", type=Path, help="lorakit generate's JSONL output")
    parser.add_argument("--mrs", type=Path, required=True, help="the E2E file the prompts' MRs come from")
    args = parser.parse_args(argv)
    items = {e2e_prompt(it.mr): it for it in load_e2e(args.mrs)}
    names = {v for it in items.values() for k, v in parse_mr(it.mr).items() if k in NAME_SLOTS}
    texts: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for line in args.outputs.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        texts[rec["adapter"]].append((items[rec["prompt"]].mr, rec["output"]))
    first = next(iter(texts.values()))
    texts["human reference (the MR's first)"] = [(mr, items[e2e_prompt(mr)].references[0]) for mr, _ in first]
    print(
        "| outputs of | MRs | outputs stating a wrong value | wrong values | added values | missing slots / MR slots |"
    )
    print("|---|---|---|---|---|---|")
    for who, pairs in texts.items():
        r = slot_report([mr for mr, _ in pairs], [t for _, t in pairs], names)
        print(f"| {who} | {r['texts']} | {r['texts_with_wrong']} ({r['texts_with_wrong'] / r['texts']:.0%}) | "
              f"{r['wrong']} | {r['added']} | {r['missing']} / {r['mr_slots']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
