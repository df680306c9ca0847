#!/usr/bin/env bash
# The SAE study reported in docs/studies/sae.md, on the default model at layer 10:
#   1. an SAE trained on the AxBench concept10 texts (the concepts' own corpus), and one trained
#      on text the model wrote itself for 512 Alpaca instructions (no concept data);
#   2. SAE features (decoder row added: `sae`; latent clamped in the SAE: `sae_clamp`) vs mean
#      difference on AxBench concepts 1 and 8 with each SAE, and on CAA sycophancy A/B;
#   3. the feature ranking for concept 8 under both rankings.
#   4. a sweep of SAE size and k on the model-written corpus.
# About 2.5 hours on 2 cores. SAEs and derived inputs go to $WORK; an SAE directory that already
# has its train.json is reused, not retrained.
set -euo pipefail
cd "$(dirname "$0")/.."
AVEC=.venv/bin/avec
DATA=../shared/data
OUT=experiments/results/sae
WORK=${WORK:-/tmp/avec-sae-study}
COEFS=0.5,1,1.5,2,3,4
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
SAE_ARGS=(--layer 10 --latents 4096 --k 32 --epochs 10 --batch-size 512 --lr 0.002)
[ -f "$WORK/sae-l10/train.json" ] ||
  $AVEC sae train "${SAE_ARGS[@]}" --texts "$WORK/corpus.txt" -o "$WORK/sae-l10"
[ -f "$WORK/sae-l10-sampled/train.json" ] ||
  $AVEC sae train "${SAE_ARGS[@]}" --sample 768 --prompts "$DATA/refusal/harmless_train.json" \
    -o "$WORK/sae-l10-sampled"
cp "$WORK/sae-l10/train.json" "$OUT/train_l10.json"
cp "$WORK/sae-l10-sampled/train.json" "$OUT/train_l10_sampled.json"

concept() {  # name, description, title, methods, SAE, output
  $AVEC compare --pairs "$WORK/$1_pairs.jsonl" --concept "$2" --name "$3" --layer 10 \
    --methods "$4" --sae "$5" --n-pairs 1,3,32,128 --seeds 2 --coefs $COEFS -o "$6"
}
AUDIO="technical specifications related to audio products and their performance"
COMMUNISM="terms related to communist ideology and notable figures"
concept audio "$AUDIO" "AxBench concept 1: audio specifications" mean_diff,sae,sae_clamp \
  "$WORK/sae-l10" "$OUT/compare_audio"
concept communism "$COMMUNISM" "AxBench concept 8: communist ideology" mean_diff,sae,sae_clamp \
  "$WORK/sae-l10" "$OUT/compare_communism"
# the model-sampled SAE: only its rows (mean_diff's would repeat the runs above exactly)
concept audio "$AUDIO" "AxBench concept 1, SAE on model-written text" sae,sae_clamp \
  "$WORK/sae-l10-sampled" "$OUT/compare_audio_sampled_sae"
concept communism "$COMMUNISM" "AxBench concept 8, SAE on model-written text" sae,sae_clamp \
  "$WORK/sae-l10-sampled" "$OUT/compare_communism_sampled_sae"
for rank in selective difference; do
  $AVEC sae features --sae "$WORK/sae-l10" --pairs "$WORK/communism_pairs.jsonl" --top 5 \
    --rank $rank --corpus "$WORK/corpus.txt" -o "$OUT/features_communism_$rank"
done
$AVEC compare --pairs "$DATA/caa/sycophancy/generate_dataset.json" \
  --data "$DATA/caa/sycophancy/test_dataset_ab.json" --pool 128 --limit 50 \
  --name "CAA sycophancy" --layer 10 --methods mean_diff,sae,sae_clamp --sae "$WORK/sae-l10" \
  --n-pairs 1,3,32,128 --seeds 2 --coefs 4,16,32,64 -o "$OUT/compare_sycophancy"
# size and sparsity: the model-written corpus again (same texts, same held-out split)
mkdir -p "$OUT/sweep"
for spec in "8192 32" "4096 16" "4096 64"; do
  set -- $spec
  dir="$WORK/sae-l10-sampled-$1-k$2"
  [ -f "$dir/train.json" ] ||
    $AVEC sae train --layer 10 --latents "$1" --k "$2" --epochs 10 --batch-size 512 --lr 0.002 \
      --texts "$WORK/sae-l10-sampled/corpus.jsonl" -o "$dir"
  cp "$dir/train.json" "$OUT/sweep/train_$1_k$2.json"
done
