"""What ``avec tune`` writes: ``tune.json`` (every point), the heatmaps (side effect over layers x
doses with each layer's frontier marked, score at the frontier and its fractions), an HTML
report with sample completions, and the vector re-saved with its ``recommended`` setting."""

from __future__ import annotations

import datetime as _dt
import html
import math
from pathlib import Path
from typing import Sequence

from avec._version import __version__
from avec.models.model import Model
from avec.report import heatmap, img, write_html, write_json
from avec.tuning.search import Point, TuneResult, band_key
from avec.vector import Recommendation, SteeringVector


def recommendation(result: TuneResult, model: Model) -> Recommendation:
    """The ``recommended`` block for a tuned vector: the setting, and how it was measured. The
    coefficient is per layer (a band's is split across it), so the file's own directions at
    ``layers`` times ``coef`` are exactly the setting that was measured."""
    held = result.held_out
    return Recommendation(
        layers=tuple(result.layers), coef=round(result.layer_coef, 6), op="add",
        positions="all",
        details={
            "budget": {**result.budget, "value": round(result.budget_value, 6)},
            "score": {**result.score, "held_in": round(result.score_held_in, 6),
                      "unsteered_held_in": round(result.unsteered_held_in, 6),
                      **({"held_out": round(held.steered, 6),
                          "unsteered_held_out": round(held.unsteered, 6),
                          "held_out_effect_95": [round(x, 6) for x in held.interval]}
                         if held is not None else {})},
            "model": model.identity() if hasattr(model, "identity") else {"name": model.name},
            "measured": {"by": "avec tune", "avec_version": __version__,
                         "date": _dt.date.today().isoformat(), "dose": round(result.dose, 6),
                         "seed": result.config.get("seed", 0),
                         "points": len(result.points), "seconds": round(result.seconds, 1)},
        })


def _rows(points: Sequence[Point]) -> list[tuple[int, ...]]:
    return sorted({p.layers for p in points}, key=lambda b: (len(b), b))


def plot(result: TuneResult, out_dir: Path) -> dict[str, Path]:
    """``tune_budget.png`` (side effect on the dose grid, frontier cells in brackets, the
    choice starred) and ``tune_score.png`` (held-in score at each setting's frontier and at
    the fractions of it that were scored)."""
    rows = _rows(result.points)
    doses = sorted({round(p.dose, 4) for p in result.points if p.stage == "grid"})
    grid = [[math.nan] * len(doses) for _ in rows]
    for p in result.points:
        if p.stage == "grid":
            grid[rows.index(p.layers)][doses.index(round(p.dose, 4))] = p.budget
    marks = []  # every value; the frontier cell (last within the budget) in brackets
    for i in range(len(rows)):
        inside = [j for j in range(len(doses)) if math.isfinite(grid[i][j])
                  and grid[i][j] <= result.budget["max"]]
        for j in range(len(doses)):
            if math.isfinite(grid[i][j]):
                text = f"{grid[i][j]:.2f}"
                marks.append((i, j, f"[{text}]" if inside and j == max(inside) else text))
    chosen_row = rows.index(tuple(result.layers))
    near = min(range(len(doses)), key=lambda j: abs(math.log(doses[j] / result.dose)))
    paths = {"budget": heatmap(
        grid, out_dir / "tune_budget.png", rows=[band_key(b) for b in rows],
        cols=[f"{d:g}" for d in doses], xlabel="dose (steering norm / residual norm)",
        ylabel="layer(s)", colorbar=f"{result.budget['metric']} (max {result.budget['max']:g})",
        title=f"side effect; [x] = last dose within the budget, * = choice (dose "
              f"{result.dose:.3g})", marks=marks, star=(chosen_row, near), cmap="viridis",
        annotate=None)}
    fractions = sorted({round(p.coef / result.frontier[band_key(p.layers)], 2)
                        for p in result.points if p.score is not None
                        and result.frontier.get(band_key(p.layers))})
    scored_rows = [b for b in rows if any(p.score is not None and p.layers == b
                                          for p in result.points)]
    sgrid = [[math.nan] * len(fractions) for _ in scored_rows]
    star = None
    for p in result.points:
        if p.score is None:
            continue
        i = scored_rows.index(p.layers)
        j = fractions.index(round(p.coef / result.frontier[band_key(p.layers)], 2))
        sgrid[i][j] = p.score
        if p.layers == tuple(result.layers) and math.isclose(p.coef, result.coef):
            star = (i, j)
    paths["score"] = heatmap(
        sgrid, out_dir / "tune_score.png", rows=[band_key(b) for b in scored_rows],
        cols=[f"{f:g} x F" for f in fractions], xlabel="coefficient (fraction of the frontier)",
        ylabel="layer(s)", colorbar=f"held-in {result.score['metric']} score",
        title=f"score (unsteered {result.unsteered_held_in:.3g}); * = choice", star=star)
    return paths


def write(result: TuneResult, vector: SteeringVector, model: Model, out_dir: str | Path, *,
          prompts: Sequence[str] = (), vector_name: str = "tuned.safetensors"
          ) -> dict[str, str]:
    """Write ``tune.json``, the two heatmaps, ``report.html`` (with the held-out completions,
    ``prompts`` being the held-out prompts) and the tuned vector; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec = recommendation(result, model)
    tuned = vector.with_recommendation(rec)
    paths: dict[str, Path] = {"vector": tuned.save(out / vector_name)}
    doc = {**result.to_dict(), "recommended": rec.to_dict(), "avec_version": __version__}
    paths["json"] = write_json(out / "tune.json", doc)
    paths.update(plot(result, out))
    paths["html"] = write_html(out / "report.html", "avec tune",
                               _body(result, rec, result.samples, prompts, paths))
    return {k: str(v) for k, v in paths.items()}


def _body(result: TuneResult, rec: Recommendation, samples: dict[str, list[str]],
          prompts: Sequence[str], paths: dict[str, Path]) -> str:
    held = result.held_out
    e = html.escape
    rows = [("layer(s)", ", ".join(map(str, result.layers))),
            ("coefficient", f"{result.layer_coef:.4g} per layer (dose {result.dose:.3g})"),
            (f"side effect ({result.budget['metric']})",
             f"{result.budget_value:.3g} (budget {result.budget['max']:g})"),
            (f"held-in {result.score['metric']} score",
             f"{result.score_held_in:.3g} (unsteered {result.unsteered_held_in:.3g})")]
    if held is not None:
        kept = f"{held.kept:.0%}" if held.kept is not None else "n/a"
        rows.append((f"held-out score ({held.items} items)",
                     f"{held.steered:.3g} (unsteered {held.unsteered:.3g}); effect "
                     f"{held.effect:+.3g}, 95% bootstrap interval [{held.interval[0]:+.3g}, "
                     f"{held.interval[1]:+.3g}]; {kept} of the held-in effect kept"))
    rows.append(("search", f"{len(result.points)} points in {result.seconds:.0f} s"))
    table = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    body = [f"<table>{table}</table>", img(paths["budget"], "side effect"),
            img(paths["score"], "score")]
    if samples:
        names = {"unsteered": "unsteered", "1x": "the chosen coefficient",
                 "2x": "twice the chosen coefficient"}
        head = "".join(f"<th>{e(names.get(k, k))}</th>" for k in samples)
        lines = []
        for i, p in enumerate(prompts):
            cells = "".join(f"<td>{e(v[i])}</td>" for v in samples.values() if i < len(v))
            lines.append(f"<tr><th>{e(p)}</th>{cells}</tr>")
        body.append(f"<h2>Held-out completions</h2><table><tr><th>prompt</th>{head}</tr>"
                    f"{''.join(lines)}</table>")
    body.append(f"<h2>Recommended block</h2><pre>{e(str(rec.to_dict()))}</pre>")
    return "\n".join(body)


__all__ = ["plot", "recommendation", "write"]
