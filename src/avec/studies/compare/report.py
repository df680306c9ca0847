"""The comparison's files: results.json, two plots (effect vs pairs, effect vs KL) and a
self-contained report.html with sample completions."""

from __future__ import annotations

import html
from dataclasses import asdict
from pathlib import Path
from typing import Any

from avec.report import html_page, img, pyplot, save_figure, write_json
from avec.studies.compare.settings import CompareResult


def write_outputs(result: CompareResult, out_dir: str | Path) -> dict[str, str]:
    """results.json, effect_vs_pairs.png, effect_vs_kl.png and a self-contained report.html."""
    out = Path(out_dir)
    summary = result.summary()
    write_json(out / "results.json", {**asdict(result), "summary": summary})
    _plot_effect_vs_pairs(result, summary, out / "effect_vs_pairs.png")
    _plot_effect_vs_kl(result, out / "effect_vs_kl.png")
    (out / "report.html").write_text(render_report(result, summary, out), encoding="utf-8")
    return {k: str(out / f) for k, f in (("json", "results.json"), ("pairs_plot",
            "effect_vs_pairs.png"), ("kl_plot", "effect_vs_kl.png"), ("html", "report.html"))}


def _colors(result: CompareResult) -> dict[str, str]:
    """One colour per method, the same in both plots."""
    methods = list(dict.fromkeys(r["method"] for r in result.rows))
    return {m: f"C{i}" for i, m in enumerate(methods)}


def _plot_effect_vs_pairs(result: CompareResult, summary: list[dict[str, Any]],
                          path: Path) -> Path:
    plt = pyplot()
    color = _colors(result)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in color:
        rows = [s for s in summary if s["method"] == method]
        xs = [s["n_pairs"] for s in rows]
        ax.errorbar(xs, [s["effect_mean"] for s in rows], yerr=[s["effect_std"] for s in rows],
                    marker="o", capsize=3, label=method, color=color[method])
    ax.set_xscale("log")
    ns = sorted({s["n_pairs"] for s in summary})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("number of contrast pairs")
    ax.set_ylabel(f"best {_label(result)} (KL <= {result.settings['kl_budget']:g})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.legend()
    ax.set_title(f"{result.task['name'] or result.task['kind']}: effect vs pairs "
                 f"(layer {result.settings['layer']})")
    return save_figure(fig, path)


def _label(result: CompareResult) -> str:
    return "A/B p(match) rise" if result.task["kind"] == "ab" else "concept score rise"


def _plot_effect_vs_kl(result: CompareResult, path: Path) -> Path:
    plt = pyplot()
    color = _colors(result)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in color:
        pts = [(k, e - result.baseline) for r in result.rows if r["method"] == method
               for k, e in zip(r["kl"], r["effects"])]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.6, label=method,
                   color=color[method])
    ax.axvline(result.settings["kl_budget"], color="red", lw=0.8, ls="--", label="KL budget")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(left=0)
    ax.set_xlabel("KL on neutral prompts")
    ax.set_ylabel(_label(result))
    ax.legend()
    ax.set_title("effect vs side effect (every coefficient, seed and pair count)")
    return save_figure(fig, path)


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
            knob = (f"{r['best_scale']:g} / {r['best_coef']:g}" if "best_scale" in r
                    else f"{r['best_coef']:g}")
            trs += (f"<tr><th>{html.escape(m)}, {r['n_pairs']} pairs</th><td>{knob}"
                    f"</td><td class=t>{html.escape(r['best_completions'][i])}</td></tr>")
        blocks.append(f"<h3>{html.escape(prompt)}</h3><table><tr><th>direction</th><th>coef"
                      f" (lora: scale; lora+mean_diff: scale / coef)</th><th>greedy "
                      f"completion</th></tr>{trs}</table>")
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


def _cost_html(result: CompareResult, summary: list[dict[str, Any]]) -> str:
    """Seconds and peak extra memory to obtain each intervention, per method and pair count."""
    costed = [x for x in summary if "seconds_mean" in x]
    if not costed:
        return ""
    methods = list(dict.fromkeys(x["method"] for x in costed))
    ns = sorted({x["n_pairs"] for x in costed})
    cell = {(x["method"], x["n_pairs"]): x for x in costed}
    rows = ""
    for m in methods:
        tds = "".join(
            f"<td>{cell[m, n]['seconds_mean']:.2f} s<br><small>CPU "
            f"{cell[m, n].get('cpu_seconds_mean', 0.0):.2f} s, {cell[m, n]['peak_mb_mean']:.0f}"
            f" MB</small></td>" if (m, n) in cell else "<td>–</td>" for n in ns)
        rows += f"<tr><th>{html.escape(m)}</th>{tds}</tr>"
    mach = result.machine
    where = (f" ({mach.get('torch_threads')} torch threads of {mach.get('cpu_count')} CPUs; "
             f"memory: {html.escape(str(mach.get('memory_measure')))})" if mach else "")
    return (f"<h2>What obtaining it cost</h2><p>Wall seconds, CPU seconds (user + system, all "
            f"threads) and peak extra resident memory to obtain one intervention{where}, mean "
            f"over seeds: for steering, reading the "
            f"activations of the cell's own pairs and fitting; for lora, the fine-tuning "
            f"(copy of the model, adapters, optimizer, merge); for lora+mean_diff, that plus "
            f"reading the pairs on the model at the chosen scale and fitting. Evaluation is "
            f"not counted.</p>"
            f"<table><tr><th>method \\ pairs</th>{''.join(f'<th>{n}</th>' for n in ns)}</tr>"
            f"{rows}</table>")


def _finetune_html(result: CompareResult, summary: list[dict[str, Any]]) -> str:
    """How the fine-tuning rows were made, and how they fare as trained (scale 1)."""
    rows = [x for x in summary if "trained_kl_mean" in x]
    if not rows:
        return ""
    s = result.settings
    cells = "".join(
        f"<tr><th>{x['n_pairs']}</th><td>{x['trained_effect_mean']:+.3f}</td>"
        f"<td>{x['trained_kl_mean']:.2f}</td><td>{x['trained_within_budget']} of {x['seeds']}"
        f"</td></tr>" for x in rows)
    scales = ", ".join(f"{c:g}" for c in sorted(set(s.get("lora_scales", ())) | {1.0}))
    return (f"<p><b>Fine-tuning rows.</b> lora: LoRA (rank {s.get('lora_rank')}) trained for "
            f"{s.get('lora_steps')} steps of up to {s.get('lora_batch_size')} examples on the "
            f"positive side of the column's pairs, merged; its coefficient is the scale of the "
            f"learned update (swept over 0, {scales}; 1 = as trained), KL against the base "
            f"model. lora+mean_diff: that model at every scale (0, the base model, included; "
            f"scales over the budget on their own skipped), steered with the mean difference "
            f"of the same pairs read on it at every coefficient, the best (scale, "
            f"coefficient) within the budget; KL against the base model.</p>"
            f"<table><tr><th>lora, pairs</th><th>effect as trained</th><th>KL as trained</th>"
            f"<th>within budget</th></tr>{cells}</table>")


def render_report(result: CompareResult, summary: list[dict[str, Any]], out: Path) -> str:
    s, t = result.settings, result.task
    methods = list(dict.fromkeys(x["method"] for x in summary))
    ns = sorted({x["n_pairs"] for x in summary})
    cell = {(x["method"], x["n_pairs"]): x for x in summary}
    head = "".join(f"<th>{n}</th>" for n in ns)
    rows = ""
    for m in methods:
        tds = ""
        for n in ns:
            x = cell.get((m, n))
            tds += (f"<td>{x['effect_mean']:+.3f} ± {x['effect_std']:.3f}<br><small>KL "
                    f"{x['kl_at_best_mean']:.2f}</small></td>" if x else "<td>–</td>")
        rows += f"<tr><th>{html.escape(m)}</th>{tds}</tr>"
    what = ("A/B p(matching behaviour) (CAA protocol)" if t["kind"] == "ab" else
            (f"embedding similarity of greedy completions to “{html.escape(t['concept'])}”"
             if t["concept"] else f"keyword rate ({html.escape(', '.join(t['keywords']))})"))
    norm_src = ("given" if s.get("norm") else
                f"the norm of the mean-difference vector of all {t['pool_pairs']} pairs")
    source = f" from {html.escape(t['pairs_source'])}" if t.get("pairs_source") else ""
    body = f"""<h1>Steering methods compared: {html.escape(t['name'] or t['kind'])}</h1>
<p>Model: {html.escape(str(result.model.get('name', '?')))} ({result.model.get('n_layers', '?')}
layers, d_model {result.model.get('d_model', '?')}); avec {html.escape(result.avec_version or '?')}.
</p>
<p>Effect: rise of {what} over the unsteered model (baseline {result.baseline:.3f}), at the best
coefficient whose KL divergence on {t['kl_prompts']} neutral prompts stays within
{s['kl_budget']:g}. Layer {s['layer']}; every direction scaled to the same norm
({result.common_norm:.2f}, {norm_src}); pool: {t['pool_pairs']} pairs{source};
coefficients {', '.join(f'{c:g}' for c in s['coefs'])}; {s['seeds']} seeds, each seed the same pair
subset for every method; ActAdd uses one pair, injected at the front positions.</p>
<table><tr><th>method \\ pairs</th>{head}</tr>{rows}</table>{_sae_html(t)}
<p><small>mean ± standard deviation over seeds; KL: mean KL at the chosen coefficient.</small></p>
{_finetune_html(result, summary)}{_cost_html(result, summary)}
{img(out / 'effect_vs_pairs.png', 'effect vs pairs')}
{img(out / 'effect_vs_kl.png', 'effect vs KL')}
{_samples_html(result)}
<p><small>Generated by avec; raw numbers in results.json.</small></p>"""
    return html_page("avec compare", body,
                     css="body{max-width:62em}td,th{border:1px solid #ccc;text-align:center}"
                         "small{color:#666}td.t{text-align:left}")
