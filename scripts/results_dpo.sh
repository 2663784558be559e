#!/usr/bin/env bash
# Issue 35 results on smollm2-135m, sized for 2 CPU cores: the DPO parity table against TRL, then
# SFT -> DPO from the SFT adapter -> greedy outputs of both adapters on held-out MRs, counted by the slot matcher.
# Finished steps are skipped on a rerun. PY and OUT can be set; DATA is the E2E file the pairs come from.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/e2e/valid.txt}
OUT=${OUT:-runs/results/dpo}
PAIRS=$OUT/e2e-pref
[ -f $PAIRS/build.json ] || $PY scripts/e2e_preference.py "$DATA" --out $PAIRS
# 1. Parity: lorakit and TRL DPOTrainer + PEFT, 12 steps of 8 pairs, 48 held-out pairs; seed 1 here,
#    seed 2 after the SFT runs (finished runs are kept in dpo_parity.json and skipped).
parity() { $PY scripts/dpo_parity.py --data $PAIRS --steps 12 --seeds "$1" --lr 2e-4 --eval-pairs 48 --out $OUT/parity; }
parity 1
# 2. SFT on the training MRs' references, no validation split; the final score is capped at 8 records.
COMMON=(--model smollm2-135m --targets q,v --r 8 --alpha 16 --batch-size 8 --no-plot --overwrite)
[ -f $OUT/sft/adapter_config.json ] || $PY -m lorakit train "${COMMON[@]}" --task sft --data $PAIRS/sft \
  --max-steps 40 --lr 5e-4 --valid-split 0 --max-valid-samples 8 --max-eval-samples 8 --num-beams 1 \
  --max-new-tokens 32 --out $OUT/sft
# 3. DPO from the SFT adapter (the frozen SFT adapter is the reference), scored on 48 held-out pairs.
[ -f $OUT/dpo/eval_results.json ] || $PY -m lorakit train "${COMMON[@]}" --task dpo --data $PAIRS \
  --init-adapter $OUT/sft --max-steps 24 --lr 5e-4 --beta 0.1 --log-interval 1 --max-valid-samples 8 \
  --max-eval-samples 48 --eval-batch-size 16 --out $OUT/dpo
# 4. Greedy outputs of both adapters for the first 48 held-out MRs, in one mixed-adapter batch stream.
$PY - "$PAIRS/valid.jsonl" > $OUT/prompts.jsonl <<'EOF'
import json, sys
prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in open(sys.argv[1])))[:48]
for p in prompts:
    for adapter in ("sft", "dpo"):
        print(json.dumps({"prompt": p, "adapter": adapter}))
EOF
[ -s $OUT/greedy.jsonl ] || $PY -m lorakit generate --model smollm2-135m --adapter sft=$OUT/sft \
  --adapter dpo=$OUT/dpo --input $OUT/prompts.jsonl --max-new-tokens 64 --num-beams 1 --batch-size 16 \
  --output $OUT/greedy.jsonl
# 5. The slot matcher over both adapters' outputs (cheap; rerun after any change to the matcher).
$PY scripts/e2e_slots.py $OUT/greedy.jsonl --mrs "$DATA" > $OUT/slots.md
parity 1,2
# 6. What the reference pass costs within a step (time share, peak memory), for the same-step choice.
[ -s $OUT/reference.json ] || $PY scripts/bench_dpo_reference.py --data $PAIRS --batches 4 --batch-size 8 \
  > $OUT/reference.json
cat $OUT/parity/dpo_parity.md $OUT/slots.md $OUT/reference.json
