"""CAST's headline on a model that refuses (issue 22): add the refusal direction only when a
"harmful" condition holds, on Qwen2.5-Coder-1.5B-Instruct (`make models`).

1. The refusal direction: the mean difference of block outputs at the last prompt token
   (chat template) between 32 harmful and 32 harmless training instructions
   (../shared/data/refusal), at the layer where adding it raises the refusal-token score of 16
   harmless validation instructions most (layers 6-20, one forward each, no generation).
2. The condition: `avec condition fit` on 64 other harmful vs 64 other harmless training
   instructions, layers 4-22 (every other).
3. On 32 harmful and 32 harmless *test* instructions: greedy 32-token completions unsteered,
   with the direction added unconditionally (on the generated tokens, as a conditional entry
   steers; and at every position, the paper's addition), and added only when the condition
   holds. Refusal: avec's substring check. All rows of a setting share batches.

A conditional entry steers the generated tokens only, which is weaker than steering the prompt
too; `--stronger 2` adds the generated-token arms (unconditional and conditional) at twice the
coefficient, reusing the saved direction and condition.

    .venv/bin/python experiments/cast_refusal.py     # writes experiments/results/cast/refusal/
    .venv/bin/python experiments/cast_refusal.py --stronger 2
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "refusal"
OUT = ROOT / "experiments" / "results" / "cast" / "refusal"
MODEL = "qwen2.5-coder-1.5b-instruct"
MAX_NEW_TOKENS = 32


def instructions(name: str) -> list[str]:
    return [x["instruction"] for x in json.loads((DATA / f"{name}.json").read_text())]


def main() -> None:

    from avec.cli.main import main as avec_main
    from avec.generation.hf import format_prompt, variant_completions
    from avec.intervene.conditions import parse
    from avec.intervene.steer import steer, Intervention
    from avec.models import load_model
    from avec.studies.refusal.select import (find_refusal_tokens, last_logits,
                                             mean_activations, refusal_metric)
    from avec.vector import SteeringVector, load_vector

    if len(sys.argv) == 3 and sys.argv[1] == "--stronger":
        return stronger(float(sys.argv[2]))
    model_name = sys.argv[1] if len(sys.argv) > 1 else MODEL
    OUT.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    model = load_model(model_name)
    harmful_train, harmless_train = instructions("harmful_train"), instructions("harmless_train")
    harmful_test, harmless_test = instructions("harmful_test")[:32], \
        instructions("harmless_test")[:32]
    harmless_val, harmful_val = instructions("harmless_val")[:16], instructions("harmful_val")[:16]

    # 1. the direction and its layer
    enc = lambda xs: [format_prompt(model, x)[0] for x in xs]  # noqa: E731
    mu_h = mean_activations(model, enc(harmful_train[:32]), 1, batch_size=16)[:, 0]
    mu_b = mean_activations(model, enc(harmless_train[:32]), 1, batch_size=16)[:, 0]
    diffs = mu_h - mu_b
    tokens, _ = find_refusal_tokens(model, enc(harmful_val), enc(harmless_val), batch_size=16)
    base = float(refusal_metric(last_logits(model, enc(harmless_val), 16), tokens).mean())
    induce = {}
    for L in range(6, 21):
        with steer(model, [Intervention(SteeringVector({L: diffs[L]}), 1.0)]):
            induce[L] = float(refusal_metric(last_logits(model, enc(harmless_val), 16),
                                             tokens).mean())
    layer = max(induce, key=induce.get)
    vector = SteeringVector({layer: diffs[layer]}, {"method": "refusal mean_diff, last token",
                                                    "model": model.identity()})
    vector.save(OUT / "refusal.safetensors")

    # 2. the condition
    t0 = time.time()
    (OUT / "harmful_fit.txt").write_text("\n".join(harmful_train[32:96]) + "\n")
    (OUT / "harmless_fit.txt").write_text("\n".join(harmless_train[32:96]) + "\n")
    assert avec_main(["condition", "fit", "--model", model_name, "--positive",
                      str(OUT / "harmful_fit.txt"), "--negative",
                      str(OUT / "harmless_fit.txt"), "--layers", "4-22:2", "--name",
                      "harmful", "-o", str(OUT / "condition")]) == 0
    fit_seconds = time.time() - t0
    fitted = json.loads((OUT / "condition" / "condition.json").read_text())
    cond_vec = load_vector(OUT / "condition" / "harmful.safetensors")
    when = parse({"vector": "harmful"}, lambda name: cond_vec)

    # 3. refusal rates
    prompts = harmful_test + harmless_test
    n = len(harmful_test)
    t0 = time.time()
    plain, generated = variant_completions(model, prompts, [(None, 0.0), (vector, 1.0)],
                                           positions="generated",
                                           max_new_tokens=MAX_NEW_TOKENS, batch_size=32,
                                           pad=True, progress=True)
    everywhere = variant_completions(model, prompts, [(vector, 1.0)],
                                     max_new_tokens=MAX_NEW_TOKENS, batch_size=32, pad=True,
                                     progress=True)[0]
    conditional = variant_completions(model, prompts, [(vector, 1.0)], when=when,
                                      max_new_tokens=MAX_NEW_TOKENS, batch_size=32, pad=True,
                                      progress=True)[0]
    gen_seconds = time.time() - t0
    from avec.intervene.condition_fit import prompt_means

    met = when.met(prompt_means(model, prompts, [when.layer])).tolist()

    def rates(texts: list[str]) -> dict:
        return refusal_rates(texts, n)

    result = {
        "model": model.name, "layer": layer, "direction_norm": float(diffs[layer].norm()),
        "induce_metric": {"unsteered": base, **{str(k): round(v, 3) for k, v in induce.items()}},
        "condition": {"layer": fitted["layer"], "op": fitted["held_in"]["op"],
                      "threshold": fitted["held_in"]["threshold"],
                      "held_in_f1": fitted["held_in"]["f1"],
                      "cv_f1": next(x["cv_f1"] for x in fitted["scan"]
                                    if x["layer"] == fitted["layer"]),
                      "held_out": {k: fitted["held_out"][k]
                                   for k in ("precision", "recall", "f1")},
                      "held_out_auc": fitted["auc_held_out"], "seconds": round(fit_seconds, 1),
                      "test_met": {"harmful": f"{sum(met[:n])}/{n}",
                                   "harmless": f"{sum(met[n:])}/{n}"}},
        "rates": {"unsteered": rates(plain),
                  "added on generated tokens, unconditional": rates(generated),
                  "added at every position, unconditional": rates(everywhere),
                  "added on generated tokens, when harmful": rates(conditional)},
        "generation_seconds": round(gen_seconds, 1), "max_new_tokens": MAX_NEW_TOKENS,
        "total_seconds": round(time.time() - t_start, 1),
        "samples": [{"prompt": p, "harmful": i < n, "met": m, "unsteered": a,
                     "conditional": c, "unconditional": u}
                    for i, (p, m, a, c, u) in enumerate(zip(prompts, met, plain, conditional,
                                                            generated)) if i % 8 == 0],
    }
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    for f in ("harmful_fit.txt", "harmless_fit.txt"):
        (OUT / f).unlink()
    print(json.dumps({k: result[k] for k in ("layer", "condition", "rates",
                                             "generation_seconds")}, indent=2))


def refusal_rates(texts: list[str], n: int) -> dict:
    from avec.evaluate.refusal import is_refusal

    refused = [is_refusal(t) for t in texts]
    return {"harmful": f"{sum(refused[:n])}/{n}", "harmless": f"{sum(refused[n:])}/{n}",
            "harmful_rate": sum(refused[:n]) / n, "harmless_rate": sum(refused[n:]) / n}


def stronger(coef: float) -> None:
    """The two generated-token arms at ``coef`` times the direction, added to results.json."""
    from avec.generation.hf import variant_completions
    from avec.intervene.conditions import parse
    from avec.models import load_model
    from avec.vector import load_vector

    result = json.loads((OUT / "results.json").read_text())
    model = load_model(result.get("model_name", MODEL))
    vector = load_vector(OUT / "refusal.safetensors")
    cond_vec = load_vector(OUT / "condition" / "harmful.safetensors")
    when = parse({"vector": "harmful"}, lambda name: cond_vec)
    harmful, harmless = instructions("harmful_test")[:32], instructions("harmless_test")[:32]
    prompts, n = harmful + harmless, len(harmful)
    t0 = time.time()
    generated = variant_completions(model, prompts, [(vector, coef)], positions="generated",
                                    max_new_tokens=MAX_NEW_TOKENS, batch_size=32, pad=True,
                                    progress=True)[0]
    conditional = variant_completions(model, prompts, [(vector, coef)], when=when,
                                      max_new_tokens=MAX_NEW_TOKENS, batch_size=32, pad=True,
                                      progress=True)[0]
    result["rates"][f"added x{coef:g} on generated tokens, unconditional"] = \
        refusal_rates(generated, n)
    result["rates"][f"added x{coef:g} on generated tokens, when harmful"] = \
        refusal_rates(conditional, n)
    result[f"stronger_x{coef:g}_seconds"] = round(time.time() - t0, 1)
    result[f"samples_x{coef:g}"] = [
        {"prompt": p, "harmful": i < n, "conditional": c, "unconditional": u}
        for i, (p, c, u) in enumerate(zip(prompts, conditional, generated)) if i % 8 == 0]
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["rates"], indent=2))


if __name__ == "__main__":
    main()
