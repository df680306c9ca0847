"""Do two steering directions act as independent "shards"? `avec compose` on three settings:

- maze: the maze policy's cheese vector and top-right vector (each test maze's own, as in
  `avec maze top-right`), scored by P(cheese) and P(top-right) at the decision square, 200
  mazes, coefficients -1..1 for both;
- concepts: on the default model (SmolLM2-135M-Instruct), the ocean and the loving-tone vectors
  that `avec tune` made in the tune study (experiments/results/tune/*-other-prompts: mean
  differences of the compare pools, tuned on 16 everyday prompts under KL <= 1; both at layer
  21), at 0, 0.5, 1, 1.5, 2 times their recommended coefficients, scored by the embedding
  judge's similarity to each concept (and keyword rates), on avec's 8 concept prompts, none of
  which the tuning scored;
- melbo: a pair of the unsupervised MELBO vectors of experiments/results/melbo/arithmetic
  (layer 7, norm 8), each vector scored by the keywords its completions showed in that run's
  summary.json, on 8 new arithmetic items (seed 2; MELBO trained on seed 0 and was summarised
  on seed 1), at 0, 0.5, 1, 1.5, 2.

Every language-model study generates 8 prompts x 25 cells = 200 greedy completions of up to 16
tokens.

Each study is one `avec compose` command (printed as it runs); its files go to
experiments/results/compose/<study>/ and a digest of all of them to
experiments/results/compose/study.json.

    nice -n 19 .venv/bin/python experiments/compose_study.py                 # all studies
    nice -n 19 .venv/bin/python experiments/compose_study.py melbo-3-8        # some of them
    .venv/bin/python experiments/compose_study.py --tables [STUDY ...]  # docs tables from the files
    .venv/bin/python experiments/compose_study.py --reanalyse STUDY 1,1  # another operating point
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "compose"
TUNE = ROOT / "experiments" / "results" / "tune"
MELBO = ROOT / "experiments" / "results" / "melbo" / "arithmetic"

# Sizes, cut to what a shared 2-core machine ran in the time there was (see the docs page):
# 8 prompts and a 5 x 5 grid (200 completions per language-model study) of 16 new tokens,
# left-padded into batches of 200 rows (every cell of a prompt in one batch). The prompts are
# avec's 8 concept prompts, which the tune study never scored (it tuned on 16 others), and 8
# new arithmetic items.
PROMPTS = 8
NEW_TOKENS = "16"
BATCH = ["--pad", "--batch-size", "200"]
OCEAN_WORDS = "ocean,sea,wave,beach,shore,tide,coral,sail,boat,whale,dolphin,coast,surf,island"
LOVE_WORDS = "love,joy,kind,happy,warm,wonderful,smile,heart,gentle,beautiful"
# keyword sets read off the MELBO run's completions (summary.json, 32 items, coef 1): the
# share of completions containing them, unsteered -> steered, and where they first appear.
# Vectors 3 and 8 (clusters 3 and 5 there) open their answers in two incompatible ways.
MELBO_SCORES = {
    3: "c*d=keywords:c*d",                       # 1/32 -> 26/32, the third word ("a*b = c*d")
    8: "answer=keywords:the answer is,answer:",  # 0/32 -> 28/32, the first words
}
MELBO_PAIRS = [(3, 8)]
MELBO_TOKENS = "16"
GRID = "0,0.5,1,1.5,2"


def _prompts_file(name: str, prompts: list[str]) -> Path:
    path = OUT / name / "prompts.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def studies() -> dict[str, list[str]]:
    """Each study's `avec compose` arguments."""
    from avec.data.demo import CONCEPT_PROMPTS, NEUTRAL_PROMPTS
    from avec.discover.report import arithmetic_prompts
    from avec.vector import load_vector

    out: dict[str, list[str]] = {
        "maze": ["--maze", "--mazes", "200", "-o", str(OUT / "maze")],
    }
    everyday = _prompts_file("concepts", (CONCEPT_PROMPTS + NEUTRAL_PROMPTS)[:PROMPTS])
    tuned = [TUNE / "ocean-other-prompts" / "ocean.tuned.safetensors",
             TUNE / "tone-other-prompts" / "tone.tuned.safetensors"]
    # read at the tuned strengths (1x), the grid's 2x being beyond the KL budget
    at = ",".join(repr(round(load_vector(v).require_recommended().coef, 6)) for v in tuned)
    out["concepts"] = [
        "--vector", str(tuned[0]), "--vector", str(tuned[1]), f"--at={at}",
        "--score", "ocean=concept:the ocean, the sea, waves and beaches",
        "--score", "love=concept:love, joy and kindness",
        "--extra-score", f"ocean words=keywords:{OCEAN_WORDS}",
        "--extra-score", f"love words=keywords:{LOVE_WORDS}",
        "--prompts", str(everyday), "--max-new-tokens", NEW_TOKENS, *BATCH,
        "-o", str(OUT / "concepts")]
    items = [item["prompt"] for item in arithmetic_prompts(PROMPTS, seed=2)]
    for a, b in MELBO_PAIRS:
        name = f"melbo-{a}-{b}"
        prompts = _prompts_file(name, items)
        out[name] = [
            "--vector", str(MELBO / f"vector_{a:02d}.safetensors"),
            "--vector", str(MELBO / f"vector_{b:02d}.safetensors"),
            "--score", MELBO_SCORES[a], "--score", MELBO_SCORES[b], "--coefs", GRID,
            "--at", "1,1",  # the norm MELBO trained them at (8); at 2 the text degenerates
            "--prompts", str(prompts), "--max-new-tokens", MELBO_TOKENS, *BATCH,
            "-o", str(OUT / name)]
    return out


def digest(name: str) -> dict:
    doc = json.loads((OUT / name / "compose.json").read_text())
    return {"study": name, "seconds": doc.get("seconds"), "cpu_seconds": doc.get("cpu_seconds"),
            **doc["summary"]}


def tables(name: str) -> str:
    """The markdown tables of docs/studies/compose.md for one study, from its compose.json."""
    doc = json.loads((OUT / name / "compose.json").read_text())
    summ, grid = doc["summary"], doc["grid"]
    vecs, at = summ["vectors"], summ["at"]
    own = {t: v for v, t in summ["targets"].items()}
    head = " | ".join(f"{v} alone ({c:g})" for v, c in zip(vecs, at))
    lines = [f"| score | items | unsteered | {head} | together | sum of single | "
             f"interaction (s.e.) | relative error |",
             "|---" * (7 + len(vecs)) + "|"]
    for s, add in summ["additivity"].items():
        label = f"{s} (own score of {own[s]})" if s in own else s
        se = add["interaction_se"]
        rel = add["relative_error"]
        singles = " | ".join(f"{add['single'][v]:+.3f}" for v in vecs)
        lines.append(f"| {label} | {grid['scores'][s]['items']} | {summ['unsteered'][s]:.3f} | "
                     f"{singles} | {add['joint']:+.3f} | {add['sum_of_single']:+.3f} | "
                     f"{add['interaction']:+.3f}" + (f" ({se:.3f})" if se is not None else "")
                     + f" | {'-' if rel is None else f'{rel:.2f}'} |")
    lines += ["", "| score | largest additivity error on the grid (at) | mean over cells with "
              "both on | range of the score over the grid |", "|---|---|---|---|"]
    for s, g in summ["grid_summary"].items():
        where = ", ".join(f"{c:g}" for c in g["at"])
        lines.append(f"| {s} | {g['max_additivity_error']:.3f} ({where}) | "
                     f"{g['mean_additivity_error']:.3f} | {g['score_range']:.3f} |")
    rel = summ["relative_cross_talk"]
    talk = []
    for v in vecs:
        target = summ["targets"][v]
        for s in rel:
            if s in own and s != target and rel[s][v] is not None:  # other vectors' scores
                talk.append(f"{v} on {s}: {rel[s][v]:+.2f}")
    lines += ["", "Cross-talk relative to the vector's own effect: " + "; ".join(talk) + "."]
    cos = [f"{r['a']} . {r['b']} at {r['layer_a'] if r['shared'] else (r['layer_a'], r['layer_b'])}"
           f": {r['cosine']:+.3f}" for r in summ["cosines"] if r["cosine"] is not None]
    lines += ["", "Cosine: " + "; ".join(cos) + "."]
    lines += ["", f"Time: {doc.get('seconds')} s wall, {doc.get('cpu_seconds')} s CPU for the "
              f"grid."]
    return "\n".join(lines)


def reanalyse(name: str, at: str) -> None:
    """Read a finished study's grid (compose.json) at another operating point, without
    generating again; rewrites its compose.json and pictures."""
    import numpy as np

    from avec.evaluate.compose import ScoreGrid, analyse
    from avec.studies.compose.report import write

    doc = json.loads((OUT / name / "compose.json").read_text())
    g = doc["grid"]
    grid = ScoreGrid(tuple(g["vectors"]), tuple(tuple(a) for a in g["coefs"]),
                     tuple(g["targets"][v] for v in g["vectors"]),
                     {s: np.asarray(v["per_item"], dtype=np.float64)
                      for s, v in g["scores"].items()})
    comp = analyse(grid, [float(c) for c in at.split(",")])
    info = {k: v for k, v in doc.items() if k not in ("summary", "grid", "files")}
    title = f"{' + '.join(grid.vectors)} on {doc['model']['name']}" if "model" in doc else ""
    write(OUT / name, comp, doc["summary"]["cosines"], info, title=title)


def main(selected: list[str]) -> None:
    from avec.cli.main import main as avec

    if selected[:1] == ["--reanalyse"]:
        reanalyse(selected[1], selected[2])
        return

    if selected[:1] == ["--tables"]:
        for name in selected[1:] or [p.name for p in sorted(OUT.iterdir()) if p.is_dir()]:
            print(f"### {name}\n\n{tables(name)}\n")
        return
    plan = studies()
    unknown = [s for s in selected if s not in plan]
    if unknown:
        raise SystemExit(f"unknown study {unknown}; choose from {list(plan)}")
    for name in selected or list(plan):
        argv = ["compose", *plan[name]]
        print("$ avec " + " ".join(shlex.quote(a.replace(str(ROOT) + "/", ""))
                                  for a in argv), flush=True)
        t0 = time.perf_counter()
        if avec(argv) != 0:
            raise SystemExit(f"study {name} failed")
        print(f"{name}: {time.perf_counter() - t0:.0f} s in all", flush=True)
    done = [n for n in plan if (OUT / n / "compose.json").is_file()]
    (OUT / "study.json").write_text(json.dumps([digest(n) for n in done], indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
