#!/usr/bin/env bash
# Issue 3/5 E2E results on smollm2-135m. The official E2E train file is not available offline, so
# ../shared/data/e2e/valid.txt (547 MRs, 4,672 references) is split by MR into 438 train / 54 valid /
# 55 test MRs (deterministic, MR-disjoint; the loader warns). Runs are short for 2 CPU cores:
# 80 optimizer steps of 8 (MR, reference) pairs = 640 pairs, about 1/6 of an epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/e2e}
OUT=runs/results/e2e
COMMON=(--model smollm2-135m --task e2e --data "$DATA" --max-steps 80 --batch-size 8 --lr 5e-4
        --alpha 16 --targets q,v --max-length 96 --no-plot)
train() {  # train DIR [flags...]: skip finished runs
  local dir=$1; shift
  [ -f "$dir/eval_results.json" ] || .venv/bin/lorakit train "${COMMON[@]}" --out "$dir" --overwrite "$@"
}
# The LoRA row of docs/records/results.md, scored on all 55 test MRs with the paper's decoding (beam 10, lp 0.8).
train $OUT/r8-s1 --r 8 --seed 1
# The zero-shot base, same test MRs, same decoding.
[ -f $OUT/base.json ] || .venv/bin/lorakit eval --model smollm2-135m --task e2e --data "$DATA" --json > $OUT/base.json
# Issue 5: a second rank and a second seed for the subspace analysis (scored on 10 test MRs only).
train $OUT/r64-s1 --r 64 --seed 1 --max-eval-samples 10
train $OUT/r64-s2 --r 64 --seed 2 --max-eval-samples 10
.venv/bin/lorakit analyze $OUT/r8-s1 $OUT/r64-s1 $OUT/r64-s2 --model smollm2-135m --out runs/results/analysis \
  > runs/results/analysis.txt
