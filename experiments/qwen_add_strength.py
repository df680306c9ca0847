"""Refusal induced on harmless instructions by adding the selected direction at 1x, 1.25x and
1.5x (the paper adds it at 1x), with KL(base || steered) of the next token after each prompt.
Same protocol as `avec refusal eval`: the first 64 harmless_test instructions, greedy, 32 new
tokens, every position steered at the direction's layer. Writes
experiments/results/qwen/refusal/add_strength.json.

    .venv/bin/python experiments/qwen_add_strength.py      # about 8 min on 2 cores (bf16)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import avec
from avec.evaluate.refusal import is_refusal
from avec.generation.hf import format_prompt, steered_completions
from avec.intervene.steer import steer
from avec.studies.refusal.select import last_logits, mean_kl
from avec.vector import load_vector

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "qwen" / "refusal"
DATA = ROOT.parent / "shared" / "data" / "refusal"
COEFS = [1.0, 1.25, 1.5]


def main() -> None:
    t0 = time.perf_counter()
    model = avec.load_model("qwen2.5-coder-1.5b-instruct", dtype=torch.bfloat16)
    vector = load_vector(OUT / "select" / "refusal_direction.safetensors", model)
    harmless = [x["instruction"] for x in json.loads((DATA / "harmless_test.json").read_text())]
    harmless = harmless[:64]
    rows = steered_completions(model, harmless, vector, COEFS, max_new_tokens=32, batch_size=32)
    tokens = [format_prompt(model, p)[0] for p in harmless]
    base = last_logits(model, tokens)
    result = {"model": model.name, "dtype": "bfloat16", "layer": vector.layers[0],
              "n_harmless": len(harmless), "max_new_tokens": 32, "coefs": {}}
    for c in COEFS:
        with steer(model, vector, coef=c):
            kl = mean_kl(base, last_logits(model, tokens))
        texts = [r.text for r in rows if r.coef == c]
        refused = sum(map(is_refusal, texts))
        result["coefs"][f"{c:g}"] = {"harmless_refused": refused, "rate": refused / len(texts),
                                     "kl_harmless": kl,
                                     "not_refused": [t[:100] for t in texts
                                                     if not is_refusal(t)][:5]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (OUT / "add_strength.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({c: {k: v[k] for k in ("harmless_refused", "kl_harmless")}
                      for c, v in result["coefs"].items()}))


if __name__ == "__main__":
    main()
