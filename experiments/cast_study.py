"""Conditional steering (CAST, issue 22) on the default model: steer toward the ocean only when
the prompt is about food.

1. `avec condition fit` on 48 food and 48 other everyday prompts (experiments/cast/), scanning
   layers 4-24: the direction, comparator, threshold, held-out precision/recall and the ROC plot.
2. The tuned ocean vector of experiments/results/tune/ocean-other-prompts (layer 21), on 24 food
   and 24 other prompts that neither the condition nor the vector saw (eval_*.txt): greedy
   48-token completions (chat template) unsteered, steered unconditionally (generated tokens,
   as a conditional entry steers; and all positions, the tuned setting), and conditionally; all
   48 prompts mixed in the same batches. The steered rate is the share of completions naming the
   ocean (keywords).
3. The same conditional entry through `avec serve`'s HF engine (48 concurrent requests) and
   through vLLM (`avec generate --backend vllm --condition`, when .venv-vllm exists): the texts
   must equal the batch's.

    .venv/bin/python experiments/cast_study.py      # writes experiments/results/cast/food/
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "experiments" / "cast"
OUT = ROOT / "experiments" / "results" / "cast" / "food"
OCEAN = ROOT / "experiments" / "results" / "tune" / "ocean-other-prompts" / "ocean.tuned.safetensors"
OCEAN_WORDS = ["ocean", "sea", "seas", "wave", "waves", "beach", "tide", "tides", "shore",
               "coast", "coastal", "marine", "coral", "surf", "whale", "underwater", "seaside",
               "seafood", "salty", "sailing", "island"]
MAX_NEW_TOKENS = 48
COEF_SCALE = 2.0  # generated-only steering needs more than the all-positions recommendation


def lines(path: Path) -> list[str]:
    return [x.strip() for x in path.read_text().splitlines() if x.strip()]


def rate(texts: list[str]) -> float:
    from avec.evaluate.concepts import keyword_rate

    return keyword_rate(texts, OCEAN_WORDS)


def fit_condition() -> dict:
    from avec.cli.main import main

    t0 = time.time()
    code = main(["condition", "fit", "--positive", str(DATA / "food_prompts.txt"),
                 "--negative", str(DATA / "other_prompts.txt"), "--layers", "4-24:2",
                 "--name", "food", "-o", str(OUT / "condition")])
    assert code == 0
    doc = json.loads((OUT / "condition" / "condition.json").read_text())
    return {"seconds": round(time.time() - t0, 1), "layer": doc["layer"],
            "metric": doc["metric"], "op": doc["held_in"]["op"],
            "threshold": doc["held_in"]["threshold"], "held_in_f1": doc["held_in"]["f1"],
            "cv_f1": next(x["cv_f1"] for x in doc["scan"] if x["layer"] == doc["layer"]),
            "held_out": {k: doc["held_out"][k] for k in ("precision", "recall", "f1")},
            "held_out_auc": doc["auc_held_out"]}


def main() -> None:

    from avec.generation.hf import variant_completions
    from avec.intervene.condition_fit import prompt_means
    from avec.intervene.conditions import parse
    from avec.models import load_model
    from avec.vector import load_vector

    OUT.mkdir(parents=True, exist_ok=True)
    condition = fit_condition()
    model = load_model()
    tuned = load_vector(OCEAN)
    rec = tuned.recommended
    assert rec is not None
    layer = rec.layers[0]
    vector = tuned.select([layer])
    coef = rec.coef * COEF_SCALE
    cond_vec = load_vector(OUT / "condition" / "food.safetensors")
    when = parse({"vector": "food"}, lambda name: cond_vec)
    food, other = lines(DATA / "eval_food.txt"), lines(DATA / "eval_other.txt")
    prompts = food + other
    is_food = [True] * len(food) + [False] * len(other)
    met = when.met(prompt_means(model, prompts, [when.layer])).tolist()
    tp = sum(m and f for m, f in zip(met, is_food))
    fp = sum(m and not f for m, f in zip(met, is_food))
    condition["eval"] = {"precision": tp / max(tp + fp, 1), "recall": tp / len(food),
                         "met_food": tp, "met_other": fp}

    t0 = time.time()
    generated = variant_completions(model, prompts, [(None, 0.0), (vector, coef)],
                                    positions="generated", max_new_tokens=MAX_NEW_TOKENS,
                                    batch_size=48, progress=True)
    everywhere = variant_completions(model, prompts, [(vector, rec.coef)],
                                     max_new_tokens=MAX_NEW_TOKENS, batch_size=48,
                                     progress=True)[0]
    conditional = variant_completions(model, prompts, [(vector, coef)], when=when,
                                      max_new_tokens=MAX_NEW_TOKENS, batch_size=48,
                                      progress=True)[0]
    hf_seconds = time.time() - t0
    plain, unconditional = generated
    exact_unmet = sum(c == p for c, p, m in zip(conditional, plain, met) if not m)
    exact_met = sum(c == u for c, u, m in zip(conditional, unconditional, met) if m)

    def rates(texts: list[str]) -> dict:
        return {"food": rate(texts[:len(food)]), "other": rate(texts[len(food):])}

    rows = {"unsteered": rates(plain),
            f"unconditional, generated tokens (coef {coef:.3g})": rates(unconditional),
            f"unconditional, all positions (tuned: coef {rec.coef:.3g})": rates(everywhere),
            f"conditional on food (coef {coef:.3g})": rates(conditional)}
    server = serve_check(model, vector, coef, cond_vec, prompts)
    vllm = vllm_check(prompts, vector, coef)
    result = {
        "model": model.name, "vector": str(OCEAN.relative_to(ROOT)), "layer": layer,
        "coef": coef, "max_new_tokens": MAX_NEW_TOKENS, "keywords": OCEAN_WORDS,
        "condition": condition, "rates": rows, "hf_seconds": round(hf_seconds, 1),
        "exact": {"unmet_equal_unsteered": f"{exact_unmet}/{met.count(False)}",
                  "met_equal_unconditional": f"{exact_met}/{met.count(True)}"},
        "server": {"equal_to_batch": f"{sum(a == b for a, b in zip(server, conditional))}/"
                                     f"{len(prompts)}", "rates": rates(server)},
        "vllm": None if vllm is None else {
            "equal_to_hf": f"{sum(a == b for a, b in zip(vllm, conditional))}/{len(prompts)}",
            "rates": rates(vllm)},
        "samples": [{"prompt": p, "food": f, "met": m, "unsteered": a, "conditional": c}
                    for p, f, m, a, c in list(zip(prompts, is_food, met, plain,
                                                   conditional))[::8]],
    }
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("condition", "rates", "exact", "server", "vllm")},
                     indent=2))


def serve_check(model, vector, coef, cond_vec, prompts: list[str]) -> list[str]:
    """48 concurrent chat requests with the conditional entry through the HF engine."""
    from avec.serve import Engine, Limits, VectorRegistry
    from avec.serve.schemas import SteeringSpec

    registry = VectorRegistry(model)
    registry.put("ocean", vector)
    registry.put("food", cond_vec)
    engine = Engine(model, registry, Limits(max_tokens=64, max_batch=48, max_queue=64,
                                            request_timeout_s=900))
    spec = [SteeringSpec(vector="ocean", coef=coef, when={"vector": "food"})]
    try:
        def one(p: str) -> str:
            ids = model.prompt_ids(p, None)[0]
            toks = engine.submit(ids, spec, MAX_NEW_TOKENS).result(timeout=900).tokens
            return model.tokenizer.decode(toks, skip_special_tokens=True).strip()

        with ThreadPoolExecutor(max_workers=48) as pool:
            return list(pool.map(one, prompts))
    finally:
        engine.shutdown()


def vllm_check(prompts: list[str], vector, coef: float) -> list[str] | None:
    """The conditional entry through vLLM's plugin (`avec generate --backend vllm`)."""
    avec = ROOT / ".venv-vllm" / "bin" / "avec"
    if not avec.exists():
        return None
    vec_path = OUT / "ocean-layer.safetensors"
    vector.save(vec_path)
    prompt_file = OUT / "eval_prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    done = subprocess.run([str(avec), "generate", "--backend", "vllm", "--vector", str(vec_path),
                           "--coef", repr(coef), "--condition",
                           str(OUT / "condition" / "food.safetensors"), "--prompts-file",
                           str(prompt_file), "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"],
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    if done.returncode != 0:
        (OUT / "vllm-failure.log").write_text(done.stderr)
        raise SystemExit(f"the vLLM run failed: {OUT / 'vllm-failure.log'}")
    vec_path.unlink()
    prompt_file.unlink()
    return [r["text"] for r in json.loads(done.stdout)]


if __name__ == "__main__":
    main()
