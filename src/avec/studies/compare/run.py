"""The fair method comparison: methods x number of pairs x seeds, at equal norm and KL budget.

1. Activations of every pair in the pool are read once at the layer; a (method, n, seed) cell
   fits its direction on a seeded subset of n pairs, the *same* subset for every method.
2. Every direction is scaled to one common norm (by default that of the mean-difference vector
   of the whole pool), so no method wins by being longer.
3. Each direction is swept over the coefficients; the effect is the rise of the behaviour score
   (A/B p(match)) or concept score (embedding similarity or keyword rate of greedy completions)
   over the unsteered model, and its side effect the KL divergence on neutral prompts.
4. A cell's result is its best effect among the coefficients whose KL stays within the budget
   (coefficient 0, no effect, is always within it).

SAE methods pick one latent from the same n pairs. ``sae`` adds its decoder row like any
direction; ``sae_clamp`` clamps the latent to ``coef x common norm`` (in decoder-row units)
inside the SAE, keeping the error term, which equals adding the row at that coefficient where
the latent is off and adds less where it already fires. The SAE's own training data is
reported beside the table as an amortised cost, not counted in the pairs.
"""

from __future__ import annotations

import base64
import html
import json
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from avec._version import __version__
from avec.directions.activations import read_activations
from avec.data.pairs import ContrastPair
from avec.data.templates import pair_texts
from avec.evaluate.ab import ABItem, ab_variants
from avec.evaluate.concepts import EmbeddingJudge, keyword_rate
from avec.evaluate.side_effects import kl_divergence, reference_logprobs
from avec.directions.extract import extract_actadd
from avec.generation.hf import variant_completions
from avec.directions.methods import get_method
from avec.sae.feature import SAEFeature
from avec.models.model import Model
from avec.vector import SteeringVector

DEFAULT_METHODS = ("mean_diff", "pca", "probe", "actadd", "random")
SAE_METHODS = ("sae", "sae_clamp")
"""SAE-feature methods: the picked latent's decoder row added like a vector (``sae``), or the
latent clamped inside the SAE with the error term kept (``sae_clamp``); both need ``sae=``."""


@dataclass
class CompareSettings:
    layer: int
    methods: Sequence[str] = DEFAULT_METHODS
    n_pairs: Sequence[int] = (1, 3, 8, 32, 128, 256)
    seeds: int = 3
    coefs: Sequence[float] = (1.0, 2.0, 3.0, 4.0, 6.0)
    kl_budget: float = 1.0
    norm: float | None = None
    chat: bool = False
    position: str | int = "mean"  # for sentence pairs; CAA A/B pools read "ab_letter"
    max_new_tokens: int = 32
    sae: str | None = None  # SAE directory for the SAE methods (trained at this layer)
    sae_select: str = "selective"  # how the SAE methods rank latents (avec.sae.evaluate)


@dataclass
class Task:
    """What the effect is measured on: A/B items, or prompts + a concept (and/or keywords)."""

    items: Sequence[ABItem] = ()
    prompts: Sequence[str] = ()
    concept: str = ""
    keywords: Sequence[str] = ()
    name: str = ""
    pairs_source: str = ""  # where the pool of pairs came from (file, or synthetic + generator)

    @property
    def kind(self) -> str:
        return "ab" if self.items else "concept"


@dataclass
class CompareResult:
    settings: dict[str, Any]
    task: dict[str, Any]
    baseline: float
    common_norm: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (method, n, seed)
    model: dict[str, Any] = field(default_factory=dict)  # identity of the model compared on
    avec_version: str = ""
    prompts: list[str] = field(default_factory=list)  # concept tasks: the prompts generated from
    unsteered: list[str] = field(default_factory=list)  # ... and their unsteered completions

    def summary(self) -> list[dict[str, Any]]:
        cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in self.rows:
            cells.setdefault((r["method"], r["n_pairs"]), []).append(r)
        out = []
        for (method, n), rs in sorted(cells.items(), key=lambda x: (x[0][0], x[0][1])):
            eff = [r["best_effect"] for r in rs]
            out.append({"method": method, "n_pairs": n, "seeds": len(rs),
                        "effect_mean": statistics.fmean(eff),
                        "effect_std": statistics.pstdev(eff) if len(eff) > 1 else 0.0,
                        "effect_min": min(eff), "effect_max": max(eff),
                        "kl_at_best_mean": statistics.fmean(r["best_kl"] for r in rs)})
        return out


def _scaled(direction: torch.Tensor, norm: float) -> torch.Tensor:
    if direction.dim() == 2:  # ActAdd block: mean row norm = the common norm
        current = direction.norm(dim=-1).mean()
    else:
        current = direction.norm()
    if current == 0:
        raise ValueError("a method returned the zero direction; it cannot be scaled")
    return direction * (norm / current)


def default_layer(model: Model) -> int:
    """A third of the depth (block 10 of 30 on the default model, where mean-difference concept
    vectors from synthetic pairs steered best in a layer scan; see docs/studies/method-comparison.md)."""
    return model.n_layers // 3


def _subset(pool: int, n: int, seed: int) -> list[int]:
    return random.Random(10_007 * seed + n).sample(range(pool), n)


def compare(model: Model, pairs: Sequence[ContrastPair], task: Task, settings: CompareSettings,
            kl_prompts: Sequence[str], *, progress: bool = False) -> CompareResult:
    """Run the comparison; see the module docstring for the protocol."""
    layer = model.check_layers([settings.layer])[0]
    pool = len(pairs)
    n_grid = sorted({n for n in settings.n_pairs if n <= pool})
    if not n_grid:
        raise ValueError(f"every --n-pairs value exceeds the {pool} pairs available")
    sae, sae_info = _load_sae(settings, layer)
    for m in settings.methods:
        if m not in SAE_METHODS:
            get_method(m)  # validate names early
    pos_texts, neg_texts = pair_texts(list(pairs), model, chat=settings.chat)
    acts = read_activations(model, pos_texts + neg_texts, [layer], position=settings.position,
                            progress=progress)[layer]
    pos, neg = acts[:pool], acts[pool:]
    common = settings.norm or float((pos - neg).mean(0).norm())
    latents = None
    if sae is not None and settings.position == "mean":  # latents per token, averaged per text
        from avec.sae.evaluate import text_latents

        both = text_latents(model, sae, layer, pos_texts + neg_texts, "mean")
        latents = (both[:pool], both[pool:])
    cells: list[dict[str, Any]] = []
    vectors: list[SteeringVector | None] = []  # None: an SAE clamp, evaluated by _clamp_runs
    for method in settings.methods:
        for n in n_grid:
            if method == "actadd" and n != 1:
                continue  # ActAdd is the single-pair method
            for seed in range(settings.seeds):
                idx = _subset(pool, n, seed)
                extra: dict[str, Any] = {}
                if method == "actadd":
                    direction = extract_actadd(model, pairs[idx[0]], [layer],
                                               chat=settings.chat)[layer]
                elif method in SAE_METHODS:
                    feature = SAEFeature(sae, by=settings.sae_select)
                    direction = (feature.fit_latents(latents[0][idx], latents[1][idx])
                                 if latents is not None else feature.fit(pos[idx], neg[idx]))
                    extra = {"latent": feature.latent_, "selection_score": feature.score_}
                else:
                    fitter = get_method(method, **({"seed": seed} if method == "random" else {}))
                    direction = fitter.fit(pos[idx], neg[idx])
                vectors.append(None if method == "sae_clamp" else SteeringVector(
                    {layer: _scaled(direction, common)},
                    {"method": method, "n_pairs": n, "seed": seed}))
                cells.append({"method": method, "n_pairs": n, "seed": seed, "pairs": idx,
                              **extra})
    coefs = [0.0, *[float(c) for c in settings.coefs if c != 0]]
    judge = EmbeddingJudge() if task.kind == "concept" and task.concept else None
    added = [v for v in vectors if v is not None]
    effects, texts = _effects(model, task, added or [None], layer, coefs if added else [0.0],
                              settings, progress, judge)
    baseline = effects[0][0]
    unsteered = texts[0][0] if texts else []
    reference = reference_logprobs(model, kl_prompts)
    clamped = _clamp_runs(model, task, sae, layer, {c["latent"] for c in cells
                                                    if c["method"] == "sae_clamp"},
                          coefs[1:], common, settings, kl_prompts, reference, judge, progress)
    result = CompareResult(settings={**asdict(settings), "coefs": coefs},
                           task={"kind": task.kind, "name": task.name, "n_items": len(task.items),
                                 "n_prompts": len(task.prompts), "concept": task.concept,
                                 "keywords": list(task.keywords), "pool_pairs": pool,
                                 "pairs_source": task.pairs_source,
                                 "kl_prompts": len(kl_prompts), **sae_info},
                           baseline=baseline, common_norm=common, model=model.identity(),
                           avec_version=__version__, prompts=list(task.prompts),
                           unsteered=unsteered)
    runs = iter(zip(effects, texts or [None] * len(effects)))
    for cell, vec in tqdm(list(zip(cells, vectors)), desc="KL", disable=not progress,
                          leave=False):
        if vec is None:
            eff, kls, said = clamped[cell["latent"]]
            eff, said = [baseline, *eff], [unsteered, *said]
        else:
            eff, said = next(runs)
            # coefficient 0 is the unsteered model itself (bit-identical logits): its KL is 0
            kls = kl_divergence(model, kl_prompts, vec, layer, coefs[1:], reference=reference)
        kls = [0.0, *kls]
        ok = [(e - baseline, c, k) for e, c, k in zip(eff, coefs, kls) if k <= settings.kl_budget]
        best = max(ok, key=lambda x: x[0])  # coefficient 0 is always within budget
        row = {**cell, "effects": eff, "kl": kls, "best_effect": best[0], "best_coef": best[1],
               "best_kl": best[2]}
        if said:  # completions at the chosen coefficient, to read what the steering does
            row["best_completions"] = said[coefs.index(best[1])]
        result.rows.append(row)
    return result


def _clamp_runs(model: Model, task: Task, sae: Any, layer: int, latents: set[int],
                coefs: list[float], common: float, settings: CompareSettings,
                kl_prompts: Sequence[str], reference: Sequence[torch.Tensor],
                judge: EmbeddingJudge | None, progress: bool
                ) -> dict[int, tuple[list[float], list[float], list[list[str]]]]:
    """For each latent: scores, KLs and (concept tasks) completions with the latent clamped to
    ``c * common / |W_dec[latent]|`` for every nonzero coefficient ``c``, inside the SAE with
    its error term kept. Where the latent is off this adds the decoder row at the same norm as
    an added direction at coefficient ``c``; where it already fires, it adds only the rest."""
    from avec.sae.steer import steer_features

    out: dict[int, tuple[list[float], list[float], list[list[str]]]] = {}
    jobs = [(latent, c) for latent in sorted(latents) for c in coefs]
    for latent, c in tqdm(jobs, desc="SAE clamp", disable=not progress, leave=False):
        effs, kls, said = out.setdefault(latent, ([], [], []))
        value = c * common / float(sae.W_dec[latent].detach().norm())
        with steer_features(model, sae, layer, clamp={latent: value}):
            eff, texts = _effects(model, task, [None], layer, [0.0], settings, False, judge)
            kls.append(kl_divergence(model, kl_prompts, None, layer, [0.0],
                                     reference=reference)[0])
        effs.append(eff[0][0])
        said.append(texts[0][0] if texts else [])
    return out


def _load_sae(settings: CompareSettings, layer: int) -> tuple[Any, dict[str, Any]]:
    """The SAE for the SAE methods, and what it cost to make (its training tokens)."""
    wanted = [m for m in settings.methods if m in SAE_METHODS]
    if not wanted:
        return None, {}
    if not settings.sae:
        raise ValueError(f"the {wanted} method(s) need an SAE: pass --sae DIR (from `avec sae "
                         f"train` or a SAELens directory) trained at the comparison's layer")
    from avec.sae.io import load_sae

    sae = load_sae(settings.sae)
    site = sae.cfg.avec_layer
    if site is not None and site != layer:
        raise ValueError(f"the SAE in {settings.sae} reads layer {site}, but the comparison "
                         f"steers layer {layer}; pass --layer {site}")
    info: dict[str, Any] = {"sae": {"path": str(settings.sae), "d_sae": sae.d_sae,
                                    "k": sae.cfg.k, "select": settings.sae_select}}
    record = Path(settings.sae) / "train.json"
    if record.is_file():
        train = json.loads(record.read_text())
        info["sae"]["training_tokens"] = train.get("n_tokens") or train.get("tokens")
        info["sae"]["training_seconds"] = train.get("seconds")
    return sae, info


def _effects(model: Model, task: Task, vectors: Sequence[SteeringVector | None], layer: int,
             coefs: list[float], settings: CompareSettings, progress: bool,
             judge: EmbeddingJudge | None) -> tuple[list[list[float]], list[list[list[str]]]]:
    """Scores ``[vector][coef]``, and for concept tasks the completions ``[vector][coef][prompt]``
    (empty for A/B tasks). A ``None`` vector (coefficient 0 only) is the model as it is, with
    any steering already in force (the SAE clamp)."""
    if task.kind == "ab":
        scores = ab_variants(model, task.items, [(v, layer) for v in vectors], coefs,
                             progress=progress)
        return scores.mean(-1).tolist(), []
    if not task.prompts or not (task.concept or task.keywords):
        raise ValueError("a concept comparison needs prompts and a concept or keywords")
    variants = [(vec, c) for vec in vectors for c in coefs]
    texts = variant_completions(model, task.prompts, variants,
                                max_new_tokens=settings.max_new_tokens, progress=progress)
    if judge is not None:
        flat = judge.scores([t for row in texts for t in row], task.concept)
        per_prompt = len(task.prompts)
        scores = [sum(flat[k * per_prompt:(k + 1) * per_prompt]) / per_prompt
                  for k in range(len(variants))]
    else:
        scores = [keyword_rate(row, task.keywords) for row in texts]
    n = len(coefs)
    return ([scores[k * n:(k + 1) * n] for k in range(len(vectors))],
            [texts[k * n:(k + 1) * n] for k in range(len(vectors))])


def load_result(path: str | Path) -> CompareResult:
    """Read a ``results.json`` back (to re-render plots and the report)."""
    data = json.loads(Path(path).read_text())
    data.pop("summary", None)
    return CompareResult(**data)


def _png_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_outputs(result: CompareResult, out_dir: str | Path) -> dict[str, str]:
    """results.json, effect_vs_pairs.png, effect_vs_kl.png and a self-contained report.html."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    (out / "results.json").write_text(json.dumps(
        {**asdict(result), "summary": summary}, indent=2))
    label = "A/B p(match) rise" if result.task["kind"] == "ab" else "concept score rise"
    methods = list(dict.fromkeys(r["method"] for r in result.rows))
    color = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in both plots
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in methods:
        rows = [s for s in summary if s["method"] == method]
        xs = [s["n_pairs"] for s in rows]
        ax.errorbar(xs, [s["effect_mean"] for s in rows], yerr=[s["effect_std"] for s in rows],
                    marker="o", capsize=3, label=method, color=color[method])
    ax.set_xscale("log")
    ns = sorted({s["n_pairs"] for s in summary})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("number of contrast pairs")
    ax.set_ylabel(f"best {label} (KL <= {result.settings['kl_budget']:g})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.legend()
    ax.set_title(f"{result.task['name'] or result.task['kind']}: effect vs pairs "
                 f"(layer {result.settings['layer']})")
    fig.tight_layout()
    fig.savefig(out / "effect_vs_pairs.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in methods:
        pts = [(k, e - result.baseline) for r in result.rows if r["method"] == method
               for k, e in zip(r["kl"], r["effects"])]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.6, label=method,
                   color=color[method])
    ax.axvline(result.settings["kl_budget"], color="red", lw=0.8, ls="--", label="KL budget")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(left=0)
    ax.set_xlabel("KL on neutral prompts")
    ax.set_ylabel(label)
    ax.legend()
    ax.set_title("effect vs side effect (every coefficient, seed and pair count)")
    fig.tight_layout()
    fig.savefig(out / "effect_vs_kl.png", dpi=120)
    plt.close(fig)
    (out / "report.html").write_text(render_report(result, summary, out), encoding="utf-8")
    return {k: str(out / f) for k, f in (("json", "results.json"), ("pairs_plot",
            "effect_vs_pairs.png"), ("kl_plot", "effect_vs_kl.png"), ("html", "report.html"))}


def _samples_html(result: CompareResult, n_prompts: int = 3) -> str:
    """Completions at the chosen coefficient: seed 0 of each method at its largest pair count."""
    if not result.unsteered or not result.prompts:
        return ""
    picks: dict[str, dict[str, Any]] = {}
    for r in result.rows:
        if r["seed"] == 0 and "best_completions" in r and (
                r["method"] not in picks or r["n_pairs"] > picks[r["method"]]["n_pairs"]):
            picks[r["method"]] = r
    blocks = []
    for i, prompt in enumerate(result.prompts[:n_prompts]):
        plain = html.escape(result.unsteered[i])
        trs = f"<tr><th>unsteered</th><td></td><td class=t>{plain}</td></tr>"
        for m, r in picks.items():
            trs += (f"<tr><th>{html.escape(m)}, {r['n_pairs']} pairs</th><td>{r['best_coef']:g}"
                    f"</td><td class=t>{html.escape(r['best_completions'][i])}</td></tr>")
        blocks.append(f"<h3>{html.escape(prompt)}</h3><table><tr><th>direction</th><th>coef"
                      f"</th><th>greedy completion</th></tr>{trs}</table>")
    return ("<h2>What the steering does</h2><p>Greedy completions at each direction's chosen "
            "coefficient (within the KL budget; coefficient 0 means no coefficient was both "
            "useful and within budget), seed 0, largest pair count.</p>" + "".join(blocks))


def _sae_html(task: dict[str, Any]) -> str:
    """What the SAE rows cost beyond their pairs: the SAE's own training data and time."""
    sae = task.get("sae")
    if not sae:
        return ""
    tokens = sae.get("training_tokens")
    seconds = sae.get("training_seconds")  # train.json's {"collect", "train", ..., "total"}
    if isinstance(seconds, dict):  # to make it: everything but the evaluation afterwards
        seconds = (seconds["total"] - seconds.get("evaluate", 0.0)) if "total" in seconds else None
    cost = (f"{tokens:,} tokens" if tokens else "unknown data (no train.json)") + (
        f", {seconds / 60:.1f} min to make (corpus, activations, training)" if seconds else "")
    return (f"<p><b>SAE rows</b> (sae: the latent's decoder row added; sae_clamp: the latent "
            f"clamped to coef × the common norm inside the SAE, error term kept): the latent is "
            f"picked from the column's pairs ({html.escape(str(sae.get('select', '?')))} "
            f"ranking), from an SAE of {sae.get('d_sae')} latents (k={sae.get('k')}) at "
            f"{html.escape(str(sae.get('path')))}, whose training cost {cost}: a cost paid "
            f"once and amortised over every concept, not counted in the pair columns.</p>")


def render_report(result: CompareResult, summary: list[dict[str, Any]], out: Path) -> str:
    s, t = result.settings, result.task
    methods = list(dict.fromkeys(x["method"] for x in summary))
    ns = sorted({x["n_pairs"] for x in summary})
    cell = {(x["method"], x["n_pairs"]): x for x in summary}
    head = "".join(f"<th>{n}</th>" for n in ns)
    body = ""
    for m in methods:
        tds = ""
        for n in ns:
            x = cell.get((m, n))
            tds += (f"<td>{x['effect_mean']:+.3f} ± {x['effect_std']:.3f}<br><small>KL "
                    f"{x['kl_at_best_mean']:.2f}</small></td>" if x else "<td>–</td>")
        body += f"<tr><th>{html.escape(m)}</th>{tds}</tr>"
    what = ("A/B p(matching behaviour) (CAA protocol)" if t["kind"] == "ab" else
            (f"embedding similarity of greedy completions to “{html.escape(t['concept'])}”"
             if t["concept"] else f"keyword rate ({html.escape(', '.join(t['keywords']))})"))
    norm_src = ("given" if s.get("norm") else
                f"the norm of the mean-difference vector of all {t['pool_pairs']} pairs")
    source = f" from {html.escape(t['pairs_source'])}" if t.get("pairs_source") else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>avec compare</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:62em;line-height:1.45}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.35em .6em;
text-align:center}}small{{color:#666}}img{{max-width:100%}}td.t{{text-align:left}}</style></head><body>
<h1>Steering methods compared: {html.escape(t['name'] or t['kind'])}</h1>
<p>Model: {html.escape(str(result.model.get('name', '?')))} ({result.model.get('n_layers', '?')}
layers, d_model {result.model.get('d_model', '?')}); avec {html.escape(result.avec_version or '?')}.
</p>
<p>Effect: rise of {what} over the unsteered model (baseline {result.baseline:.3f}), at the best
coefficient whose KL divergence on {t['kl_prompts']} neutral prompts stays within
{s['kl_budget']:g}. Layer {s['layer']}; every direction scaled to the same norm
({result.common_norm:.2f}, {norm_src}); pool: {t['pool_pairs']} pairs{source};
coefficients {', '.join(f'{c:g}' for c in s['coefs'])}; {s['seeds']} seeds, each seed the same pair
subset for every method; ActAdd uses one pair, injected at the front positions.</p>
<table><tr><th>method \\ pairs</th>{head}</tr>{body}</table>{_sae_html(t)}
<p><small>mean ± standard deviation over seeds; KL: mean KL at the chosen coefficient.</small></p>
<img src="data:image/png;base64,{_png_b64(out / 'effect_vs_pairs.png')}" alt="effect vs pairs">
<img src="data:image/png;base64,{_png_b64(out / 'effect_vs_kl.png')}" alt="effect vs KL">
{_samples_html(result)}
<p><small>Generated by avec; raw numbers in results.json.</small></p></body></html>"""
