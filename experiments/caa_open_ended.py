"""CAA open-ended check: the refusal behaviour vector from caa_behaviours.py steering free
generation, scored by the refusal substrings (the behaviour with a scorer that needs no judge
model; CAA scored open-ended answers with GPT-4).

Reads <results>/summary.json (the best layer) and <results>/refusal/vector.safetensors, answers
the 50 CAA refusal open-ended questions greedily at each multiplier (steering every position, as
CAA does for open-ended generation) and writes <results>/refusal/open_ended.json.

    .venv/bin/python experiments/caa_open_ended.py --model qwen2.5-coder-1.5b-instruct \\
        --dtype bfloat16 --results experiments/results/qwen/caa
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import avec
from avec.data import load_prompts
from avec.evaluate.refusal import is_refusal
from avec.generation.hf import steered_completions
from avec.vector import load_vector

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "caa"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--results", required=True, help="caa_behaviours.py's --out directory")
    parser.add_argument("--coefs", default="-2,-1,0,1,2")
    parser.add_argument("--layer", type=int, default=None, help="default: the A/B best layer")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    results = Path(args.results)
    summary = json.loads((results / "summary.json").read_text())
    layer = args.layer if args.layer is not None else \
        summary["behaviours"]["refusal"]["best_layer"]
    coefs = [float(c) for c in args.coefs.split(",")]
    model = avec.load_model(args.model, dtype=getattr(torch, args.dtype))
    vector = load_vector(results / "refusal" / "vector.safetensors", model)
    questions = load_prompts(DATA / "refusal" / "test_dataset_open_ended.json")
    t0 = time.perf_counter()
    rows = steered_completions(model, questions, vector, coefs, layers=[layer],
                               max_new_tokens=args.max_new_tokens, batch_size=16, progress=True)
    rates = {f"{c:g}": sum(is_refusal(r.text) for r in rows if r.coef == c) / len(questions)
             for c in coefs}
    out = {"model": model.name, "dtype": args.dtype, "layer": layer, "coefs": coefs,
           "n_questions": len(questions), "max_new_tokens": args.max_new_tokens,
           "refusal_rate": rates, "seconds": round(time.perf_counter() - t0, 1),
           "samples": [{"question": r.prompt, "coef": r.coef, "text": r.text}
                       for r in rows[: 5 * len(coefs)]]}
    (results / "refusal" / "open_ended.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("layer", "refusal_rate", "seconds")}))


if __name__ == "__main__":
    main()
