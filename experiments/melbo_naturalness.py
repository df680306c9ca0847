"""How natural is what MELBO finds? Likelihood and prompt reachability of the vectors of two
MELBO runs, with three controls scored the same way (docs/studies/naturalness.md):

- arithmetic: the 12 vectors of experiments/results/melbo/arithmetic on the default model
  (SmolLM2-135M-Instruct), and a soft-prompt baseline on the same model: 4 soft prompts of 8
  trainable input embeddings (inserted after the prompt's first token, each at the mean norm
  of the model's token embeddings) trained for the same MELBO objective (target block 22, p=2,
  q=1, all positions) on the run's 8 training prompts, at most 30 steps, patience 10;
- random_init, permuted: the same MELBO run (8 training prompts, blocks 7 -> 22) with 2 vectors,
  at most 20 steps, patience 10, on a randomly initialised SmolLM2-135M and on SmolLM2-135M
  with its block weights permuted across layers (each tensor name by its own permutation);
  their radius is 8 scaled by their residual norm at block 7 over the default model's;
- refusal: the 6 vectors of experiments/results/qwen/melbo/radius_6 on
  Qwen2.5-Coder-1.5B-Instruct (bfloat16), a model that refuses natively (its vector 4 bypasses
  refusal). This replaces the SmolLM2 refuser of experiments/results/melbo/refusal, which
  must first be fine-tuned (`avec refusal make-model`, ~35+ min of CPU); pass
  --refusal-model DIR to score that run instead.

The arithmetic part uses the first 12 evaluation prompts of its run, 32 new tokens, 4 random
vectors of the same norm and all 72 instructions; the controls 6 prompts, 24 tokens, 2 random
vectors and every 4th instruction (18); the Qwen run 6 prompts, 24 tokens, 2 random vectors
and 16 of the instructions (QWEN_INSTRUCTIONS). Every part uses a resample at temperature 0.7
and one instruction the model suggests per vector. Sizes were cut to fit the study in about
an hour of a heavily shared CPU; the parts can run as parallel processes (`--parts
arithmetic`, `--parts refusal`, ...).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/melbo_naturalness.py --threads 1
                                                # writes experiments/results/melbo/naturalness/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "experiments" / "results" / "melbo"
OUT = RUNS / "naturalness"
# evaluation prompts and new tokens per part (even prompts select the instruction, odd ones are
# held out); fewer for the controls and the 1.5B model, to fit the shared CPU
N_PROMPTS, MAX_NEW_TOKENS = 12, 32
CONTROL_PROMPTS, CONTROL_TOKENS, CONTROL_RANDOM = 6, 24, 2
CONTROL_INSTRUCTIONS = tuple(range(0, 72, 4))  # every 4th built-in instruction (18)
QWEN_PROMPTS, QWEN_TOKENS, QWEN_RANDOM = 6, 24, 2
# the 1.5B model decodes ~6 rows a minute on the shared CPU: only 16 of the 72 instructions,
# the compliance/refusal group and the genres its steered texts take (code, steps, lists, essays)
QWEN_INSTRUCTIONS = (5, 7, 10, 13, 18, 30, 49, 50, 51, 52, 53, 54, 55, 57, 63, 65)
CONTROL_VECTORS, SOFT_PROMPTS = 2, 4
CONTROL_STEPS, CONTROL_PATIENCE = 20, 10
SOFT_STEPS = 30
QWEN_RUN, QWEN_MODEL = ROOT / "experiments" / "results" / "qwen" / "melbo" / "radius_6", \
    "qwen2.5-coder-1.5b-instruct"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_prompts(name: str | Path, n: int = N_PROMPTS) -> tuple[Any, list[str]]:
    """The run's vectors and its first ``n`` evaluation prompts (from summary.json)."""
    from avec.discover.report import load_run

    result, _train = load_run(RUNS / name)
    saved = json.loads((RUNS / name / "summary.json").read_text())
    return result, saved["prompts"][:n]


def score_vectors(model, vectors, prompts, config, extra=(), pool=None):
    from avec.discover.naturalness import score_naturalness, steered_by_vectors

    steered = steered_by_vectors(model, prompts, vectors, config, progress=True)
    return score_naturalness(model, prompts, [*steered, *extra], vectors[0], config, pool=pool,
                             progress=True, log=log)


PARTS = ("arithmetic", "refusal", "permuted", "random_init")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refusal-model", default=None,
                        help="score experiments/results/melbo/refusal on this fine-tuned "
                             "SmolLM2 refuser (avec refusal make-model) instead of the Qwen run")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to (re)run, of {','.join(PARTS)} (default "
                             f"all; '' to only rebuild the outputs); table.md and naturalness.png "
                             f"are rebuilt "
                             f"from every part's file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice). On cores shared "
                             "with other jobs use 1: two threads that wait on each other while "
                             "the other jobs hold a core ran the same decoding ~10x slower")
    args = parser.parse_args()
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")

    import torch

    from avec.models import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    study = OUT / "study.json"
    meta: dict[str, Any] = json.loads(study.read_text()) if study.is_file() else {}
    config = study_config()
    meta["settings"] = {"n_prompts": N_PROMPTS, "control_prompts": CONTROL_PROMPTS,
                        "control_tokens": CONTROL_TOKENS, "control_random": CONTROL_RANDOM,
                        "control_instructions": list(CONTROL_INSTRUCTIONS),
                        "qwen_prompts": QWEN_PROMPTS,
                        "qwen_tokens": QWEN_TOKENS, "qwen_random": QWEN_RANDOM,
                        "qwen_instructions": list(QWEN_INSTRUCTIONS), "soft_steps": SOFT_STEPS,
                        "soft_prompts": SOFT_PROMPTS,
                        "n_fixed_instructions": len(config.instructions),
                        "control_vectors": CONTROL_VECTORS, "control_steps": CONTROL_STEPS,
                        "control_patience": CONTROL_PATIENCE,
                        **{k: v for k, v in config.__dict__.items() if k != "instructions"}}
    meta["torch_threads"] = torch.get_num_threads()
    model = load_model() if set(parts) - {"refusal"} else None
    for part in parts:
        wall, cpu = time.perf_counter(), time.process_time()
        log(f"part {part}")
        if part == "arithmetic":
            info = arithmetic_part(model, config)
        elif part == "refusal":
            info = refusal_part(args.refusal_model, config)
        else:
            info = control_part(part, model, config)
        info["wall_seconds"] = round(time.perf_counter() - wall, 1)
        info["cpu_seconds"] = round(time.process_time() - cpu, 1)
        meta[part] = info
        # parts may run in parallel processes: merge with what the others wrote meanwhile
        latest = json.loads(study.read_text()) if study.is_file() else {}
        meta = {**latest, **{k: meta[k] for k in ("settings", "torch_threads", *parts)
                            if k in meta}}
        study.write_text(json.dumps(meta, indent=1))
        log(f"part {part}: {info['wall_seconds']:.0f} s wall, {info['cpu_seconds']:.0f} s CPU")
    write_table()
    write_plot()


def study_config(max_new_tokens: int = MAX_NEW_TOKENS, n_random: int = 4,
                 subset: tuple[int, ...] | None = None):
    """The study's naturalness settings, in one place (``subset``: indices into the built-in
    instructions)."""
    from avec.discover.naturalness import INSTRUCTIONS, NaturalnessConfig

    instructions = INSTRUCTIONS if subset is None else tuple(INSTRUCTIONS[i] for i in subset)
    return NaturalnessConfig(n_random=n_random, temperature=0.7, suggestions=1,
                             max_new_tokens=max_new_tokens, instructions=instructions)


def melbo_settings(result) -> Any:
    """The MelboConfig of an earlier run, with its resolved layers."""
    from avec.discover.melbo import MelboConfig

    cfg = {k: result.config[k] for k in MelboConfig.__dataclass_fields__}
    return MelboConfig(**{**cfg, "source_layer": result.source_layer,
                          "target_layer": result.target_layer})


def train_prompts(seed: int) -> list[str]:
    """The arithmetic run's 8 training prompts (`avec discover --arithmetic 8`, its seed)."""
    from avec.discover.report import arithmetic_prompts

    return [i["prompt"] for i in arithmetic_prompts(8, seed)]


def arithmetic_part(model, config) -> dict[str, Any]:
    """The arithmetic run's vectors and the soft prompts, on the default model (one pool)."""
    from safetensors.torch import save_file

    from avec.discover.melbo import MelboConfig
    from avec.discover.naturalness import (InstructionPool, SoftPromptConfig, Steered,
                                           completions, train_soft_prompts)

    result, prompts = run_prompts("arithmetic")
    melbo = melbo_settings(result)
    t0 = time.perf_counter()
    soft_cfg = SoftPromptConfig(tokens=8, count=SOFT_PROMPTS, melbo=MelboConfig(
        **{**melbo.__dict__, "steps": SOFT_STEPS, "patience": CONTROL_PATIENCE}))
    softs = train_soft_prompts(model, train_prompts(melbo.seed), soft_cfg, progress=True)
    save_file({f"soft_{j}": s.embeddings.contiguous() for j, s in enumerate(softs)},
              str(OUT / "soft_prompts.safetensors"))
    log(f"soft prompts: objectives {[f'{s.objective:.3g}' for s in softs]}")
    soft_sets = []
    for j, s in enumerate(softs):
        greedy = completions(model, prompts, soft=s.embeddings,
                             max_new_tokens=config.max_new_tokens, pad=False)
        sampled = completions(model, prompts, soft=s.embeddings, temperature=config.temperature,
                              seed=config.seed + 500 * j, max_new_tokens=config.max_new_tokens)
        soft_sets.append(Steered(f"soft prompt {j}", greedy, sampled))
    soft_seconds = time.perf_counter() - t0
    natural = score_vectors(model, [v.vector for v in result.vectors], prompts, config,
                            extra=soft_sets, pool=InstructionPool(model, prompts, config))
    (OUT / "arithmetic.json").write_text(json.dumps(natural.to_json(), indent=1))
    return {"objectives": [v.objective for v in result.vectors],
            "random_objective_mean": sum(result.random_objectives)
            / len(result.random_objectives),
            "soft_prompts": {"tokens": 8, "norm": float(model.hf.get_input_embeddings().weight
                                                        .detach().norm(dim=-1).mean()),
                             "steps": [s.steps for s in softs],
                             "objectives": [s.objective for s in softs],
                             "seconds": round(soft_seconds, 1)}}


def control_part(kind: str, model, config) -> dict[str, Any]:
    """MELBO on a control copy of the default model (same training prompts and layers;
    CONTROL_VECTORS vectors, CONTROL_STEPS steps), scored the same way on CONTROL_PROMPTS
    prompts and CONTROL_TOKENS tokens."""
    from avec.discover.melbo import MelboConfig, train_melbo
    from avec.discover.naturalness import (layer_permuted_copy, random_init_copy,
                                           residual_norm)
    from avec.discover.report import write_run

    result, prompts = run_prompts("arithmetic", CONTROL_PROMPTS)
    config = study_config(CONTROL_TOKENS, CONTROL_RANDOM, CONTROL_INSTRUCTIONS)
    melbo = melbo_settings(result)
    train = train_prompts(melbo.seed)
    base_norm = residual_norm(model, train, melbo.source_layer)
    extra: dict[str, Any] = {}
    if kind == "random_init":
        copy = random_init_copy(model, seed=0)
    else:
        copy, perms = layer_permuted_copy(model, seed=0)
        extra["permutations"] = perms
    norm = residual_norm(copy, train, melbo.source_layer)
    radius = melbo.radius * norm / base_norm
    cfg = MelboConfig(**{**melbo.__dict__, "radius": radius, "num_vectors": CONTROL_VECTORS,
                         "steps": CONTROL_STEPS, "patience": CONTROL_PATIENCE})
    log(f"{kind}: residual norm at block {melbo.source_layer} {norm:.4g} (default model "
        f"{base_norm:.4g}), radius {radius:.4g}")
    trained = train_melbo(copy, train, cfg, progress=True)
    write_run(OUT / kind, trained, prompts=train)
    natural = score_vectors(copy, [v.vector for v in trained.vectors], prompts, config)
    (OUT / f"{kind}.json").write_text(json.dumps(natural.to_json(), indent=1))
    return {"residual_norm": norm, "default_residual_norm": base_norm, "radius": radius,
            "train_seconds": trained.seconds, "steps": [v.steps for v in trained.vectors],
            "objectives": [v.objective for v in trained.vectors],
            "random_objective_mean": sum(trained.random_objectives)
            / len(trained.random_objectives), **extra}


def refusal_part(directory: str | None, config) -> dict[str, Any]:
    """The refusal run's vectors on the model they were trained on: the Qwen run (default) or
    experiments/results/melbo/refusal on the SmolLM2 refuser in ``directory``."""
    import torch

    from avec.models import load_model

    if directory:
        model, run, name = load_model(directory), "refusal", str(directory)
    else:
        model = load_model(QWEN_MODEL, dtype=torch.bfloat16)
        run, name = QWEN_RUN, f"{QWEN_MODEL} (bfloat16)"
    result, prompts = run_prompts(run, N_PROMPTS if directory else QWEN_PROMPTS)
    if not directory:
        config = study_config(QWEN_TOKENS, QWEN_RANDOM, QWEN_INSTRUCTIONS)
    natural = score_vectors(model, [v.vector for v in result.vectors], prompts, config)
    (OUT / "refusal.json").write_text(json.dumps(natural.to_json(), indent=1))
    return {"model": name, "run": str((RUNS / run).relative_to(ROOT)),
            "objectives": [v.objective for v in result.vectors],
            "random_objective_mean": sum(result.random_objectives)
            / len(result.random_objectives)}


def write_table() -> None:
    """table.md: the naturalness table (vectors x measures) of every scored run, from the JSON
    files in OUT."""
    def f(x, digits=3):
        return "–" if x is None else f"{x:.{digits}f}"

    study = OUT / "study.json"
    meta = json.loads(study.read_text()) if study.is_file() else {}
    refuser = meta.get("refusal", {}).get("model", "")
    lines = []
    for name, title in (("arithmetic", "Arithmetic run (default model) and soft prompts"),
                        ("refusal", f"Refusal run ({refuser})"),
                        ("random_init", "Control: MELBO on a randomly initialised SmolLM2"),
                        ("permuted", "Control: MELBO on SmolLM2 with layer-permuted weights")):
        path = OUT / f"{name}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        fixed = fixed_pool_reach(doc)
        lines += [f"### {title}", "",
                  f"References (mean log-prob per token under the unsteered model): unsteered "
                  f"{f(doc['unsteered_logprob'])}, random same-norm vectors "
                  f"{f(doc['random_logprob'])} (each: "
                  f"{', '.join(f(v) for v in doc['random_logprobs'])}), instructed "
                  f"{f(doc['instructed_logprob'])}; {len(doc['instructions']) - 1} candidate "
                  f"instructions ({len(doc['suggested'])} suggested by the model); "
                  f"{len(doc['prompts'])} prompts, {doc['settings'].get('max_new_tokens')} "
                  f"new tokens.", "",
                  "| | log-prob | reached | unsteered | ceiling | natural | best instruction "
                  "| reached, fixed pool | natural, fixed pool |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r, fx in zip(doc["rows"], fixed):
            lines.append(f"| {r['name']} | {f(r['logprob'])} | {f(r['similarity'])} | "
                         f"{f(r['unsteered'])} | {f(r['ceiling'])} | "
                         f"{'yes' if r['natural'] else 'no'} | "
                         f"{(r['instruction'] or '(plain prompt)').replace('|', '/')[:80]} | "
                         f"{f(fx.similarity)} | {'yes' if fx.natural else 'no'} |")
        lines.append("")
    (OUT / "table.md").write_text("\n".join(lines))


def fixed_pool_reach(doc: dict[str, Any]) -> list[Any]:
    """Each row's reach (avec.discover.naturalness.reach) with the model's own suggestions left
    out: only the plain prompt and the fixed instructions compete (a suggestion often copies
    the steered text, an example rather than an instruction). From the saved completions."""
    import numpy as np

    from avec.discover.naturalness import reach
    from avec.evaluate.concepts import EmbeddingJudge

    judge = EmbeddingJudge()
    texts = doc["completions"]
    names = [c for c in doc["instructions"] if c not in set(doc["suggested"])]
    emb = lambda t: judge.embed(list(t)).numpy()  # noqa: E731
    cand = np.stack([emb(texts["unsteered"] if c == "" else texts[f"instruction: {c}"])
                     for c in names])
    plain = emb(texts["unsteered"])
    return [reach(emb(texts[r["name"]]), cand, names, plain, emb(texts[f"{r['name']} sampled"]))
            for r in doc["rows"]]


TITLES = {"arithmetic": "arithmetic (SmolLM2) + soft prompts", "refusal": "refusal",
          "random_init": "control: random init", "permuted": "control: layers permuted"}


def write_plot() -> None:
    """naturalness.png: per run, each vector's log-prob under the unsteered model (x) against
    the held-out similarity the best instruction reaches (y, filled: natural); dashed lines:
    the unsteered and random-vector log-probs."""
    from avec.report import pyplot, save_figure

    docs = {k: json.loads((OUT / f"{k}.json").read_text()) for k in TITLES
            if (OUT / f"{k}.json").is_file()}
    if not docs:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(docs), figsize=(4.2 * len(docs), 3.8), squeeze=False)
    for ax, (key, doc) in zip(axes[0], docs.items()):
        for r in doc["rows"]:
            if r["logprob"] is None:
                continue
            soft = r["name"].startswith("soft")
            ax.scatter(r["logprob"], r["similarity"], marker="s" if soft else "o",
                       facecolors=("C1" if soft else "C0") if r["natural"] else "none",
                       edgecolors="C1" if soft else "C0")
            ax.annotate(r["name"].split()[-1] if not soft else "s" + r["name"].split()[-1],
                        (r["logprob"], r["similarity"]), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")
        for value, style, label in ((doc["unsteered_logprob"], "k--", "unsteered"),
                                    (doc["random_logprob"], "r:", "random same-norm")):
            if value is not None:
                ax.axvline(value, color=style[0], linestyle=style[1:], label=label)
        ax.set_title(TITLES[key], fontsize=9)
        ax.set_xlabel("log-prob per token under the unsteered model")
        ax.set_ylabel("similarity reached by an instruction")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, OUT / "naturalness.png")


if __name__ == "__main__":
    main()
