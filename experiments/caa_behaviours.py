"""CAA behaviours on the default model: layer x multiplier sweeps of A/B p(match).

For each behaviour in ../shared/data/caa/: a mean-difference vector from generate_dataset.json
(chat template, read at the answer letter, every layer in --layers), then p(matching letter)
on test_dataset_ab.json at every layer and multiplier, steering the tokens after the question
as CAA does. Writes experiments/results/caa/<behaviour>/sweep_ab.{json,csv,png} and a summary.

    .venv/bin/python experiments/caa_behaviours.py            # ~5 min per behaviour on 2 CPUs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import avec
from avec.evaluate.ab import load_ab_items
from avec.evaluate.sweep import SweepResult, parse_layers, run_sweep

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "caa"
OUT = ROOT / "experiments" / "results" / "caa"
BEHAVIOURS = ["refusal", "hallucination", "corrigible-neutral-HHH", "sycophancy"]
PAPER_LLAMA2_7B = {  # CAA paper, Llama-2-7B-Chat, layer 13, multipliers -1 / 0 / +1 (A/B)
    "refusal": (0.42, 0.74, 0.89), "corrigible-neutral-HHH": (0.20, 0.64, 0.91),
    "hallucination": None, "sycophancy": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", default="2-26:2")
    parser.add_argument("--coefs", default="-8,-4,-1,0,1,4,8")
    parser.add_argument("--max-pairs", type=int, default=300)
    parser.add_argument("--behaviours", default=",".join(BEHAVIOURS))
    args = parser.parse_args()
    layers = parse_layers(args.layers)
    coefs = [float(c) for c in args.coefs.split(",")]
    model = avec.load_model()
    summary = {}
    for behaviour in args.behaviours.split(","):
        t0 = time.perf_counter()
        pairs = avec.load_pairs(DATA / behaviour / "generate_dataset.json")[: args.max_pairs]
        vec = avec.extract(model, pairs, layers, position="ab_letter", chat=True, progress=True)
        items = load_ab_items(DATA / behaviour / "test_dataset_ab.json")
        res: SweepResult = run_sweep(model, "ab", vec, layers, coefs, items=items, progress=True)
        res.extra.update({"behaviour": behaviour, "n_pairs": len(pairs),
                          "norms": {str(k): round(v, 3) for k, v in vec.norms().items()}})
        out = OUT / behaviour
        res.write(out, f"CAA {behaviour}: p(match) on {model.name}")
        vec.save(out / "vector.safetensors")
        # best layer = largest p(+1) - p(-1) spread
        i1, im1, i0 = coefs.index(1.0), coefs.index(-1.0), coefs.index(0.0)
        spreads = [row[i1] - row[im1] for row in res.values]
        best = max(range(len(layers)), key=lambda i: spreads[i])
        row = res.values[best]
        summary[behaviour] = {
            "best_layer": layers[best], "p_at_-1_0_+1": [round(row[im1], 3), round(row[i0], 3),
                                                         round(row[i1], 3)],
            "p_at_-8_+8": [round(row[coefs.index(-8.0)], 3), round(row[coefs.index(8.0)], 3)]
            if -8.0 in coefs and 8.0 in coefs else None,
            "max_abs_change_any_cell": round(max(abs(v - row[i0]) for r in res.values for v in r), 3),
            "paper_llama2_7b_-1_0_+1": PAPER_LLAMA2_7B.get(behaviour),
            "n_pairs": len(pairs), "n_test": len(items),
            "seconds": round(time.perf_counter() - t0, 1)}
        print(behaviour, json.dumps(summary[behaviour]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
