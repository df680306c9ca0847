"""Making sense of K discovered vectors: steered completions, clusters of what they do,
behaviour scores and an HTML page to skim.

Vectors are grouped by their completions: each completion is embedded with the offline
all-MiniLM-L6-v2 judge, a vector is the mean of its completions' embeddings, and vectors are
clustered by average-linkage agglomeration on cosine distance (stop when the closest clusters
are farther apart than ``threshold``).
"""

from __future__ import annotations

import html
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from avec.discover.melbo import MelboResult
from avec.generation.hf import variant_completions
from avec.models.model import Model
from avec.report import write_html, write_json


@dataclass(frozen=True)
class Behaviour:
    """A named behaviour scored on completions: keyword rate, or refusal substrings when
    ``keywords`` is empty and the name is ``refusal``."""

    name: str
    keywords: tuple[str, ...] = ()

    def score(self, texts: Sequence[str]) -> float:
        if not self.keywords:
            from avec.evaluate.refusal import refusal_rate

            return refusal_rate(texts)
        from avec.evaluate.concepts import keyword_rate

        return keyword_rate(texts, self.keywords)


def parse_behaviour(spec: str) -> Behaviour:
    """``NAME=word1,word2`` (keyword set) or ``refusal`` (the refusal-direction substrings)."""
    name, _, words = spec.partition("=")
    keywords = tuple(w.strip() for w in words.split(",") if w.strip())
    if not name.strip() or (not keywords and name.strip() != "refusal"):
        raise ValueError(f"behaviour {spec!r}: use NAME=word1,word2 or 'refusal'")
    return Behaviour(name.strip(), keywords)


def arithmetic_prompts(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """MELBO's arithmetic items: ``a=x+y, b=z+w. What is a*b?`` with digits 1-9 and the answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        x, y, z, w = (rng.randint(1, 9) for _ in range(4))
        out.append({"prompt": f"a={x}+{y}, b={z}+{w}. What is a*b?",
                    "answer": str((x + y) * (z + w))})
    return out


def answer_accuracy(texts: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of completions in which the answer appears as a whole number."""
    hits = sum(bool(re.search(rf"(?<![\d.]){re.escape(a)}(?![\d])", t))
               for t, a in zip(texts, answers))
    return hits / max(len(texts), 1)


def cluster(embeddings: np.ndarray, threshold: float = 0.25) -> list[int]:
    """Average-linkage agglomerative clustering on cosine distance; cluster ids by size."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)
    dist = 1.0 - x @ x.T
    groups: list[list[int]] = [[i] for i in range(len(x))]
    while len(groups) > 1:
        best, pair = np.inf, (0, 0)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                d = float(dist[np.ix_(groups[a], groups[b])].mean())
                if d < best:
                    best, pair = d, (a, b)
        if best > threshold:
            break
        a, b = pair
        groups[a] = groups[a] + groups[b]
        del groups[b]
    groups.sort(key=lambda g: (-len(g), g[0]))
    labels = [0] * len(x)
    for label, group in enumerate(groups):
        for i in group:
            labels[i] = label
    return labels


@dataclass
class Summary:
    rows: list[dict[str, Any]]
    unsteered: dict[str, Any]
    clusters: list[dict[str, Any]]
    prompts: list[str]
    completions: list[list[str]]  # [0] unsteered, [k + 1] vector k; each [prompt]
    answers: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"unsteered": self.unsteered, "vectors": self.rows, "clusters": self.clusters,
                "prompts": self.prompts, "answers": self.answers,
                "completions": self.completions}


def summarize(model: Model, result: MelboResult, prompts: Sequence[str], *,
              answers: Sequence[str] | None = None, behaviours: Sequence[Behaviour] = (),
              max_new_tokens: int = 48, threshold: float = 0.08, batch_size: int = 32,
              chat: bool | None = None, progress: bool = False) -> Summary:
    """Steered completions of every vector on ``prompts`` (greedy), their clusters and scores."""
    from avec.evaluate.concepts import EmbeddingJudge

    variants = [(None, 0.0)] + [(v.vector, 1.0) for v in result.vectors]
    texts = variant_completions(model, prompts, variants, max_new_tokens=max_new_tokens,
                                chat=chat, batch_size=batch_size, progress=progress)

    def scores(completions: list[str]) -> dict[str, float]:
        out = {b.name: round(b.score(completions), 4) for b in behaviours}
        if answers is not None:
            out["accuracy"] = round(answer_accuracy(completions, answers), 4)
        return out

    judge = EmbeddingJudge()
    per_vector = [judge.embed(t).mean(0).numpy() for t in texts[1:]]
    base = judge.embed(texts[0]).mean(0).numpy()
    labels = cluster(np.stack(per_vector), threshold) if per_vector else []
    cosines = result.cosines()
    rows = []
    for k, item in enumerate(result.vectors):
        others = [abs(c) for j, c in enumerate(cosines[k]) if j != k]
        shift = 1.0 - float(per_vector[k] @ base / (np.linalg.norm(per_vector[k])
                                                    * np.linalg.norm(base)))
        rows.append({"index": k, "objective": round(item.objective, 4), "steps": item.steps,
                     "cluster": labels[k], "max_abs_cosine": round(max(others, default=0.0), 6),
                     "distance_from_unsteered": round(shift, 4), **scores(texts[k + 1])})
    clusters = []
    for label in sorted(set(labels)):
        members = [k for k in range(len(labels)) if labels[k] == label]
        picks = [(members[j % len(members)], j) for j in range(min(3, len(prompts)))]
        clusters.append({"cluster": label, "vectors": members,
                         "examples": [{"vector": k, "prompt": i, "text": texts[k + 1][i]}
                                      for k, i in picks]})
    return Summary(rows, {"objective": 0.0, **scores(texts[0])}, clusters, list(prompts), texts,
                   list(answers) if answers is not None else None)


def write_report(out: Path, result: MelboResult, summary: Summary,
                 naturalness: Any = None) -> Path:
    """``report.html``: the run's settings, a table of vectors, clusters with examples, the
    naturalness table if measured (a :class:`~avec.discover.naturalness.Naturalness`), and
    every completion side by side with the unsteered one."""
    esc = html.escape
    randoms = result.random_objectives
    score_keys = [k for k in (summary.rows[0] if summary.rows else {})
                  if k not in ("index", "objective", "steps", "cluster", "max_abs_cosine",
                               "distance_from_unsteered")]
    head = "".join(f"<th>{esc(k)}</th>" for k in
                   ["vector", "objective", "× random", "cluster", "max |cos|", "text shift",
                    *score_keys])
    mean_random = float(np.mean(randoms)) if randoms else float("nan")
    body = []
    for row in summary.rows:
        cells = [row["index"], f"{row['objective']:.4g}", f"{row['objective'] / mean_random:.1f}",
                 row["cluster"], f"{row['max_abs_cosine']:.2g}",
                 f"{row['distance_from_unsteered']:.3f}", *[row[k] for k in score_keys]]
        body.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    base_cells = ["unsteered", "", "", "", "", "", *[summary.unsteered.get(k, "")
                                                     for k in score_keys]]
    body.insert(0, "<tr class=base>" + "".join(f"<td>{esc(str(c))}</td>" for c in base_cells)
                + "</tr>")
    clusters = []
    for c in summary.clusters:
        examples = "".join(f"<li>vector {e['vector']} on <b>{esc(summary.prompts[e['prompt']])}"
                           f"</b><br>{esc(e['text'])}</li>" for e in c["examples"])
        clusters.append(f"<h3>cluster {c['cluster']}: vectors {c['vectors']}</h3>"
                        f"<ul>{examples}</ul>")
    details = []
    for k, row in enumerate(summary.rows):
        items = "".join(f"<tr><td>{esc(p)}</td><td>{esc(summary.completions[0][i])}</td>"
                        f"<td>{esc(summary.completions[k + 1][i])}</td></tr>"
                        for i, p in enumerate(summary.prompts))
        details.append(f"<details><summary>vector {k} (cluster {row['cluster']}, objective "
                       f"{row['objective']:.4g})</summary><table><tr><th>prompt</th>"
                       f"<th>unsteered</th><th>steered</th></tr>{items}</table></details>")
    cfg = result.config
    page = f"""<h1>MELBO: {len(result.vectors)} unsupervised steering vectors</h1>
<p>source layer {result.source_layer} → target layer {result.target_layer}, radius {cfg['radius']},
p={cfg['p']}, q={cfg['q']}, target positions {esc(str(cfg['positions']))},
{len(summary.prompts)} prompts, seed {cfg['seed']}; {result.seconds:.0f} s,
{result.seconds_per_step:.3f} s per step. Random vectors of the same norm reach a mean objective
of {mean_random:.4g}. "text shift" is 1 − cosine between the mean embedding of the steered and
the unsteered completions.</p>
<table><tr>{head}</tr>{''.join(body)}</table>
<h2>Clusters (by the meaning of the steered completions)</h2>{''.join(clusters)}
{_naturalness_html(naturalness) if naturalness is not None else ""}
<h2>Every completion</h2>{''.join(details)}"""
    return write_html(out / "report.html", "avec discover", page,
                      css="body{font-size:14px;max-width:1200px}td,th{border:1px solid #ccc}"
                          "tr.base{background:#f4f4f4}li{margin:.4em 0}")


def _naturalness_html(natural: Any) -> str:
    esc = html.escape

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    rows = "".join(
        f"<tr><td>{esc(r['name'])}</td><td>{f(r['logprob'])}</td><td>{f(r['similarity'])}</td>"
        f"<td>{f(r['unsteered'])}</td><td>{f(r['ceiling'])}</td>"
        f"<td>{'yes' if r['natural'] else 'no'}</td>"
        f"<td>{esc(r['instruction'] or '(plain prompt)')}</td></tr>" for r in natural.rows)
    return f"""<h2>Naturalness ({len(natural.prompts)} prompts)</h2>
<p>log-prob: mean per-token log-probability of the steered completions under the unsteered
model, against {f(natural.unsteered_logprob)} for its own greedy completions,
{f(natural.random_logprob)} for random vectors of the same norm and
{f(natural.instructed_logprob)} for completions written under one of the
{len(natural.instructions) - 1} candidate instructions. Reached: held-out similarity of the
best instruction's completions to the steered ones (chosen on the other half); natural when it
reaches the ceiling, the vector's own sampled completions' similarity.</p>
<table><tr><th>vector</th><th>log-prob</th><th>reached</th><th>unsteered</th><th>ceiling</th>
<th>natural</th><th>best instruction</th></tr>{rows}</table>"""


def load_run(directory: str | Path) -> tuple[MelboResult, list[str]]:
    """A run written by :func:`write_run` (its vectors and record) and its training prompts."""
    from avec.discover.melbo import MelboVector
    from avec.vector import load_vector

    directory = Path(directory)
    path = directory / "melbo.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; point --from at a directory written by "
                                f"`avec discover`")
    record = json.loads(path.read_text())
    vectors = [MelboVector(v["index"], load_vector(directory / f"vector_{v['index']:02d}"
                                                   ".safetensors"),
                           v["objective"], v["steps"], v.get("history", []))
               for v in record["vectors"]]
    result = MelboResult(record["config"], record["source_layer"], record["target_layer"],
                         vectors, record["random_objectives"], record["seconds"],
                         record["seconds_per_step"])
    return result, list(record.get("prompts", []))


def write_run(out: Path, result: MelboResult, summary: Summary | None = None,
              prompts: Sequence[str] = (), naturalness: Any = None) -> list[Path]:
    """Vector files ``vector_K.safetensors``, ``melbo.json`` (objectives, histories, cosines,
    training prompts), with a summary ``summary.json`` and ``report.html``, and with a
    :class:`~avec.discover.naturalness.Naturalness` ``naturalness.json``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in result.vectors:
        paths.append(item.vector.save(out / f"vector_{item.index:02d}.safetensors"))
    record = {"config": result.config, "source_layer": result.source_layer,
              "target_layer": result.target_layer, "seconds": result.seconds,
              "seconds_per_step": result.seconds_per_step,
              "random_objectives": [round(r, 4) for r in result.random_objectives],
              "prompts": list(prompts),
              "cosines": [[round(c, 6) for c in row] for row in result.cosines()],
              "vectors": [{"index": v.index, "objective": round(v.objective, 4),
                           "steps": v.steps, "history": v.history} for v in result.vectors]}
    write_json(out / "melbo.json", record, indent=1)
    paths.append(out / "melbo.json")
    if summary is not None:
        write_json(out / "summary.json", summary.to_json(), indent=1)
        paths += [out / "summary.json", write_report(out, result, summary, naturalness)]
    if naturalness is not None:
        write_json(out / "naturalness.json", naturalness.to_json(), indent=1)
        paths.append(out / "naturalness.json")
    return [Path(p) for p in paths]
