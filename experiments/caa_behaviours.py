"""CAA behaviours: layer x multiplier sweeps of A/B p(match) (default model, or --model).

For each behaviour in ../shared/data/caa/: a mean-difference vector from generate_dataset.json
(chat template, read at the answer letter, every layer in --layers), then p(matching letter)
on test_dataset_ab.json at every layer and multiplier, steering the tokens after the question
as CAA does. Writes experiments/results/caa/<behaviour>/sweep_ab.{json,csv,png} and a summary.

    .venv/bin/python experiments/caa_behaviours.py            # ~5 min per behaviour on 2 CPUs
    .venv/bin/python experiments/caa_behaviours.py --model qwen2.5-coder-1.5b-instruct \
        --dtype bfloat16 --layers 4-22:2 --coefs=-2,-1,0,1,2 --max-pairs 100 \
        --out experiments/results/qwen/caa

For Qwen's tokenizer ("(A" and "(B" are single tokens) the joint tokens are scored
(avec.evaluate.ab.answer_tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

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


def monotone(row: list[float]) -> bool:
    """p(match) never falls as the multiplier rises (or never rises), strictly overall."""
    up = all(b >= a for a, b in zip(row, row[1:]))
    down = all(b <= a for a, b in zip(row, row[1:]))
    return (up or down) and row[0] != row[-1]


def summarise(res: SweepResult, layers: list[int], coefs: list[float]) -> dict:
    """The layer with the largest p(max multiplier) - p(min multiplier), its row, and which
    layers move p(match) monotonically by >= 0.15 between the extreme multipliers."""
    lo, hi, i0 = coefs.index(min(coefs)), coefs.index(max(coefs)), coefs.index(0.0)
    spreads = [row[hi] - row[lo] for row in res.values]
    best = max(range(len(layers)), key=lambda i: spreads[i])
    row = res.values[best]
    pick = {c: round(row[coefs.index(c)], 3) for c in (-1.0, 0.0, 1.0) if c in coefs}
    return {
        "best_layer": layers[best], "p_at_coefs": dict(zip(map(str, coefs), map(
            lambda v: round(v, 3), row))),
        "p_at_-1_0_+1": [pick.get(-1.0), pick.get(0.0), pick.get(1.0)],
        "spread_max_minus_min_coef": round(spreads[best], 3),
        "monotone_at_best_layer": monotone(row),
        "layers_monotone_ge_0.15": [L for L, r, d in zip(layers, res.values, spreads)
                                    if monotone(r) and abs(d) >= 0.15],
        "unsteered": round(row[i0], 3),
        "max_abs_change_any_cell": round(max(abs(v - row[i0]) for r in res.values for v in r), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="a named model or path (default: the "
                        "packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(OUT), help="results directory")
    parser.add_argument("--layers", default="2-26:2")
    parser.add_argument("--coefs", default="-8,-4,-1,0,1,4,8")
    parser.add_argument("--max-pairs", type=int, default=300)
    parser.add_argument("--max-items", type=int, default=None, help="A/B test items (all: 50)")
    parser.add_argument("--behaviours", default=",".join(BEHAVIOURS))
    args = parser.parse_args()
    layers = parse_layers(args.layers)
    coefs = [float(c) for c in args.coefs.split(",")]
    if 0.0 not in coefs:
        raise SystemExit("--coefs must include 0 (the unsteered reference)")
    model = avec.load_model(args.model, dtype=getattr(torch, args.dtype))
    out_root = Path(args.out)
    summary = {}
    for behaviour in args.behaviours.split(","):
        t0 = time.perf_counter()
        pairs = avec.load_pairs(DATA / behaviour / "generate_dataset.json")[: args.max_pairs]
        vec = avec.extract(model, pairs, layers, position="ab_letter", chat=True, progress=True)
        items = load_ab_items(DATA / behaviour / "test_dataset_ab.json")[: args.max_items]
        res: SweepResult = run_sweep(model, "ab", vec, layers, coefs, items=items, progress=True)
        res.extra.update({"behaviour": behaviour, "n_pairs": len(pairs), "dtype": args.dtype,
                          "norms": {str(k): round(v, 3) for k, v in vec.norms().items()}})
        out = out_root / behaviour
        res.write(out, f"CAA {behaviour}: p(match) on {model.name}")
        vec.save(out / "vector.safetensors")
        summary[behaviour] = {**summarise(res, layers, coefs),
                              "paper_llama2_7b_-1_0_+1": PAPER_LLAMA2_7B.get(behaviour),
                              "n_pairs": len(pairs), "n_test": len(items),
                              "seconds": round(time.perf_counter() - t0, 1)}
        print(behaviour, json.dumps(summary[behaviour]), flush=True)
        out_root.mkdir(parents=True, exist_ok=True)
        (out_root / "summary.json").write_text(json.dumps(
            {"model": model.name, "dtype": args.dtype, "layers": layers, "coefs": coefs,
             "behaviours": summary}, indent=2))


if __name__ == "__main__":
    main()
