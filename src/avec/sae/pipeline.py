"""Train a TopK SAE on a corpus end to end: read the corpus (text files, texts the model samples
itself, or both), hold out a slice, collect one layer's activations, train, save the SAE in the
SAELens layout, evaluate it on the held-out slice (FVE, L0 and the model's loss with the SAE
spliced in) and write ``train.json``. ``avec sae train`` is this pipeline."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avec.report import write_json
from avec.sae.model import SAEError, SparseAutoencoder

Log = Callable[[str], None]


@dataclass
class CorpusConfig:
    """Where the training texts come from.

    Args:
        files: text files (.txt split at blank lines, .json/.jsonl prompt files).
        sample: have the model write this many texts (seeded, temperature 1); with ``files``,
            the corpus is both.
        prompts: files of seed prompts for ``sample`` (default: avec's built-in openers).
        sample_tokens: new tokens per sampled text.
        max_tokens: tokens read per text.
        holdout: fraction of the texts held out for the evaluation (0 skips it).
    """

    files: Sequence[str | Path] = ()
    sample: int | None = None
    prompts: Sequence[str | Path] | None = None
    sample_tokens: int = 128
    max_tokens: int = 128
    holdout: float = 0.1


@dataclass
class SAEPipelineConfig:
    """One SAE training run: the layer, the corpus and the training settings.

    Args:
        layer: block whose output the SAE reads (avec's layer L).
        corpus: the corpus, see :class:`CorpusConfig`.
        d_sae: number of latents (default ``8 x d_model``).
        k, lr, batch_size, epochs, steps: as in :class:`avec.sae.train.SAETrainConfig`.
        seed: seeds the sampled corpus, the held-out split and the training.
    """

    layer: int
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    d_sae: int | None = None
    k: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    steps: int | None = None
    seed: int = 0


@dataclass
class CorpusTexts:
    """The texts of a corpus read from its files, before any sampling."""

    texts: list[str]
    seeds: list[str] | None


@dataclass
class SAEPipelineResult:
    """The trained SAE, where it was saved, and the summary also written to ``train.json``."""

    sae: SparseAutoencoder
    output: Path
    summary: dict[str, Any]


def read_corpus(corpus: CorpusConfig) -> CorpusTexts:
    """Check ``corpus`` and read its files (text files and seed prompts); no model needed, so
    bad input fails before a model is loaded."""
    from avec.sae.corpus import load_texts

    if not corpus.files and not corpus.sample:
        raise SAEError("give a corpus: --texts FILE..., --sample N, or both")
    if corpus.prompts and not corpus.sample:
        raise SAEError("--prompts are seeds for --sample N; pass --sample too")
    texts = load_texts(list(corpus.files)) if corpus.files else []
    seeds = load_texts(list(corpus.prompts)) if corpus.prompts else None
    return CorpusTexts(texts, seeds)


def split_texts(texts: list[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): a seeded random ``holdout`` fraction held out."""
    if not 0 <= holdout < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {holdout}")
    if holdout == 0:
        return texts, []
    if len(texts) < 2:
        raise ValueError(f"a held-out slice needs at least 2 texts, got {len(texts)}; pass more "
                         f"texts or --holdout 0")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_held = min(len(texts) - 1, max(1, round(holdout * len(texts))))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [texts[i] for i in train], [texts[i] for i in held]


def tqdm_progress() -> tuple[Callable[[int, int, float], None], Callable[[], None]]:
    """A ``train_sae`` progress callback drawing a tqdm bar, and a function closing it."""
    from tqdm.auto import tqdm

    bar: list[Any] = []

    def progress(step: int, total: int, loss: float) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc="train SAE", unit="step", leave=False))
        bar[0].update(1)
        if step % 20 == 0 or step == total:
            bar[0].set_postfix(loss=f"{loss:.4g}")

    return progress, lambda: bar[0].close() if bar else None


def _train_config(model: Any, config: SAEPipelineConfig) -> Any:
    from avec.sae.train import SAETrainConfig

    given = {"k": config.k, "lr": config.lr, "batch_size": config.batch_size,
             "epochs": config.epochs}
    return SAETrainConfig(d_sae=config.d_sae or 8 * model.d_model, steps=config.steps,
                          seed=config.seed, **{k: v for k, v in given.items() if v is not None})


def _build_corpus(model: Any, config: SAEPipelineConfig, read: CorpusTexts,
                  log: Log) -> tuple[list[str], list[str], dict[str, Any], float]:
    """(all texts, the sampled ones, the corpus record, seconds spent sampling)."""
    from avec.sae.corpus import sample_corpus

    c = config.corpus
    corpus: dict[str, Any] = {"source": "+".join(
        s for s, on in (("files", c.files), ("sampled", c.sample)) if on)}
    if c.files:
        corpus.update(files=[str(p) for p in c.files], n_file_texts=len(read.texts))
    texts, sampled, seconds = list(read.texts), [], 0.0
    if c.sample:
        log(f"sampling {c.sample} texts of up to {c.sample_tokens} tokens (seed {config.seed})")
        t0 = time.perf_counter()
        sampled = sample_corpus(model, c.sample, c.sample_tokens, config.seed, read.seeds,
                                progress=True)
        seconds = time.perf_counter() - t0
        corpus.update(seed=config.seed, temperature=1.0, max_new_tokens=c.sample_tokens,
                      n_sampled=len(sampled), file="corpus.jsonl",
                      prompts=[str(p) for p in c.prompts] if c.prompts else "built-in")
        texts = texts + sampled
    return texts, sampled, corpus, seconds


def _evaluate(model: Any, sae: Any, layer: int, held_texts: list[str], max_tokens: int,
              log: Log) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(held-out SAE metrics, loss with the SAE spliced in), or errors if they cannot be
    measured; ``(None, None)`` without held-out texts."""
    from avec.sae.corpus import collect_activations, template_skips
    from avec.sae.evaluate import reconstruction_loss_increase
    from avec.sae.train import sae_metrics

    heldout: dict[str, Any] | None = None
    ce: dict[str, Any] | None = None
    if held_texts:
        try:
            held_skips = template_skips(model, held_texts)
            held_acts = collect_activations(model, held_texts, layer, max_tokens,
                                            skip_first=held_skips)
            heldout = sae_metrics(sae, held_acts.to(model.device))
            ce = reconstruction_loss_increase(model, sae, layer, held_texts, max_tokens,
                                              skip_first=held_skips, progress=True)
        except SAEError as err:  # e.g. held-out texts too short to predict a token
            log(f"warning: no held-out evaluation: {err}")
            heldout = heldout or {"error": str(err)}
            ce = {"error": str(err)}
    return heldout, ce


def _save(sae: Any, out: Path, model: Any, layer: int, corpus: dict[str, Any],
          sampled: list[str]) -> None:
    from avec.sae.io import save_sae

    sae.cfg.hook_layer, sae.cfg.hook_name = layer, f"blocks.{layer}.hook_resid_post"
    sae.cfg.model_name = model.name
    sae.cfg.metadata["corpus"] = corpus
    save_sae(sae, out)  # before the evaluation, so a failing evaluation loses no training
    if sampled:
        with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in sampled)


def train_sae_on_corpus(model: Any, config: SAEPipelineConfig, output: str | Path,
                        read: CorpusTexts | None = None, log: Log = lambda _msg: None,
                        started: float | None = None) -> SAEPipelineResult:
    """Train a TopK SAE on block ``config.layer``'s output over a corpus and save it to
    ``output`` (SAELens layout, plus ``train.json`` and, if texts were sampled,
    ``corpus.jsonl``).

    Args:
        model: an avec model.
        config: layer, corpus and training settings.
        output: SAE directory to write.
        read: the corpus files already read by :func:`read_corpus` (read here if None).
        log: receives progress and warning lines.
        started: ``time.perf_counter()`` when the run began, for the total time in the
            summary (default: now).

    Returns:
        The SAE, the output directory and the summary (settings, corpus, metrics on the
        training and held-out texts, seconds per stage).
    """
    from avec._version import __version__
    from avec.sae.corpus import collect_activations, template_skips
    from avec.sae.train import train_sae

    started = time.perf_counter() if started is None else started
    read = read_corpus(config.corpus) if read is None else read
    c = config.corpus
    (layer,) = model.check_layers([config.layer])
    train_config = _train_config(model, config)
    texts, sampled, corpus, sample_seconds = _build_corpus(model, config, read, log)
    train_texts, held_texts = split_texts(texts, c.holdout, config.seed)
    corpus.update(n_texts=len(texts), n_train=len(train_texts), n_heldout=len(held_texts))
    t0 = time.perf_counter()
    acts = collect_activations(model, train_texts, layer, c.max_tokens,
                               skip_first=template_skips(model, train_texts), progress=True)
    collect_seconds = time.perf_counter() - t0
    log(f"{acts.shape[0]} tokens of {len(train_texts)} texts at layer {layer}; training "
        f"{train_config.d_sae} latents, k={train_config.k}")
    progress, close = tqdm_progress()
    try:
        sae, record = train_sae(acts.to(model.device), train_config, progress)
    finally:
        close()
    out = Path(output)
    _save(sae, out, model, layer, corpus, sampled)
    t0 = time.perf_counter()
    heldout, ce = _evaluate(model, sae, layer, held_texts, c.max_tokens, log)
    summary = {"output": str(out), "layer": layer, "model": model.identity(),
               "d_sae": train_config.d_sae, "k": train_config.k, "corpus": corpus,
               "n_tokens": int(acts.shape[0]), "max_tokens": c.max_tokens,
               "skip_first": "1, or the chat template's shared head in templated texts",
               "steps": record["steps"], "epochs": record["epochs"],
               "metrics": {"train": record["metrics"], "heldout": heldout, "ce_loss": ce},
               "seconds": {"sample": sample_seconds, "collect": collect_seconds,
                           "train": record["seconds"],
                           "evaluate": time.perf_counter() - t0,
                           "total": time.perf_counter() - started}}
    document = {**summary, "config": record["config"], "history": record["history"],
                "epoch_losses": record["epoch_losses"], "avec_version": __version__}
    write_json(out / "train.json", document)
    return SAEPipelineResult(sae, out, summary)
