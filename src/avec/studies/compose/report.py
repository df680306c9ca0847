"""What ``avec compose`` leaves behind: ``compose.json`` (everything, per-item scores included)
and one PNG per pair of vectors (``compose.png`` for two), and the summary it prints."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

from avec.evaluate.compose import Composition, plot_composition
from avec.report import write_json


def picture_names(vectors: Sequence[str]) -> list[tuple[tuple[int, int], str]]:
    """``((i, j), file name)`` of each picture: ``compose.png`` for two vectors, else
    ``compose_<i>_<j>.png`` per pair (the other vectors at 0)."""
    if len(vectors) == 2:
        return [((0, 1), "compose.png")]
    return [((i, j), f"compose_{i}_{j}.png")
            for i, j in itertools.combinations(range(len(vectors)), 2)]


def summary(comp: Composition, cosines: Any) -> dict[str, Any]:
    """The headline numbers (``--json`` output and the top of ``compose.json``)."""
    return {"vectors": list(comp.vectors), "targets": dict(zip(comp.vectors, comp.grid.targets)),
            "at": list(comp.at), "unsteered": dict(comp.base),
            "cross_talk": comp.cross_talk(), "relative_cross_talk": comp.relative_cross_talk(),
            "additivity": comp.additivity(), "grid_summary": comp.grid_summary(),
            "cosines": cosines}


def write(out_dir: str | Path, comp: Composition, cosines: Any, info: dict[str, Any], *,
          title: str = "") -> dict[str, str]:
    """Write ``compose.json`` (``info``, the summary and the full grid) and the pictures;
    returns ``{kind: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for pair, name in picture_names(comp.vectors):
        files[name] = str(plot_composition(comp, out / name, pair=pair, title=title))
    files["json"] = str(out / "compose.json")
    write_json(out / "compose.json", {**info, "summary": summary(comp, cosines),
                                      "grid": comp.to_dict(), "files": files}, indent=1)
    return files


def _f(x: float | None, fmt: str = "{:+.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def text_lines(comp: Composition, cosines: list[dict[str, Any]]) -> list[str]:
    """A readable summary: per score the unsteered value, each vector's effect alone, both
    together, the sum of the single effects and the interaction (with its standard error);
    then the cosines."""
    at = ", ".join(f"{v} {c:g}" for v, c in zip(comp.vectors, comp.at))
    lines = [f"at {at}:"]
    for s, add in comp.additivity().items():
        own = [v for v, t in zip(comp.vectors, comp.grid.targets) if t == s]
        tag = f" (own score of {', '.join(own)})" if own else ""
        lines.append(f"  {s}{tag}: unsteered {comp.base[s]:.3f}")
        for v, e in add["single"].items():
            lines.append(f"    {v} alone {e:+.3f}")
        se = add["interaction_se"]
        lines.append(f"    together {add['joint']:+.3f}; sum of single {add['sum_of_single']:+.3f};"
                     f" interaction {add['interaction']:+.3f}"
                     + (f" (s.e. {se:.3f})" if se is not None else "")
                     + f"; relative error {_f(add['relative_error'], '{:.2f}')}")
    rel = comp.relative_cross_talk()
    targets = set(comp.grid.targets)
    for j, v in enumerate(comp.vectors):  # on the other vectors' own scores
        others = [f"{s} {_f(rel[s][v], '{:+.2f}')}" for s in rel
                  if s in targets and s != comp.grid.targets[j]]
        if others:
            lines.append(f"  cross-talk of {v} (relative to its own effect): "
                         + ", ".join(others))
    for row in cosines:
        where = (f"layer {row['layer_a']}" if row["shared"]
                 else f"layers {row['layer_a']} / {row['layer_b']} (not shared)")
        per_maze = row.get("per_maze")
        spread = (f" (median over {per_maze['mazes']} mazes, each maze's own vectors; range "
                  f"{per_maze['min']:+.3f} .. {per_maze['max']:+.3f})" if per_maze else "")
        lines.append(f"  cosine {row['a']} . {row['b']} at {where}: "
                     f"{_f(row['cosine'], '{:+.3f}')}{spread}")
    return lines
