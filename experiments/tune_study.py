"""`avec tune` against the hand-run method comparison (issue 21), on the default model.

For each concept of experiments/results/compare (ocean: the 36 hand-written pairs; fire and the
loving-vs-hateful tone: the 64 pairs the model wrote), a mean-difference vector of the whole
pool (read at the mean position, as `avec compare` reads) is tuned over layers and strength for
the concept score (embedding similarity of greedy 32-token completions, chat template applied,
as compare generates) under compare's budget (KL <= 1.0 on avec's 8 neutral prompts), twice: on compare's own 8 prompts
(what compare chose its cells on; a seeded third held out), and on 16 other everyday prompts
that compare never saw. Each tuned setting is then measured with compare's own protocol (its 8
prompts, its KL) and set beside compare's best cell.

    .venv/bin/python experiments/tune_study.py            # writes experiments/results/tune/
"""

from __future__ import annotations

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARE = ROOT / "experiments" / "results" / "compare"
OUT = ROOT / "experiments" / "results" / "tune"
CONCEPTS = {  # name: (pairs file, concept description)
    "ocean": (COMPARE / "ocean_pairs.jsonl", "the ocean, the sea, waves and beaches"),
    "fire": (COMPARE / "fire" / "pairs.jsonl", "fire"),
    "tone": (COMPARE / "tone" / "pairs.jsonl", "love, joy and kindness"),
}
# everyday prompts disjoint from compare's 8 (CONCEPT_PROMPTS) and from the neutral KL prompts
STUDY_PROMPTS = [
    "What should I know before adopting a dog?", "Give me tips for a long train journey.",
    "How can I sleep better at night?", "What is a good gift for a friend?",
    "Plan a relaxing Sunday for me.", "How do I start running?",
    "What makes a good presentation?", "Tell me something interesting about trees.",
    "How do I make a budget for the month?", "What is your favourite season and why?",
    "Describe a walk through a city you like.", "How should I prepare for an exam?",
    "What are good habits for the morning?", "Tell me about a memorable meal.",
    "How do I keep a conversation going?", "What would you do with a free afternoon?",
]


def compare_best(name: str) -> dict:
    """The best cell of the hand-run comparison: the highest mean effect over seeds (and its
    best seed), any method and number of pairs, within the KL budget."""
    doc = json.loads((COMPARE / name / "results.json").read_text())
    best = max(doc["summary"], key=lambda r: r["effect_mean"])
    return {"method": best["method"], "n_pairs": best["n_pairs"],
            "effect_mean": best["effect_mean"], "effect_std": best["effect_std"],
            "effect_max": best["effect_max"], "kl": best["kl_at_best_mean"],
            "layer": doc["settings"]["layer"], "baseline": doc["baseline"],
            "coefs": doc["settings"]["coefs"]}


def compare_protocol(model, vector, layers, coef, concept: str) -> dict:
    """The tuned setting measured as `avec compare` measures a cell."""
    from avec.data.demo import CONCEPT_PROMPTS, NEUTRAL_PROMPTS
    from avec.evaluate.concepts import EmbeddingJudge
    from avec.evaluate.side_effects import kl_divergence
    from avec.generation.hf import variant_completions
    from avec.tuning.search import setting_vector

    vec = setting_vector(vector, layers)
    texts = variant_completions(model, CONCEPT_PROMPTS, [(None, 0.0), (vec, coef)],
                                max_new_tokens=32)
    judge = EmbeddingJudge()
    base, steered = (sum(judge.scores(t, concept)) / len(t) for t in texts)
    kl = kl_divergence(model, NEUTRAL_PROMPTS, vec, vec.layers, [coef])[0]
    return {"unsteered": base, "steered": steered, "effect": steered - base, "kl": kl,
            "completions": texts[1]}


def main() -> None:
    from avec.data import load_pairs
    from avec.data.demo import NEUTRAL_PROMPTS
    from avec.directions.extract import extract
    from avec.models import load_model
    from avec.tuning import ConceptScore, KLBudget, TuneConfig, tune
    from avec.tuning.report import write
    from avec.tuning.search import band, pick_layers

    model = load_model()
    config = TuneConfig(seed=0)
    layers = pick_layers(list(range(model.n_layers)), model.n_layers, config)
    wanted = sorted({L for c in layers for w in (1, *config.bands)
                     for L in band(c, w, model.n_layers)})
    from avec.data.demo import CONCEPT_PROMPTS

    rows = []
    for name, (pairs_file, concept) in CONCEPTS.items():
        for tuned_on, prompts in (("compare's 8 prompts", list(CONCEPT_PROMPTS)),
                                  ("16 other prompts", STUDY_PROMPTS)):
            t0 = time.perf_counter()
            vector = extract(model, load_pairs(pairs_file), wanted, position="mean")
            score = ConceptScore(prompts=prompts, concept=concept, max_new_tokens=32)
            budget = KLBudget(prompts=list(NEUTRAL_PROMPTS), limit=1.0)
            result = tune(model, vector, score, budget, config)
            seconds = time.perf_counter() - t0
            folder = OUT / f"{name}-{'compare' if len(prompts) == 8 else 'other'}-prompts"
            write(result, vector, model, folder,
                  prompts=[prompts[i] for i in result.split["held_out"]],
                  vector_name=f"{name}.tuned.safetensors")
            measured = compare_protocol(model, vector, result.layers, result.coef, concept)
            row = {"concept": name, "tuned_on": tuned_on, "folder": folder.name, "tune": {
                "layers": list(result.layers), "coef": result.coef, "dose": result.dose,
                "kl_tuning": result.budget_value, "held_in": result.score_held_in,
                "unsteered_held_in": result.unsteered_held_in,
                "held_out": result.held_out.__dict__ if result.held_out else None,
                "seconds_with_extraction": round(seconds, 1), "points": len(result.points)},
                "compare_protocol": measured, "compare_best": compare_best(name)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "compare_protocol"}
                             | {"effect": measured["effect"], "kl": measured["kl"]}), flush=True)
    (OUT / "study.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
