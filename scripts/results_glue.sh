#!/usr/bin/env bash
# Issue 3/4 GLUE results on minilm-l6: LoRA (q,v, r=8) against the classifier head alone, 3 seeds.
# Subsampled for 2 CPU cores: 600 training examples, 3 epochs; the full GLUE dev set is scored.
# Re-running skips finished runs (lorakit compare resumes).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/glue}
METHODS=${METHODS:-lora,head}
TASKS=${TASKS:-rte mrpc cola sst2}
for task in $TASKS; do
  case $task in sst2) dir=SST-2;; mrpc) dir=MRPC;; cola) dir=CoLA;; rte) dir=RTE;; esac
  .venv/bin/lorakit compare --model minilm-l6 --task "$task" --data "$DATA/$dir" \
    --methods "$METHODS" --seeds 1,2,3 --out "runs/results/glue/$task" \
    --max-train-samples 600 --epochs 3 --lr 1e-3 --batch-size 16 --max-length 128 --no-plot
done
