"""Markdown tables (method x pairs: mean ± sd over seeds, and the KL at the chosen coefficient)
from `avec compare` results, as pasted into docs/studies/method-comparison.md.

    .venv/bin/python experiments/compare_tables.py experiments/results/compare/*/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ["mean_diff", "pca", "probe", "actadd", "random"]


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    summary = data["summary"]
    ns = sorted({s["n_pairs"] for s in summary})
    methods = sorted({s["method"] for s in summary}, key=lambda m: (ORDER + [m]).index(m))
    cell = {(s["method"], s["n_pairs"]): s for s in summary}
    best = max(s["effect_mean"] for s in summary)
    lines = [f"| method \\ pairs | {' | '.join(str(n) for n in ns)} |",
             "|---|" + "---|" * len(ns)]
    for m in methods:
        row = []
        for n in ns:
            s = cell.get((m, n))
            if s is None:
                row.append("")
                continue
            text = f"{s['effect_mean']:+.3f} ± {s['effect_std']:.3f}"
            row.append(f"**{text}**" if s["effect_mean"] == best else text)
        lines.append(f"| {m} | {' | '.join(row)} |")
    kl = {m: [cell[(m, n)]["kl_at_best_mean"] for n in ns if (m, n) in cell] for m in methods}
    t, st = data["task"], data["settings"]
    head = (f"{t.get('name') or t['kind']}: layer {st['layer']}, baseline {data['baseline']:.3f}, "
            f"pool {t['pool_pairs']} pairs, common norm {data['common_norm']:.2f}, coefficients "
            f"{', '.join(f'{c:g}' for c in st['coefs'][1:])}, {st['seeds']} seeds")
    kls = "; ".join(f"{m} {min(v):.2f}-{max(v):.2f}" for m, v in kl.items())
    return f"{head}\n\n" + "\n".join(lines) + f"\n\nmean KL at the chosen coefficient: {kls}\n"


def main() -> None:
    for arg in sys.argv[1:]:
        print(f"### {arg}\n\n{table(Path(arg))}")


if __name__ == "__main__":
    main()
