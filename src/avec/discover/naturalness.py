"""How natural is what a discovered vector elicits? Two measures and the controls they need.

A steering vector found without labels (MELBO) may bring out a behaviour the model already has,
or build one that the model would never produce by itself (an optimiser with enough freedom can
make even a random network say anything). Two measures tell them apart, both on the model as it
is (no steering) and on the same prompts:

**Likelihood.** The mean per-token log-probability of the steered completions under the
unsteered model, given the same (chat-formatted) prompt. A completion is scored on its text,
tokenized as it follows the prompt (no special tokens, no end-of-sequence token); each
completion's tokens are averaged, then the completions (empty ones are skipped). References: the
unsteered model's own greedy completions (its most likely text), completions steered by random
vectors of the same norm at the same layer (what any perturbation of that size costs), and the
completions the model writes when a plain instruction is added to the prompt (a natural change
of behaviour), all scored the same way.

**Prompt reachability.** Can a plain natural-language instruction make the unsteered model
write what the vector makes it write? Every candidate instruction (the fixed pool
:data:`INSTRUCTIONS`, the plain prompt itself, and instructions the model suggests when shown
steered text, :func:`suggest_instructions`) is appended to each prompt; the model's greedy
completions are embedded with the offline all-MiniLM-L6-v2 judge and compared, prompt by
prompt, with the steered completions (mean cosine). The prompts are split in two halves: the
best instruction is chosen on the selection half (even indices) and its similarity is reported
on the held-out half (odd indices), so choosing among many candidates does not inflate it. The
bar is the vector's own variability: the similarity of its completions sampled at a temperature
to its greedy ones (``ceiling``). A behaviour counts as **natural** (reached by a prompt) when
the chosen instruction's held-out similarity is at least that ceiling.

The controls of the study (``experiments/melbo_naturalness.py``) are built here too: the same
MELBO run on a randomly initialised copy of the architecture (:func:`random_init_copy`) and on
the model with its block weights permuted across layers (:func:`layer_permuted_copy`), and soft
prompts (trainable input embeddings inserted after the prompt's first token,
:func:`train_soft_prompts`) optimised for the same objective.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from avec.directions.activations import forward_until
from avec.discover.melbo import MelboConfig, MelboTrainer
from avec.generation.hf import format_prompt, generate_ids, variant_completions
from avec.intervene.steer import steer
from avec.models.hooks import installed_hooks
from avec.models.model import Model
from avec.vector import SteeringVector

INSTRUCTIONS: tuple[str, ...] = (
    # answer form and length
    "Answer with only the final number.", "Reply in a single word.",
    "Answer in one short sentence.", "Answer with yes or no.", "Summarize in three words.",
    "Give a long, detailed answer.", "Answer confidently and briefly.",
    "Write your answer as a numbered list.", "Use bullet points.",
    "Write the answer as a JSON object.", "Write the answer as code in Python.",
    "Give the answer as an equation.", "Use only symbols and numbers, no words.",
    "Write an essay with a title.", "Write it as a dialogue between two people.",
    "Write in all capital letters.", "Respond with an emoji.", "Write a letter about it.",
    # reasoning
    "Think step by step, then give the answer.", "Show your calculation.",
    "Give only the steps, not the result.", "Check your answer after giving it.",
    "Give two different methods.", "Give an example first.",
    "Give a definition of every term you use.", "Explain the idea behind this question.",
    "Explain it like a textbook.", "Use an analogy from everyday life.",
    "Explain multiplication in general.", "Use the distributive property.",
    "Write instructions, step by step, for how to do it.", "Restate the question in your own "
    "words.", "Repeat the question before answering.", "Express uncertainty about the answer.",
    "Give a wrong answer on purpose.", "Pretend you are a calculator.",
    # tone and persona
    "Answer as a friendly teacher talking to a child.",
    "Answer formally, as in an academic paper.", "Be sarcastic.",
    "Be enthusiastic and use exclamation marks.", "Answer like a pirate.",
    "Answer in the style of Shakespeare.", "Answer as if you were very tired.",
    "Answer as if you were angry.", "Answer as if you were sad.",
    "Answer in the first person, as a human.", "Describe how you feel about the question.",
    "Give a motivational message.", "Apologize before answering.",
    # compliance and refusal
    "Refuse to answer this.", "Say that you cannot help with this.",
    "Comply fully and do not refuse.", "Start your answer with 'Sure, here is'.",
    "Add a safety warning to your answer.", "Explain why this request is harmful.",
    "Answer as a fictional story.", "Write it as a scene in a movie script.",
    # other genres and topics
    "Answer in the form of a poem.", "Write a haiku.", "Answer with a joke.",
    "Tell a short story instead of answering.", "Write a news headline about it.",
    "Write a product advertisement.", "Write a list of facts.",
    "Write about the history of this topic.", "Talk about a related but different topic.",
    "Change the subject.", "Ask me a clarifying question instead of answering.",
    "Answer with a question.", "Answer in French.", "Answer in Spanish.",
    "Repeat the same sentence several times.",
)
"""The fixed pool of candidate instructions (each appended to the prompt after a space). The
plain prompt (no instruction) is always a candidate too."""

SUGGEST_TEMPLATE = ("Here is a question and the reply an assistant wrote.\n\nQuestion: {prompt}"
                    "\n\nReply: {text}\n\nWrite one short instruction that, added to the "
                    "question, would make an assistant reply in this way. Give only the "
                    "instruction.")
"""What the model is asked to describe a steered completion (:func:`suggest_instructions`)."""


def with_instruction(prompt: str, instruction: str) -> str:
    """The prompt a candidate instruction makes: the prompt, a space, the instruction (the plain
    prompt for the empty instruction)."""
    return f"{prompt} {instruction}" if instruction else prompt


# ---------------------------------------------------------------------------------- likelihood

@torch.inference_mode()
def token_logprobs(model: Model, prompts: Sequence[str], completions: Sequence[str], *,
                   chat: bool | None = None, batch_size: int = 16) -> list[list[float]]:
    """Log-probability of every token of each completion under ``model`` as it is (steered
    only if called inside a ``steer`` block), given its prompt: ``[i][t]``.

    The prompt is formatted as generation formats it (chat template when ``chat``, ``None``:
    if the model has one); the completion text is tokenized without special tokens and scored
    as it follows the prompt. Rows are right-padded into batches with position ids counted over
    real tokens, so padding does not change a row's values beyond float tolerance.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    heads = [format_prompt(model, p, chat)[0] for p in prompts]
    tails = [list(model.tokenizer(c, add_special_tokens=False)["input_ids"]) if c else []
             for c in completions]
    out: list[list[float]] = [[] for _ in prompts]
    order = [i for i in sorted(range(len(prompts)), key=lambda i: -len(heads[i]) - len(tails[i]))
             if tails[i]]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        seqs = [heads[i] + tails[i] for i in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model.hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                          position_ids=pos.to(model.device), use_cache=False).logits
        for j, i in enumerate(rows):  # log-softmax at the completion's positions only
            n, m = len(heads[i]), len(tails[i])
            logp = torch.log_softmax(logits[j, n - 1:n - 1 + m].float(), dim=-1)
            target = torch.tensor(tails[i], device=logp.device)
            out[i] = logp.gather(-1, target[:, None])[:, 0].tolist()
    return out


def mean_logprob(rows: Sequence[Sequence[float]]) -> float | None:
    """Mean over completions of each completion's mean token log-probability; empty
    completions are skipped (``None`` if every one is empty)."""
    means = [sum(r) / len(r) for r in rows if len(r)]
    return sum(means) / len(means) if means else None


# ---------------------------------------------------------------------------------- generation

SOFT_OFFSET = 1
"""Where a soft prompt goes: after this many tokens of the formatted prompt. Many models make
the first token an attention sink with outsized activations (SmolLM2-135M: norm ~25,000 at its
first ``<|im_start|>`` against ~300 elsewhere) that any token put before it removes; a soft
prompt in front would win MELBO's objective just by moving the sink (on SmolLM2, a random soft
prompt or any 8 text tokens in front scored ~5e9, ~50x the best MELBO vector). Inserted after
the first token, 8 text tokens score ~1e6, the scale of random MELBO vectors."""


@contextlib.contextmanager
def soft_prefix(model: Model, embeddings: torch.Tensor,
                offset: int = SOFT_OFFSET) -> Iterator[None]:
    """Inside the block, the input embeddings at positions ``offset .. offset + n - 1``
    (``n = len(embeddings)``) of every multi-token forward pass (a prompt pass; generation
    steps pass one token) are replaced by ``embeddings`` ``[n, d]``. Pass prompts with ``n``
    placeholder tokens at those positions (:func:`soft_ids`), with no padding before them."""
    n = int(embeddings.shape[0])

    def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        if output.shape[1] <= 1:
            return output
        if output.shape[1] <= offset + n:
            raise ValueError(f"a soft prompt of {n} tokens after {offset} needs longer inputs "
                             f"than {output.shape[1]} tokens")
        prefix = embeddings.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :offset], prefix, output[:, offset + n:]], dim=1)

    with installed_hooks() as hooks:
        hooks.forward(model.hf.get_input_embeddings(), hook)
        yield


def placeholder_id(model: Model) -> int:
    """The token id that stands where soft-prompt embeddings go (its embedding is replaced)."""
    pad = model.tokenizer.pad_token_id
    return int(pad) if pad is not None else 0


def soft_ids(model: Model, ids: Sequence[int], tokens: int,
             offset: int = SOFT_OFFSET) -> list[int]:
    """``ids`` with ``tokens`` placeholders inserted after the first ``offset`` (where
    :func:`soft_prefix` writes)."""
    ids = list(ids)
    return ids[:offset] + [placeholder_id(model)] * tokens + ids[offset:]


def completions(model: Model, prompts: Sequence[str], *, vector: SteeringVector | None = None,
                soft: torch.Tensor | None = None, temperature: float = 0.0, seed: int = 0,
                max_new_tokens: int = 48, chat: bool | None = None, batch_size: int = 32,
                pad: bool = False) -> list[str]:
    """One completion per prompt: greedy, or sampled at ``temperature`` with ``seed``; steered
    by ``vector`` (coefficient 1, its own layers, every position) or with the soft prompt
    ``soft`` ``[n, d]`` inserted into the formatted prompt after its first
    :data:`SOFT_OFFSET` tokens. Prompts of equal token length share a
    batch (no padding); with ``pad`` (not with ``soft``) prompts of any length share batches,
    left-padded (far fewer passes; logits equal to unpadded ones within float tolerance)."""
    if pad and soft is not None:
        raise ValueError("a soft prompt must start each row: pad=True cannot be used with soft")
    encoded = [format_prompt(model, p, chat)[0] for p in prompts]
    if soft is not None:
        encoded = [soft_ids(model, ids, int(soft.shape[0])) for ids in encoded]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        groups[0 if pad else len(ids)].append(i)
    texts = [""] * len(prompts)
    for b, rows in enumerate(chunk for g in groups.values()
                             for chunk in (g[j:j + batch_size] for j in range(0, len(g),
                                                                              batch_size))):
        ctx: Any = contextlib.nullcontext()
        if vector is not None:
            ctx = steer(model, vector, coef=1.0)
        elif soft is not None:
            ctx = soft_prefix(model, soft.to(model.device))
        with ctx:
            new = generate_ids(model, [encoded[i] for i in rows], max_new_tokens,
                               temperature=temperature, seed=seed + b)
        for i, toks in zip(rows, new):
            texts[i] = model.tokenizer.decode(toks, skip_special_tokens=True).strip()
    return texts


def random_like(vector: SteeringVector, generator: torch.Generator) -> SteeringVector:
    """A random direction at each of ``vector``'s layers with the same norm there."""
    dirs = {}
    for layer, d in vector.directions.items():
        r = torch.randn(d.shape, generator=generator)
        dirs[layer] = r * (float(d.float().norm()) / float(r.norm()))
    return SteeringVector(dirs, {"method": "random", "norm_of": vector.metadata.get("index")})


def suggest_instructions(model: Model, prompts: Sequence[str], texts: Sequence[str], *,
                         max_new_tokens: int = 32, chat: bool | None = None,
                         pad: bool = False) -> list[str]:
    """The model's own guess, for each (prompt, completion), of an instruction that would make
    it write that completion (:data:`SUGGEST_TEMPLATE`, greedy; the first non-empty line, with
    a leading ``Instruction:`` and quotes removed; at most 200 characters). ``pad``: see
    :func:`completions`."""
    asks = [SUGGEST_TEMPLATE.format(prompt=p, text=t) for p, t in zip(prompts, texts)]
    out = []
    for raw in completions(model, asks, max_new_tokens=max_new_tokens, chat=chat, pad=pad):
        line = next((s.strip() for s in raw.splitlines() if s.strip()), "")
        if line.lower().startswith("instruction:"):
            line = line[len("instruction:"):].strip()
        out.append(line.strip("\"'* ")[:200])
    return out


# ---------------------------------------------------------------------------------- reach

def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of ``a`` with row i of ``b`` (``[N, D]`` each): ``[N]``."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=-1).clip(1e-12)
    nb = np.linalg.norm(b, axis=-1).clip(1e-12)
    return (a * b).sum(-1) / (na * nb)


def halves(n: int) -> tuple[list[int], list[int]]:
    """(selection, held-out) prompt indices: even and odd indices."""
    if n < 2:
        raise ValueError(f"reachability needs at least 2 prompts (one per half), got {n}")
    return list(range(0, n, 2)), list(range(1, n, 2))


@dataclass(frozen=True)
class Reach:
    """How close a plain instruction gets to a vector's steered completions (mean paired cosine
    of embeddings). ``similarity``, ``unsteered`` and ``ceiling`` are on the held-out prompts;
    ``selection`` is the chosen instruction's similarity on the half it was chosen on."""

    instruction: str
    selection: float
    similarity: float
    unsteered: float
    ceiling: float

    @property
    def natural(self) -> bool:
        """A prompt reaches the behaviour: the instruction is at least as close to the greedy
        steered completions as the vector's own sampled completions are."""
        return self.similarity >= self.ceiling

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "natural": self.natural}


def reach(steered: np.ndarray, candidates: np.ndarray, names: Sequence[str],
          unsteered: np.ndarray, resampled: np.ndarray) -> Reach:
    """The best candidate instruction for one vector, from embeddings: ``steered``,
    ``unsteered`` and ``resampled`` ``[N, D]`` (one row per prompt), ``candidates``
    ``[C, N, D]`` (the completions of each of the ``names``). The candidate with the highest
    mean paired cosine on the selection half (:func:`halves`) wins (the first on ties); the
    returned similarities are means over the held-out half."""
    if candidates.ndim != 3 or candidates.shape[1:] != steered.shape or len(names) != len(
            candidates):
        raise ValueError(f"candidates {candidates.shape} for {len(names)} names do not match "
                         f"steered {steered.shape}")
    select, held = halves(steered.shape[0])
    sims = np.stack([paired_cosine(c, steered) for c in candidates])  # [C, N]
    best = int(np.argmax(sims[:, select].mean(1)))
    return Reach(names[best], float(sims[best, select].mean()), float(sims[best, held].mean()),
                 float(paired_cosine(unsteered, steered)[held].mean()),
                 float(paired_cosine(resampled, steered)[held].mean()))


# ---------------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class NaturalnessConfig:
    """Settings of :func:`score_naturalness`."""

    n_random: int = 4  # random same-norm vectors (likelihood reference)
    temperature: float = 0.7  # sampling temperature of the ceiling's resample
    suggestions: int = 1  # instructions the model suggests per vector (from selection prompts)
    instructions: tuple[str, ...] = INSTRUCTIONS
    max_new_tokens: int = 48
    chat: bool | None = None
    batch_size: int = 32
    pad: bool = True  # instructed and sampled completions: prompts of any length share batches
    seed: int = 0

    def check(self) -> None:
        if self.n_random < 1:
            raise ValueError(f"n_random must be >= 1, got {self.n_random}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if self.suggestions < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("suggestions must be >= 0, max_new_tokens and batch_size >= 1")


@dataclass
class Steered:
    """What one vector (or soft prompt) does on the prompts: greedy completions and sampled
    ones (the ceiling's resample)."""

    name: str
    greedy: list[str]
    sampled: list[str]


@dataclass
class Naturalness:
    """Both measures for a set of vectors on one model and one list of prompts."""

    prompts: list[str]
    rows: list[dict[str, Any]]
    unsteered_logprob: float | None
    random_logprobs: list[float | None]
    instructed_logprob: float | None
    instructions: list[str]  # the candidates, "" (the plain prompt) first
    suggested: list[str]
    completions: dict[str, list[str]]  # unsteered, random_J, instructed pool, per name
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def random_logprob(self) -> float | None:
        values = [v for v in self.random_logprobs if v is not None]
        return sum(values) / len(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "seconds": round(self.seconds, 1),
                "prompts": self.prompts, "unsteered_logprob": _r(self.unsteered_logprob),
                "random_logprob": _r(self.random_logprob),
                "random_logprobs": [_r(v) for v in self.random_logprobs],
                "instructed_logprob": _r(self.instructed_logprob), "rows": self.rows,
                "instructions": self.instructions, "suggested": self.suggested,
                "completions": self.completions}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


class InstructionPool:
    """Greedy completions of the unsteered model for each prompt under each candidate
    instruction, computed once per instruction and kept (several sets of vectors on the same
    model and prompts share them)."""

    def __init__(self, model: Model, prompts: Sequence[str], config: NaturalnessConfig) -> None:
        self.model, self.prompts, self.config = model, list(prompts), config
        self.texts: dict[str, list[str]] = {}

    def get(self, instructions: Sequence[str], progress: bool = False) -> list[list[str]]:
        todo = [c for c in dict.fromkeys(instructions) if c not in self.texts]
        n = len(self.prompts)
        # a few instructions at a time, their rows in shared batches (with config.pad)
        step = max(1, self.config.batch_size // n) * 4
        for start in tqdm(range(0, len(todo), step), desc="instructions",
                          disable=not progress, leave=False):
            chunk = todo[start:start + step]
            texts = completions(self.model, [with_instruction(p, c) for c in chunk
                                             for p in self.prompts],
                                max_new_tokens=self.config.max_new_tokens,
                                chat=self.config.chat, batch_size=self.config.batch_size,
                                pad=self.config.pad)
            for j, c in enumerate(chunk):
                self.texts[c] = texts[j * n:(j + 1) * n]
        return [self.texts[c] for c in instructions]


def steered_by_vectors(model: Model, prompts: Sequence[str],
                       vectors: Sequence[SteeringVector], config: NaturalnessConfig,
                       greedy: Sequence[Sequence[str]] | None = None,
                       progress: bool = False) -> list[Steered]:
    """Greedy (unless given, e.g. from a run's summary) and sampled completions of each
    vector (coefficient 1)."""
    if greedy is None:
        texts = variant_completions(model, prompts, [(v, 1.0) for v in vectors],
                                    max_new_tokens=config.max_new_tokens, chat=config.chat,
                                    batch_size=config.batch_size, progress=progress,
                                    pad=config.pad)
    else:
        texts = [list(g) for g in greedy]
    out = []
    for k, (vector, g) in enumerate(zip(vectors, texts)):
        sampled = completions(model, prompts, vector=vector, temperature=config.temperature,
                              seed=config.seed + 1000 * k,
                              max_new_tokens=config.max_new_tokens, chat=config.chat,
                              batch_size=config.batch_size, pad=config.pad)
        out.append(Steered(f"vector {k}", list(g), sampled))
    return out


def score_naturalness(model: Model, prompts: Sequence[str], steered: Sequence[Steered],
                      template: SteeringVector, config: NaturalnessConfig = NaturalnessConfig(),
                      *, unsteered: Sequence[str] | None = None,
                      pool: InstructionPool | None = None, judge: Any = None,
                      progress: bool = False,
                      log: Callable[[str], None] = lambda _m: None) -> Naturalness:
    """Likelihood and prompt reachability of each steered set of completions (see the module
    docstring). ``template`` gives the layers and norm of the ``config.n_random`` random
    vectors; ``unsteered`` the plain greedy completions if already made; ``pool`` the
    instructed completions to reuse (same model, prompts and config); ``judge`` an
    :class:`~avec.evaluate.concepts.EmbeddingJudge`."""
    from avec.evaluate.concepts import EmbeddingJudge

    config.check()
    start = time.perf_counter()
    prompts = list(prompts)
    select, _held = halves(len(prompts))
    for s in steered:
        if len(s.greedy) != len(prompts) or len(s.sampled) != len(prompts):
            raise ValueError(f"{s.name}: {len(s.greedy)} greedy and {len(s.sampled)} sampled "
                             f"completions for {len(prompts)} prompts")
    judge = judge if judge is not None else EmbeddingJudge()
    pool = pool if pool is not None else InstructionPool(model, prompts, config)
    if pool.prompts != prompts:
        raise ValueError("the instruction pool was made on other prompts")
    if (pool.config.max_new_tokens, pool.config.chat) != (config.max_new_tokens, config.chat):
        raise ValueError("the instruction pool was made with other max_new_tokens or chat")
    plain = list(unsteered) if unsteered is not None else completions(
        model, prompts, max_new_tokens=config.max_new_tokens, chat=config.chat,
        batch_size=config.batch_size, pad=config.pad)
    pool.texts.setdefault("", plain)
    generator = torch.Generator().manual_seed(config.seed + 7919)
    randoms = [random_like(template, generator) for _ in range(config.n_random)]
    log(f"naturalness: {len(steered)} steered sets, {config.n_random} random vectors, "
        f"{len(prompts)} prompts")
    random_texts = variant_completions(model, prompts, [(v, 1.0) for v in randoms],
                                       max_new_tokens=config.max_new_tokens, chat=config.chat,
                                       batch_size=config.batch_size, pad=config.pad)
    picks = select[:config.suggestions]
    suggested = suggest_instructions(model, [prompts[i] for s in steered for i in picks],
                                     [s.greedy[i] for s in steered for i in picks],
                                     chat=config.chat, pad=config.pad) if picks else []
    suggested = [c for c in dict.fromkeys(suggested) if c and c not in config.instructions]
    names = ["", *config.instructions, *suggested]
    log(f"naturalness: {len(names)} candidate instructions ({len(suggested)} suggested)")
    instructed = pool.get(names, progress=progress)

    def ll(texts: Sequence[str]) -> list[list[float]]:
        return token_logprobs(model, prompts, texts, chat=config.chat)

    base_rows = ll(plain)
    pooled = [r for texts in instructed[1:] for r in ll(texts)]
    emb = lambda texts: judge.embed(list(texts)).numpy()  # noqa: E731
    cand = np.stack([emb(t) for t in instructed])
    plain_emb = emb(plain)
    rows = []
    for s in steered:
        rows_s = ll(s.greedy)
        found = reach(emb(s.greedy), cand, names, plain_emb, emb(s.sampled))
        rows.append({"name": s.name, "logprob": _r(mean_logprob(rows_s)),
                     "empty": sum(1 for r in rows_s if not r), **{
                         k: (round(v, 4) if isinstance(v, float) else v)
                         for k, v in found.to_dict().items()}})
    texts = {"unsteered": plain, **{f"random_{j}": t for j, t in enumerate(random_texts)},
             **{s.name: s.greedy for s in steered},
             **{f"{s.name} sampled": s.sampled for s in steered},
             **{f"instruction: {c}": t for c, t in zip(names[1:], instructed[1:])}}
    return Naturalness(prompts, rows, mean_logprob(base_rows),
                       [mean_logprob(ll(t)) for t in random_texts], mean_logprob(pooled),
                       names, suggested, texts, time.perf_counter() - start,
                       {k: v for k, v in asdict(config).items() if k != "instructions"})


# ---------------------------------------------------------------------------------- controls

def random_init_copy(model: Model, seed: int = 0) -> Model:
    """A randomly initialised model of the same architecture and config (transformers' own
    initialisation, seeded), with the same tokenizer."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(model.hf.config, dtype=model.dtype)
    return Model.from_hf(hf, model.tokenizer, name=f"{model.name}-random-init-{seed}",
                         block_path=model.block_path)


def layer_permuted_copy(model: Model, seed: int = 0) -> tuple[Model, dict[str, list[int]]]:
    """A copy whose decoder-block weights are permuted across layers, each tensor name
    (``self_attn.q_proj.weight``, ``mlp.down_proj.weight``, ``input_layernorm.weight``, ...)
    by its own seeded permutation: block ``L`` gets that tensor from block ``perm[L]``.
    Embeddings, the final norm and the output head are unchanged. Returns the model and the
    permutation of each tensor name."""
    hf = copy.deepcopy(model.hf)
    permuted = Model.from_hf(hf, model.tokenizer, name=f"{model.name}-layer-permuted-{seed}",
                             block_path=model.block_path)
    generator = torch.Generator().manual_seed(seed)
    n = permuted.n_layers
    perms: dict[str, list[int]] = {}
    with torch.no_grad():
        names = [name for name, _ in permuted.blocks[0].named_parameters()]
        for name in names:
            params = [dict(block.named_parameters())[name] for block in permuted.blocks]
            if len({tuple(p.shape) for p in params}) != 1:
                raise ValueError(f"cannot permute {name}: its shape differs between blocks")
            perm = torch.randperm(n, generator=generator).tolist()
            originals = [p.detach().clone() for p in params]
            for layer, p in enumerate(params):
                p.copy_(originals[perm[layer]])
            perms[name] = perm
    return permuted, perms


def residual_norm(model: Model, prompts: Sequence[str], layer: int,
                  chat: bool | None = None) -> float:
    """Mean norm of block ``layer``'s output at the last token of each prompt."""
    norms = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([format_prompt(model, p, chat)[0]], device=model.device)
            found: dict[int, torch.Tensor] = {}
            forward_until(model, [layer], lambda _L, h: found.__setitem__(0, h), ids,
                          torch.ones_like(ids), torch.arange(ids.shape[1],
                                                             device=model.device)[None])
            norms.append(float(found[0][0, -1].float().norm()))
    return sum(norms) / len(norms)


@dataclass(frozen=True)
class SoftPromptConfig:
    """A soft prompt of ``tokens`` input embeddings inserted into each formatted prompt after
    its first token (:data:`SOFT_OFFSET`), trained by projected gradient ascent on MELBO's
    objective with the ``melbo`` settings
    (source layer unused; target layer, p, q, target positions, lr, steps, patience). Each
    embedding is kept at norm ``norm`` (``None``: the mean norm of the model's token
    embeddings, so the soft tokens are as large as real tokens)."""

    tokens: int = 8
    count: int = 4
    norm: float | None = None
    melbo: MelboConfig = MelboConfig()
    seed: int = 0


@dataclass
class SoftPrompt:
    embeddings: torch.Tensor  # [tokens, d]
    objective: float
    steps: int
    history: list[float] = field(default_factory=list)


def _soft_inputs(trainer: MelboTrainer, n: int) -> list[tuple[torch.Tensor, ...]]:
    """Each batch's ids, mask and position ids with ``n`` placeholders inserted after
    :data:`SOFT_OFFSET` tokens (right padding stays on the right)."""
    model, k = trainer.model, SOFT_OFFSET
    out = []
    for batch in trainer.batches:
        rows = batch.ids.shape[0]
        ids = torch.cat([batch.ids[:, :k], batch.ids.new_full((rows, n), placeholder_id(model)),
                         batch.ids[:, k:]], 1)
        mask = torch.cat([batch.mask[:, :k], batch.mask.new_ones((rows, n)), batch.mask[:, k:]],
                         1)
        out.append((ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)))
    return out


def _soft_objective(trainer: MelboTrainer, soft: torch.Tensor,
                    inputs: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """MELBO's objective for a soft prompt: the change of the target block's output at the
    prompt's own tokens (target positions) from the plain prompt's (the trainer's reference);
    the first :data:`SOFT_OFFSET` tokens, before the soft prompt, cannot change."""
    model, cfg, k, n = trainer.model, trainer.config, SOFT_OFFSET, int(soft.shape[0])
    total = soft.new_zeros(())
    for batch, (ids, mask, pos) in zip(trainer.batches, inputs):
        found: dict[int, torch.Tensor] = {}
        with soft_prefix(model, soft):
            forward_until(model, [trainer.target], lambda _L, h: found.__setitem__(0, h),
                          ids, mask, pos)
        own = torch.cat([found[0][:, :k], found[0][:, k + n:]], 1).float()
        dist = (own - batch.base).norm(dim=-1)
        per_prompt = (dist.pow(cfg.p) * batch.weight).sum(-1)
        total = total + per_prompt.pow(1.0 / cfg.q).sum()
    return total


def soft_objective(model: Model, prompts: Sequence[str], soft: torch.Tensor,
                   config: MelboConfig) -> float:
    """The objective of a soft prompt (no gradient)."""
    trainer = MelboTrainer(model, prompts, config)
    inputs = _soft_inputs(trainer, int(soft.shape[0]))
    with torch.no_grad():
        return float(_soft_objective(trainer, soft.to(model.device, torch.float32), inputs))


def train_soft_prompts(model: Model, prompts: Sequence[str],
                       config: SoftPromptConfig = SoftPromptConfig(),
                       progress: bool = False) -> list[SoftPrompt]:
    """``config.count`` soft prompts, each from its own seeded random start (see
    :class:`SoftPromptConfig`); weights stay frozen (and their ``requires_grad`` flags are
    restored)."""
    if config.tokens < 1 or config.count < 1:
        raise ValueError("tokens and count must be >= 1")
    trainer = MelboTrainer(model, prompts, config.melbo)
    inputs = _soft_inputs(trainer, config.tokens)
    cfg = config.melbo
    norm = config.norm if config.norm is not None else float(
        model.hf.get_input_embeddings().weight.detach().float().norm(dim=-1).mean())
    if not (norm > 0 and math.isfinite(norm)):
        raise ValueError(f"norm must be a positive number, got {norm}")

    def project(x: torch.Tensor) -> torch.Tensor:
        return x * (norm / x.norm(dim=-1, keepdim=True).clamp(min=1e-12))

    generator = torch.Generator().manual_seed(config.seed)
    flags = [p.requires_grad for p in model.hf.parameters()]
    model.hf.requires_grad_(False)
    out = []
    try:
        for k in range(config.count):
            soft = project(torch.randn(config.tokens, model.d_model, generator=generator))
            soft = soft.to(model.device).requires_grad_(True)
            opt = torch.optim.Adam([soft], lr=cfg.lr * norm)
            best, best_soft, since, history = -math.inf, soft.detach().clone(), 0, []
            for _ in tqdm(range(cfg.steps), desc=f"soft prompt {k + 1}/{config.count}",
                          disable=not progress, leave=False):
                opt.zero_grad()
                value = _soft_objective(trainer, soft, inputs)
                (-value).backward()
                v = float(value.detach())
                history.append(round(v, 6))
                improved = not math.isfinite(best) or v > best + cfg.tol * abs(best)
                since = 0 if improved else since + 1
                if v > best:
                    best, best_soft = v, soft.detach().clone()
                if since >= cfg.patience:
                    break
                with torch.no_grad():  # tangent component per token, then back on the sphere
                    assert soft.grad is not None
                    unit = soft.detach() / soft.detach().norm(dim=-1, keepdim=True)
                    soft.grad.sub_((soft.grad * unit).sum(-1, keepdim=True) * unit)
                opt.step()
                with torch.no_grad():
                    soft.copy_(project(soft.detach()))
            out.append(SoftPrompt(best_soft.cpu(), best, len(history), history))
    finally:
        for p, flag in zip(model.hf.parameters(), flags):
            p.requires_grad_(flag)
    return out
