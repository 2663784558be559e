#!/usr/bin/env bash
# The CUDA path against the CPU: for each setting (fp32 base, bf16 base, bf16 autocast, --quantize nf4)
# train a few SmolLM2 steps on CPU and on CUDA from the same seed and data order, merge the CUDA adapter,
# and serve a mixed batch (two adapters and the base in one `lorakit generate` batch) on both devices.
# Prints per setting: step time and peak CUDA memory, the final train / validation loss on each device and
# their difference, the largest adapter difference, and whether the greedy generations agree.
# Needs a CUDA machine; nothing in the test suite runs it.
#   scripts/gpu_check.sh [DATA=../shared/data/e2e] [STEPS=8]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DATA=${DATA:-../shared/data/e2e}
STEPS=${STEPS:-8}
OUT=${OUT:-runs/gpu_check}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
mkdir -p "$OUT"
COMMON=(--model smollm2-135m --task e2e --data "$DATA" --max-steps "$STEPS" --batch-size 8 --max-length 96
        --max-train-samples 64 --max-valid-samples 32 --max-eval-samples 2 --num-beams 1 --max-new-tokens 8
        --log-interval 1 --keep last --no-plot --overwrite)
declare -A FLAGS=([fp32]="--base-dtype fp32" [bf16-base]="--base-dtype bf16" [bf16-autocast]="--base-dtype fp32 --bf16"
                  [nf4]="--base-dtype fp32 --quantize nf4")
printf '{"prompt": "name : Aromi | food : Chinese", "adapter": "fp32"}\n{"prompt": "name : Blue Spice | area : riverside", "adapter": "other"}\n{"prompt": "name : Zizzi | food : Italian"}\n' > "$OUT/mixed.jsonl"
for name in fp32 bf16-base bf16-autocast nf4; do
  for device in cpu cuda; do
    # shellcheck disable=SC2086
    $PY -m lorakit train "${COMMON[@]}" ${FLAGS[$name]} --device $device --out "$OUT/$name-$device" \
      > "$OUT/$name-$device.log" 2>&1 || { echo "$name $device: training failed (see $OUT/$name-$device.log)"; continue; }
    $PY -m lorakit generate --model smollm2-135m --adapter "fp32=$OUT/$name-$device" --adapter "other=$OUT/fp32-cpu" \
      --input "$OUT/mixed.jsonl" --device $device --max-new-tokens 12 > "$OUT/$name-$device.gen.jsonl" 2> /dev/null \
      || echo "$name $device: generate failed"
  done
  $PY -m lorakit merge --model smollm2-135m --adapter "$OUT/$name-cuda" --out "$OUT/$name-merged" --overwrite \
    $([ "$name" = bf16-base ] && echo --dtype bf16) > /dev/null || echo "$name: merge failed"
done
$PY scripts/gpu_check_report.py "$OUT"
