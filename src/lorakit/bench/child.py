"""The bench's subprocess entry: ``python -m lorakit.bench.child CASE_JSON`` runs one case, prints one JSON line.

It owns the table from a case kind to its runner, so the runners' modules (``measure``, ``tokens``) need not
import each other.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from lorakit.bench.measure import (
    Measure,
    run_infer,
    run_merge,
    run_mixed,
    run_pair,
    run_quality,
    run_switch,
    run_train,
)
from lorakit.bench.suites import Case
from lorakit.bench.timing import CPU_TIMES
from lorakit.bench.tokens import run_tokens

RUNNERS: dict[str, Callable[[Case, Measure], dict[str, Any]]] = {
    "quality": run_quality,
    "train": run_train,
    "pair": run_pair,
    "infer": run_infer,
    "mixed": run_mixed,
    "merge": run_merge,
    "switch": run_switch,
    "tokens": run_tokens,
}


def run_case(case: Case) -> dict[str, Any]:
    if case.threads:
        torch.set_num_threads(case.threads)
    measure = Measure(case.device)
    load_before = os.getloadavg()
    started = time.time()
    result = RUNNERS[case.kind](case, measure)
    return {
        "cpu_times": dict(CPU_TIMES),
        "id": case.id,
        "case": json.loads(case.to_json()),
        **result,
        **measure.result,
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": time.time() - started,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lorakit.bench.child CASE_JSON", file=sys.stderr)
        return 2
    result = run_case(Case.from_json(argv[0]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
