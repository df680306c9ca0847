"""The cost of `avec tune` (issue 21): tuning one vector over 8 layers on 16 prompts x 32 tokens
(keyword score, KL budget on 8 neutral prompts) against simply generating those 16 completions
at 8 settings (one layer, 8 coefficients, avec's batched generation). Target: tuning <= 2x.

Run: ``.venv/bin/python bench/bench_tune.py`` (part of ``make bench``); writes
``bench/results/tune.json``. Round robin over ``--reps`` repetitions, medians reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "tune.json"
KEYWORDS = ["ocean", "sea", "wave", "beach", "shore", "tide", "marine", "coral", "sail", "boat",
            "whale", "dolphin", "coast", "surf", "island", "underwater", "seaside"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import torch

    from avec.data.demo import DEMO_PAIRS, NEUTRAL_PROMPTS, TUNE_PROMPTS
    from avec.directions.extract import extract
    from avec.generation.hf import steered_completions
    from avec.models import load_model
    from avec.tuning import KeywordScore, KLBudget, TuneConfig, tune
    from avec.tuning.search import band, pick_layers

    model = load_model()
    config = TuneConfig(progress=False)
    layers = pick_layers(list(range(model.n_layers)), model.n_layers, config)
    wanted = sorted({L for c in layers for w in (1, *config.bands)
                     for L in band(c, w, model.n_layers)})
    vector = extract(model, DEMO_PAIRS, wanted, position="mean")
    coefs = [0.5 * (k + 1) for k in range(8)]

    def generate() -> float:
        t = time.perf_counter()
        steered_completions(model, TUNE_PROMPTS, vector, coefs, layers=[layers[3]],
                            max_new_tokens=32)
        return time.perf_counter() - t

    def tuning() -> tuple[float, dict]:
        t = time.perf_counter()
        result = tune(model, vector, KeywordScore(prompts=TUNE_PROMPTS, keywords=KEYWORDS,
                                                  max_new_tokens=32),
                      KLBudget(prompts=list(NEUTRAL_PROMPTS), limit=1.0), config)
        return time.perf_counter() - t, {"layers": list(result.layers), "coef": result.coef,
                                         "points": len(result.points),
                                         "held_out": result.held_out.steered}

    gen, tun, info = [], [], {}
    for _ in range(args.reps):
        gen.append(generate())
        seconds, info = tuning()
        tun.append(seconds)
        print(f"generate {gen[-1]:.1f} s, tune {seconds:.1f} s", flush=True)
    g, t = statistics.median(gen), statistics.median(tun)
    out = {"model": model.name, "date": time.strftime("%Y-%m-%d"),
           "torch_threads": torch.get_num_threads(), "prompts": len(TUNE_PROMPTS),
           "max_new_tokens": 32, "layers": layers, "generate_8_settings_s": round(g, 1),
           "tune_s": round(t, 1), "ratio": round(t / g, 2), "generate_runs": gen,
           "tune_runs": tun, "choice": info}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"generating 16 prompts x 32 tokens at 8 settings: {g:.1f} s; tuning over 8 layers: "
          f"{t:.1f} s; ratio {t / g:.2f}")


if __name__ == "__main__":
    main()
