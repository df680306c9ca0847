#!/usr/bin/env bash
# The method comparisons reported in the README (default model, CPU). ~10-17 min each; SKIP_CONCEPT=1 runs only the A/B ones.
set -euo pipefail
cd "$(dirname "$0")/.."
AVEC=.venv/bin/avec
DATA=../shared/data
OUT=experiments/results/compare
mkdir -p "$OUT"
.venv/bin/python -c "
from avec.data.demo import DEMO_PAIRS; from avec.data import save_jsonl_pairs
save_jsonl_pairs(DEMO_PAIRS, '$OUT/ocean_pairs.jsonl')"
printf '%s\n' "What did you do yesterday?" "Can you recommend a good book?" \
  "How do I fix a leaky faucet?" "Tell me about the history of Rome." \
  "What's the best way to learn a language?" "Describe a day at the office." \
  "How does photosynthesis work?" "What are some fun hobbies?" > "$OUT/concept_prompts.txt"
[ -n "${SKIP_CONCEPT:-}" ] || $AVEC compare --pairs "$OUT/ocean_pairs.jsonl" --prompts "$OUT/concept_prompts.txt" \
  --concept "the ocean, the sea, waves and beaches" --name "concept: ocean" --layer 14 \
  --n-pairs 1,3,8,32 --coefs 1,2,4,8 -o "$OUT/ocean" "$@"
for b in sycophancy refusal; do
  $AVEC compare --pairs "$DATA/caa/$b/generate_dataset.json" \
    --data "$DATA/caa/$b/test_dataset_ab.json" --pool 256 --limit 25 --name "CAA $b" --layer 16 \
    --n-pairs 1,3,8,32,128 --coefs 1,2,4,8 -o "$OUT/$b" "$@"
done
