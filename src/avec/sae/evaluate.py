"""How good an SAE is inside the model, and which latents a concept moves.

:func:`reconstruction_loss_increase` splices the SAE's reconstruction into the forward pass and
measures the model's next-token loss; :func:`rank_latents` ranks latents by how much more they
fire on positive than on negative texts; :func:`latent_top_examples` finds the texts and tokens
where given latents fire most (for :func:`avec.evaluate.top_examples.render_html`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from avec.directions.activations import layer_outputs, pad_batch
from avec.evaluate.top_examples import TopExample, peak_token
from avec.models.hooks import block_output, installed_hooks, replace_block_output
from avec.models.model import Model
from avec.sae.model import SAEError, SparseAutoencoder
from avec.sae.steer import check_fit

Splice = Callable[[torch.Tensor], torch.Tensor]


def _batch_ce(model: Model, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
              replaced: torch.Tensor, layer: int, splice: Splice | None) -> tuple[float, int]:
    """Summed next-token cross-entropy over the predictions made at ``replaced`` positions
    (that have a next real token), with block ``layer``'s output there set to ``splice(h)``."""
    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        hidden = block_output(output)
        new = splice(hidden).to(hidden.dtype)
        return replace_block_output(output, torch.where(replaced.unsqueeze(-1), new, hidden))

    with installed_hooks() as hooks:
        if splice is not None:
            hooks.forward(model.blocks[layer], hook, prepend=True)
        logits = model.hf(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                          use_cache=False).logits
    predicts = replaced[:, :-1] & mask[:, 1:].bool()  # position t predicts real token t + 1
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                         reduction="none")
    return float(ce[predicts].double().sum()), int(predicts.sum())


def _fraction(ablated: float, spliced: float, clean: float) -> float | None:
    gap = ablated - clean
    return (ablated - spliced) / gap if gap != 0 else None


def _ce_batches(model: Model, texts: Sequence[str], max_tokens: int,
                skip_first: int | Sequence[int], batch_size: int
                ) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """Right-padded batches ``(input_ids, mask, positions, replaced)`` of the texts long enough
    for one counted prediction (longest first), and how many texts that is."""
    skips = [skip_first] * len(texts) if isinstance(skip_first, int) else list(skip_first)
    if (len(skips) != len(texts) or any(k < 0 for k in skips) or max_tokens < 2
            or batch_size < 1):
        raise SAEError(f"need skip_first >= 0 (one number or one per text), max_tokens >= 2 and "
                       f"batch_size >= 1, got {skip_first}, {max_tokens}, {batch_size}")
    ids = [x[:max_tokens] for x in model.encode(list(texts))]
    usable = sorted(((x, k) for x, k in zip(ids, skips) if len(x) >= k + 2),
                    key=lambda xk: len(xk[0]), reverse=True)
    if not usable:
        raise SAEError(f"no text has more than {skip_first} + 1 tokens; pass longer texts to "
                       f"measure the loss")
    batches = []
    for start in range(0, len(usable), batch_size):
        chunk = usable[start:start + batch_size]
        input_ids, mask, pos = pad_batch([x for x, _ in chunk], model.tokenizer.pad_token_id,
                                         "right", model.device)
        first = torch.tensor([k for _, k in chunk], device=pos.device).unsqueeze(1)
        batches.append((input_ids, mask, pos, mask.bool() & (pos >= first)))
    return batches, len(usable)


@torch.no_grad()
def reconstruction_loss_increase(model: Model, sae: SparseAutoencoder, layer: int,
                                 texts: Sequence[str], max_tokens: int = 128, *,
                                 skip_first: int | Sequence[int] = 1, batch_size: int = 8,
                                 check_site: bool = True,
                                 progress: bool = False) -> dict[str, Any]:
    """The model's mean next-token cross-entropy on ``texts`` with block ``layer``'s output
    (a) unchanged (``ce_clean``), (b) replaced by the SAE reconstruction (``ce_sae``), (c) as
    references, replaced by zeros (``ce_zero_ablation``) or by its mean over these texts'
    replaced positions (``ce_mean_ablation``).

    Replaced positions: every real token from index ``skip_first`` on (one number, or one per
    text as from :func:`avec.sae.corpus.template_skips`; the first tokens, an attention sink
    or a shared chat-template head the SAE was not trained on, keep their activation in every
    variant). The
    loss averages the predictions made at replaced positions, i.e. of tokens ``skip_first + 1``
    onwards, so every counted prediction sees the change; texts are cut to ``max_tokens``
    tokens, and texts too short for one such prediction are left out.

    ``fraction_recovered`` = (ce_zero - ce_sae) / (ce_zero - ce_clean) (SAELens's CE loss
    score; 1 is a perfect reconstruction), ``fraction_recovered_mean`` the same against the
    mean ablation (None when the reference equals the clean loss).
    """
    layer = check_fit(model, sae, layer, check_site)
    batches, n_usable = _ce_batches(model, texts, max_tokens, skip_first, batch_size)

    total = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0}
    count = 0
    act_sum = torch.zeros(model.d_model, dtype=torch.float64)
    act_n = 0

    def accumulate(hidden: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
        nonlocal act_n
        picked = hidden[replaced]
        act_sum.add_(picked.double().sum(0).cpu())
        act_n += picked.shape[0]
        return hidden

    def reconstruct(hidden: torch.Tensor) -> torch.Tensor:
        w = sae.W_enc
        return sae(hidden.to(w.device, w.dtype))[0].to(hidden.device)

    bar = tqdm(total=2 * len(batches), desc="CE loss", disable=not progress, leave=False)
    for input_ids, mask, pos, replaced in batches:  # clean loss, and the mean activation
        value, n = _batch_ce(model, input_ids, mask, pos, replaced, layer,
                             lambda h, r=replaced: accumulate(h, r))
        total["clean"] += value
        count += n
        bar.update()
    mean = (act_sum / act_n).to(model.device, model.dtype)
    splices: dict[str, Splice] = {"sae": reconstruct, "zero": torch.zeros_like,
                                  "mean": lambda h: mean.expand_as(h)}
    for input_ids, mask, pos, replaced in batches:
        for name, splice in splices.items():
            total[name] += _batch_ce(model, input_ids, mask, pos, replaced, layer, splice)[0]
        bar.update()
    bar.close()
    ce = {name: value / count for name, value in total.items()}
    return {"layer": layer, "n_texts": n_usable, "n_predictions": count,
            "skip_first": skip_first if isinstance(skip_first, int) else "per text",
            "max_tokens": max_tokens,
            "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_increase": ce["sae"] - ce["clean"],
            "ce_zero_ablation": ce["zero"], "ce_mean_ablation": ce["mean"],
            "fraction_recovered": _fraction(ce["zero"], ce["sae"], ce["clean"]),
            "fraction_recovered_mean": _fraction(ce["mean"], ce["sae"], ce["clean"])}


Position = Literal["mean", "last"]


def _encode(sae: SparseAutoencoder, hidden: torch.Tensor) -> torch.Tensor:
    w = sae.W_enc
    return sae.encode(hidden.to(w.device, w.dtype)).float().cpu()


@torch.no_grad()
def text_latents(model: Model, sae: SparseAutoencoder, layer: int, texts: Sequence[str],
                 position: Position = "mean", *, max_tokens: int = 128, batch_size: int = 16,
                 skip_first: int = 1, check_site: bool = True) -> torch.Tensor:
    """Latent activations per text, ``[len(texts), d_sae]`` (float32, CPU, input order).

    ``"mean"``: the mean of each token's latents from token ``skip_first`` on (all tokens when
    the text is not longer than that); ``"last"``: the latents of the last token (of the first
    ``max_tokens``).
    """
    layer = check_fit(model, sae, layer, check_site)
    if position not in ("mean", "last"):
        raise SAEError(f"unknown position {position!r}; use 'mean' or 'last'")
    out = torch.zeros(len(texts), sae.d_sae)
    seen = set()
    for i, _ids, hidden in layer_outputs(model, texts, layer, max_tokens=max_tokens,
                                         batch_size=batch_size):
        if position == "last":
            out[i] = _encode(sae, hidden[-1])
        else:
            tokens = hidden[skip_first:] if hidden.shape[0] > skip_first else hidden
            out[i] = _encode(sae, tokens).mean(0)
        seen.add(i)
    if len(seen) < len(texts):
        empty = next(t for i, t in enumerate(texts) if i not in seen)
        raise SAEError(f"text {empty!r} tokenizes to nothing; drop it")
    return out


Ranking = Literal["selective", "difference"]
RANKINGS: tuple[str, ...] = ("selective", "difference")


def latent_scores(positive: torch.Tensor, negative: torch.Tensor,
                  by: Ranking = "selective") -> torch.Tensor:
    """How well each latent marks the positives, from per-text latent values ``[n, d_sae]``.

    ``"difference"``: mean on the positives minus mean on the negatives. ``"selective"``
    (default): that difference times the difference of firing rates (fraction of texts where
    the latent is > 0) on positives and negatives, so a latent that fires on nearly every text
    (a style, format or position latent) ranks low even when it fires harder on the
    positives, and a latent that fires only on the positives keeps its whole difference.
    """
    if by not in RANKINGS:
        raise SAEError(f"unknown ranking {by!r}; use one of {list(RANKINGS)}")
    if positive.shape[1:] != negative.shape[1:] or positive.dim() != 2:
        raise SAEError(f"positive and negative latents must be [n, d_sae] with the same d_sae, "
                       f"got {tuple(positive.shape)} and {tuple(negative.shape)}")
    pos, neg = positive.double(), negative.double()
    diff = pos.mean(0) - neg.mean(0)
    if by == "difference":
        return diff
    rate = (pos > 0).double().mean(0) - (neg > 0).double().mean(0)
    return diff * rate.clamp(min=0)


def rank_latents(model: Model, sae: SparseAutoencoder, layer: int,
                 positive_texts: Sequence[str], negative_texts: Sequence[str] | None = None,
                 position: Position = "mean", *, by: Ranking = "selective",
                 top: int | None = None, max_tokens: int = 128, batch_size: int = 16,
                 skip_first: int = 1, check_site: bool = True) -> list[dict[str, Any]]:
    """Latents ranked by :func:`latent_scores` (``by``) of positive against negative texts (or
    by mean activation on the positives when there are no negatives), best first, ties by
    index.

    Each row: ``latent``, ``score`` (what was ranked by), ``mean_positive``,
    ``fire_rate_positive`` (fraction of texts whose per-text value is > 0) and, with
    negatives, ``mean_negative``, ``fire_rate_negative`` and ``difference`` (else None).
    Per-text values are as in :func:`text_latents`. ``top`` keeps only the first rows.
    """
    if not positive_texts:
        raise SAEError("rank_latents needs at least one positive text")
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "batch_size": batch_size,
                              "skip_first": skip_first, "check_site": check_site}
    pos = text_latents(model, sae, layer, positive_texts, position, **kwargs)
    neg = (text_latents(model, sae, layer, negative_texts, position, **kwargs)
           if negative_texts else None)
    mean_pos = pos.double().mean(0)
    mean_neg = neg.double().mean(0) if neg is not None else None
    score = latent_scores(pos, neg, by) if neg is not None else mean_pos
    order = torch.sort(score, descending=True, stable=True).indices
    if top is not None:
        order = order[:max(0, top)]
    rows = []
    for latent in order.tolist():
        rows.append({
            "latent": latent, "score": float(score[latent]),
            "mean_positive": float(mean_pos[latent]),
            "mean_negative": None if mean_neg is None else float(mean_neg[latent]),
            "difference": None if mean_neg is None else float(mean_pos[latent]
                                                               - mean_neg[latent]),
            "fire_rate_positive": float((pos[:, latent] > 0).double().mean()),
            "fire_rate_negative": None if neg is None else float((neg[:, latent] > 0)
                                                                 .double().mean())})
    return rows


@torch.no_grad()
def latent_top_examples(model: Model, sae: SparseAutoencoder, layer: int, texts: Sequence[str],
                        latents: Sequence[int], *, k: int = 10, max_tokens: int = 128,
                        batch_size: int = 16, skip_first: int = 1,
                        check_site: bool = True) -> dict[int, list[TopExample]]:
    """For each latent, the ``k`` texts where it fires most: each text scored by its largest
    activation of the latent on a token from ``skip_first`` on, with every token's activation
    (the latent's actual value, not a projection). Texts where it never fires are left out."""
    layer = check_fit(model, sae, layer, check_site)
    latents = [int(i) for i in latents]
    for latent in latents:
        if not 0 <= latent < sae.d_sae:
            raise SAEError(f"latent {latent} is out of range; this SAE has 0..{sae.d_sae - 1}")
    per_text: dict[int, tuple[list[int], torch.Tensor]] = {}
    for i, ids, hidden in layer_outputs(model, texts, layer, max_tokens=max_tokens,
                                        batch_size=batch_size):
        per_text[i] = (ids, _encode(sae, hidden)[:, latents])
    tokens: dict[int, list[str]] = {}
    out: dict[int, list[TopExample]] = {}
    for j, latent in enumerate(latents):
        ranked = []
        for i, (ids, acts) in per_text.items():
            scores = acts[:, j].tolist()
            best = peak_token(scores, skip_first)
            if scores[best] > 0:
                if i not in tokens:
                    tokens[i] = [model.tokenizer.decode([t]) for t in ids]
                ranked.append(TopExample(i, best, scores[best], tokens[i], scores))
        ranked.sort(key=lambda e: (-e.score, e.text_index))
        out[latent] = ranked[:k]
    return out
