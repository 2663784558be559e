#!/usr/bin/env bash
# Issue 4: every method on two GLUE tasks (minilm-l6, 3 seeds) and on E2E (smollm2-135m, 1 seed).
# Subsampled for 2 CPU cores exactly as scripts/results_glue.sh and scripts/results_e2e.sh are:
# GLUE 600 training examples x 3 epochs (114 steps of 16), full dev set scored;
# E2E 80 steps of 8 pairs from the MR-disjoint split of valid.txt, 55 test MRs, beam 10.
# Learning rates: one shared rate (1e-3 GLUE, 5e-4 E2E) for LoRA, adapters and fttop2; methods whose
# parameters move the model less per step get 10x (bitfit, prefixes), full fine-tuning gets its usual 5e-5.
# Re-running skips finished runs (lorakit compare resumes). STAGE=glue|e2e runs one half.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
LK=${LK:-.venv/bin/lorakit}
STAGE=${STAGE:-all}
if [ "$STAGE" != e2e ]; then
  for task in sst2 mrpc; do
    case $task in sst2) dir=SST-2;; mrpc) dir=MRPC;; esac
    $LK compare --model minilm-l6 --task "$task" --data "$DATA/glue/$dir" \
      --methods lora,head,adapter_h,adapter_l,fttop2,bitfit:lr=1e-2,prefix_layer:lr=1e-2,prefix_embed:lr=1e-2 \
      --method full:lr=5e-5 --seeds 1,2,3 --out "runs/results/methods-$task" \
      --max-train-samples 600 --epochs 3 --lr 1e-3 --batch-size 16 --max-length 128
  done
fi
if [ "$STAGE" != glue ]; then
  $LK compare --model smollm2-135m --task e2e --data "$DATA/e2e" \
    --methods lora,adapter_h,adapter_l,prefix_layer:lr=5e-3,prefix_embed:lr=5e-3,fttop2:lr=1e-4 \
    --method full:lr=5e-5 --seeds 1 --out runs/results/methods-e2e \
    --max-steps 80 --batch-size 8 --lr 5e-4 --alpha 16 --targets q,v --max-length 96
fi
