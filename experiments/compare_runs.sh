#!/usr/bin/env bash
# The method comparisons reported in docs/studies/method-comparison.md (default model, CPU, about 110 min in all).
# ONLY="ocean fire tone sycophancy refusal heldout" picks a subset; extra arguments go to every run.
set -euo pipefail
cd "$(dirname "$0")/.."
AVEC=.venv/bin/avec
DATA=../shared/data
OUT=experiments/results/compare
ONLY=${ONLY:-"ocean fire tone sycophancy refusal heldout"}
mkdir -p "$OUT"
want() { [[ " $ONLY " == *" $1 "* ]]; }
if want ocean; then  # concept, hand-written pairs: the 36 built-in demo pairs
  .venv/bin/python -c "
from avec.data.demo import DEMO_PAIRS; from avec.data import save_jsonl_pairs
save_jsonl_pairs(DEMO_PAIRS, '$OUT/ocean_pairs.jsonl')"
  $AVEC compare --pairs "$OUT/ocean_pairs.jsonl" --concept "the ocean, the sea, waves and beaches" \
    --name "concept: ocean" -o "$OUT/ocean" "$@"
fi
if want fire; then  # held-out concept, one command: the model writes 64 pairs itself
  $AVEC compare --concept "fire" --name "concept: fire (synthetic pairs)" -o "$OUT/fire" "$@"
fi
if want tone; then  # behaviour scored on generations: loving vs hateful tone, synthetic pairs
  $AVEC compare --concept "love, joy and kindness" --contrast "hatred, anger and cruelty" \
    --name "behaviour: loving vs hateful tone" -o "$OUT/tone" "$@"
fi
for b in sycophancy refusal; do  # CAA behaviours, A/B protocol
  want "$b" || continue
  $AVEC compare --pairs "$DATA/caa/$b/generate_dataset.json" \
    --data "$DATA/caa/$b/test_dataset_ab.json" --pool 256 --limit 25 --name "CAA $b" --layer 16 \
    --n-pairs 1,3,8,32,128 --coefs 1,2,4,8,16,32 -o "$OUT/$b" "$@"
done
if want heldout; then  # held-out concepts, one command each: mean_diff vs the random control
  for c in "dogs" "music" "outer space and the stars" "cooking and food"; do
    $AVEC compare --concept "$c" --methods mean_diff,random --n-pairs 1,32 \
      -o "$OUT/heldout/${c// /_}" "$@"
  done
fi
