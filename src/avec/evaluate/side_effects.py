"""What steering breaks: KL divergence on neutral prompts, perplexity of reference texts."""

from __future__ import annotations

from typing import Sequence

import torch

from avec.evaluate.forward import batched_logits, steered_logit_rows
from avec.generation.hf import format_prompt
from avec.models.model import Model
from avec.vector import SteeringVector


def reference_logprobs(model: Model, prompts: Sequence[str], *, chat: bool | None = None,
                       batch_size: int = 16) -> list[torch.Tensor]:
    """Unsteered next-token log-probabilities ``[len, vocab]`` of each prompt, formatted as
    :func:`kl_divergence` formats them; pass them as its ``reference`` to compute them once."""
    tokens = [format_prompt(model, p, chat)[0] for p in prompts]
    return [lp.log_softmax(-1) for lp in batched_logits(model, tokens, batch_size)]


def kl_divergence(model: Model, prompts: Sequence[str], vector: SteeringVector | None,
                  layer: int | Sequence[int] | None, coefs: Sequence[float], *, chat: bool | None = None,
                  positions: str = "last", batch_size: int = 16,
                  reference: Sequence[torch.Tensor] | None = None) -> list[float]:
    """Mean KL(unsteered || steered) of next-token distributions, one value per coefficient.

    ``positions="last"`` (default, as Arditi et al. measure it) compares the distribution after
    the whole prompt (chat-templated when the model has a template, like generation);
    ``"all"`` averages over every position of the prompt. ``reference``: the unsteered
    log-probabilities from :func:`reference_logprobs` (computed here when not given).
    """
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    tokens = [format_prompt(model, p, chat)[0] for p in prompts]
    base = list(reference) if reference is not None else reference_logprobs(
        model, prompts, chat=chat, batch_size=batch_size)
    if len(base) != len(tokens) or any(b.shape[0] != len(t) for b, t in zip(base, tokens)):
        raise ValueError("reference log-probabilities do not match these prompts; make them with "
                         "reference_logprobs(model, prompts) with the same chat setting")
    totals = torch.zeros(len(coefs), dtype=torch.float64)
    for i, c, logits in steered_logit_rows(model, tokens, vector, layer, list(coefs), batch_size):
        lp, lq = base[i], logits.log_softmax(-1)
        if positions == "last":
            lp, lq = lp[-1:], lq[-1:]
        kl = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0).mean()
        totals[c] += float(kl)
    return (totals / len(prompts)).tolist()


def perplexity(model: Model, texts: Sequence[str], vector: SteeringVector | None,
               layer: int | Sequence[int] | None, coefs: Sequence[float], *, skip_positions: int = 0,
               batch_size: int = 8) -> list[float]:
    """Perplexity of ``texts`` (read as given) under the steered model, one value per coefficient.

    Token-level: exp of the mean next-token negative log-likelihood over all predicted tokens.
    ``skip_positions`` masks the first k predicted tokens, e.g. the positions an ActAdd block
    was injected at (``skip_positions = T``), so injected positions do not count.
    """
    tokens = model.encode(list(texts))
    nll = torch.zeros(len(coefs), dtype=torch.float64)
    count = torch.zeros(len(coefs), dtype=torch.float64)
    for i, c, logits in steered_logit_rows(model, tokens, vector, layer, list(coefs), batch_size):
        targets = torch.tensor(tokens[i][1:])
        lp = logits[:-1].log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lp = lp[skip_positions:]
        nll[c] -= float(lp.sum())
        count[c] += lp.numel()
    if (count == 0).any():
        raise ValueError("no tokens left to score; texts are shorter than skip_positions + 2")
    return torch.exp(nll / count).tolist()


def logit_difference(model: Model, prompts: Sequence[str], token_pairs: Sequence[tuple[str, str]],
                     vector: SteeringVector | None, layer: int | Sequence[int] | None,
                     coefs: Sequence[float], *,
                     chat: bool | None = None, batch_size: int = 16) -> list[float]:
    """Mean over prompts and token pairs of logit(a) - logit(b) at the next token.

    Each of ``a``/``b`` must be a single token (e.g. ``" love"``/``" hate"``).
    """
    ids = []
    for a, b in token_pairs:
        ta = model.tokenizer(a, add_special_tokens=False)["input_ids"]
        tb = model.tokenizer(b, add_special_tokens=False)["input_ids"]
        if len(ta) != 1 or len(tb) != 1:
            raise ValueError(f"{a!r} and {b!r} must each be one token; they are {ta} and {tb}")
        ids.append((ta[0], tb[0]))
    tokens = [format_prompt(model, p, chat)[0] for p in prompts]
    totals = torch.zeros(len(coefs), dtype=torch.float64)
    for _i, c, logits in steered_logit_rows(model, tokens, vector, layer, list(coefs), batch_size):
        last = logits[-1]
        totals[c] += sum(float(last[a] - last[b]) for a, b in ids) / len(ids)
    return (totals / len(prompts)).tolist()
