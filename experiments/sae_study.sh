#!/usr/bin/env bash
# The SAE study reported in the README: an SAE at layer 10 of the default model trained on the
# AxBench concept10 texts, then SAE features vs mean difference on AxBench concepts 1 and 8 and CAA
# sycophancy (about 30 minutes on 2 cores). The SAE and derived inputs go to $WORK.
set -euo pipefail
cd "$(dirname "$0")/.."
AVEC=.venv/bin/avec
DATA=../shared/data
OUT=experiments/results/sae
WORK=${WORK:-/tmp/avec-sae-study}
mkdir -p "$OUT" "$WORK"
.venv/bin/python - "$DATA" "$WORK" <<'PY'
import json, random, sys
data, work = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(f"{data}/axbench/concept10_train_data.jsonl")]
texts = [r["output"].strip().replace("\n\n", "\n") for r in rows if r["output"].strip()]
open(f"{work}/corpus.txt", "w").write("\n\n".join(texts))       # one document per paragraph
for concept, name in ((1, "audio"), (8, "communism")):
    pos = [r["output"] for r in rows if r["concept_id"] == concept]
    neg = [r["output"] for r in rows if r["category"] == "negative"]
    random.Random(0).shuffle(neg)
    with open(f"{work}/{name}_pairs.jsonl", "w") as f:
        for i, n in enumerate(neg):
            f.write(json.dumps({"positive": pos[i % len(pos)], "negative": n}) + "\n")
PY
$AVEC sae train --layer 10 --texts "$WORK/corpus.txt" --latents 4096 --k 32 --epochs 10 \
  --batch-size 512 --lr 0.002 -o "$WORK/sae-l10"
cp "$WORK/sae-l10/train.json" "$OUT/train_l10.json"
$AVEC compare --pairs "$WORK/audio_pairs.jsonl" \
  --concept "technical specifications related to audio products and their performance" \
  --name "AxBench concept 1: audio specifications" --layer 10 --methods mean_diff,sae \
  --sae "$WORK/sae-l10" --n-pairs 1,3,32,128 --seeds 2 -o "$OUT/compare_audio"
$AVEC compare --pairs "$WORK/communism_pairs.jsonl" \
  --concept "terms related to communist ideology and notable figures" \
  --name "AxBench concept 8: communist ideology" --layer 10 --methods mean_diff,sae \
  --sae "$WORK/sae-l10" --n-pairs 1,3,32,128 --seeds 2 -o "$OUT/compare_communism"
$AVEC sae features --sae "$WORK/sae-l10" --pairs "$WORK/communism_pairs.jsonl" --top 5 \
  --corpus "$WORK/corpus.txt" -o "$OUT/features_communism"
$AVEC compare --pairs "$DATA/caa/sycophancy/generate_dataset.json" \
  --data "$DATA/caa/sycophancy/test_dataset_ab.json" --pool 128 --limit 25 \
  --name "CAA sycophancy" --layer 10 --methods mean_diff,sae --sae "$WORK/sae-l10" \
  --n-pairs 1,3,32,128 --seeds 2 --coefs 1,4,16 -o "$OUT/compare_sycophancy"
