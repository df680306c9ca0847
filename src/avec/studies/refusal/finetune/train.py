"""The training loop: AdamW with warmup and linear decay on the response tokens, LoRA or full,
and saving the result as a Hugging Face directory."""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from avec.errors import DataError
from avec.models.model import Model, keep_logits
from avec.studies.refusal.finetune.config import METADATA_FILE, FinetuneConfig
from avec.studies.refusal.finetune.encode import (EncodedExample, collate, encode_example,
                                                  response_loss, turn_format)
from avec.studies.refusal.finetune.examples import IGNORE_INDEX, Example, FinetuneError


@dataclass(eq=False)
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: a new :class:`Model` wrapping the trained Hugging Face model (LoRA adapters
            merged, eval mode) with the base model's tokenizer.
        losses: training loss of every optimizer step (mean over the batch's response tokens).
        seconds: wall-clock training time (tokenization and copying included).
        n_examples: examples trained on (after skipping those with no response token left).
        n_tokens_trained: response tokens with a loss, summed over all epochs.
        config: the configuration used, ``learning_rate`` resolved.
        n_truncated: examples cut at ``max_length``.
    """

    model: Model
    losses: list[float]
    seconds: float
    n_examples: int
    n_tokens_trained: int
    config: FinetuneConfig
    n_truncated: int = 0
    base_model: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Loss summary: first, last, min, and means of the first and last epoch."""
        losses = self.losses
        per_epoch = max(1, math.ceil(len(losses) / max(self.config.epochs, 1)))
        return {"steps": len(losses),
                "first": losses[0] if losses else None,
                "last": losses[-1] if losses else None,
                "min": min(losses) if losses else None,
                "first_epoch_mean": _mean(losses[:per_epoch]),
                "last_epoch_mean": _mean(losses[-per_epoch:])}


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _first_needed_logit(labels: torch.Tensor) -> int:
    """Index of the first position whose logits predict a labelled token (over the batch)."""
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    return max(0, int(labelled[0]) - 1) if labelled.numel() else 0


def _lr_lambda(total: int, warmup: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def _wrap_lora(hf: torch.nn.Module, config: FinetuneConfig) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a dependency of this feature
        raise FinetuneError("LoRA fine-tuning needs the `peft` package; install it or set "
                            "lora_rank=0 for full fine-tuning") from exc
    targets = config.target_modules if config.target_modules is not None else "all-linear"
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=targets, bias="none")
    try:
        with warnings.catch_warnings():  # peft calls a deprecated transformers 5 property
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            return get_peft_model(hf, lora)
    except ValueError as exc:
        raise FinetuneError(f"cannot attach LoRA adapters (target_modules={targets!r}): "
                            f"{exc}") from exc


def finetune(model: Model, examples: Sequence[Example], config: FinetuneConfig | None = None,
             *, progress: bool = True, inplace: bool = False) -> FinetuneResult:
    """Supervised fine-tuning on instruction/response pairs.

    Trains with AdamW (linear warmup, then linear decay to 0; gradient clipping) on the
    cross-entropy of response tokens only (see the module docstring for the exact tokens).
    LoRA (``config.lora_rank > 0``) adapters are merged back after training, so the result is
    a plain Hugging Face model; ``lora_rank=0`` trains every weight.

    The input model is not modified: its Hugging Face model is deep-copied first (about the
    model's size in extra memory; 0.5 GB for the 135M default in float32). ``inplace=True``
    trains ``model.hf`` itself instead (saves that memory; ``model`` then holds the trained
    weights too). Training is deterministic for a given ``config.seed`` (shuffling uses its own
    ``torch.Generator``; LoRA initialisation and dropout run under a forked, seeded global RNG,
    which is restored afterwards).

    Args:
        model: the model to start from.
        examples: the training pairs.
        config: hyper-parameters (``FinetuneConfig()`` when omitted).
        progress: show a tqdm bar with the running loss.
        inplace: train ``model.hf`` instead of a copy.
    """
    start = time.perf_counter()
    config = (config or FinetuneConfig()).resolved()
    kept, n_truncated = _encoded_examples(model, examples, config)
    pad_id = model.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = 0
    hf = model.hf if inplace else copy.deepcopy(model.hf)
    grad_flags = {name: p.requires_grad for name, p in hf.named_parameters()}
    device = next(hf.parameters()).device
    losses: list[float] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        if config.lora:
            train_model = _wrap_lora(hf, config)
        else:
            for p in hf.parameters():
                p.requires_grad_(True)
            train_model = hf
        try:
            n_tokens = _train_steps(train_model, hf, kept, config, pad_id, device, losses,
                                    progress)
        finally:
            if config.lora:
                hf = train_model.merge_and_unload()
            for name, p in hf.named_parameters():
                p.requires_grad_(grad_flags.get(name, p.requires_grad))
            hf.eval()
    trained = Model.from_hf(hf, model.tokenizer, name=model.name, source=model.source,
                            block_path=model.block_path)
    return FinetuneResult(model=trained, losses=losses, seconds=time.perf_counter() - start,
                          n_examples=len(kept), n_tokens_trained=n_tokens, config=config,
                          n_truncated=n_truncated, base_model=model.identity())


def _encoded_examples(model: Model, examples: Sequence[Example], config: FinetuneConfig
                      ) -> tuple[list[EncodedExample], int]:
    """The examples that keep a response token within ``max_length``, and how many were cut."""
    if not examples:
        raise DataError("no examples to fine-tune on")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise DataError(f"example {i} is a {type(ex).__name__}, not an avec Example")
    fmt = turn_format(model)
    encoded = [encode_example(model, ex, config.max_length, fmt) for ex in examples]
    n_truncated = sum(e.truncated for e in encoded)
    kept = [e for e in encoded if e.n_target > 0]
    if n_truncated:
        skipped = len(encoded) - len(kept)
        warnings.warn(f"{n_truncated} of {len(encoded)} examples are longer than max_length="
                      f"{config.max_length} tokens and were truncated"
                      + (f"; {skipped} had no response token left and were skipped"
                         if skipped else ""), stacklevel=3)
    if not kept:
        raise DataError(f"no example has a response token within max_length="
                        f"{config.max_length}; raise max_length or shorten the instructions")
    return kept, n_truncated


def _optimizer(train_model: torch.nn.Module, config: FinetuneConfig, total: int
               ) -> tuple[list[torch.nn.Parameter], Any, Any]:
    """AdamW (no weight decay on biases and norms) with linear warmup and decay."""
    params = [p for p in train_model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)
    warmup = int(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup))
    return params, optimizer, scheduler


def _train_steps(train_model: torch.nn.Module, hf: torch.nn.Module,
                 kept: Sequence[EncodedExample], config: FinetuneConfig, pad_id: int,
                 device: torch.device, losses: list[float], progress: bool) -> int:
    """Every optimizer step of every epoch; appends each step's loss to ``losses`` and returns
    the number of response tokens trained on."""
    steps_per_epoch = math.ceil(len(kept) / config.batch_size)
    total = steps_per_epoch * config.epochs
    params, optimizer, scheduler = _optimizer(train_model, config, total)
    generator = torch.Generator().manual_seed(config.seed)
    mode = f"LoRA r={config.lora_rank}" if config.lora else "full"
    bar = tqdm(total=total, desc=f"finetune ({mode})", disable=not progress, unit="step")
    # the output head runs only from the first position that predicts a response token
    head_slice = bool(keep_logits(hf, 1))
    n_tokens = 0
    train_model.train()
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(len(kept), generator=generator).tolist()
            for b in range(steps_per_epoch):
                batch = collate([kept[i] for i in
                                 order[b * config.batch_size:(b + 1) * config.batch_size]],
                                pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch["labels"]
                first = _first_needed_logit(labels) if head_slice else 0
                extra = keep_logits(hf, labels.shape[1] - first)
                out = train_model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"], use_cache=False,
                                  **extra)
                loss, n = response_loss(out.logits, labels[:, first:])
                if not torch.isfinite(loss):
                    raise FinetuneError(
                        f"the loss became {loss.item()} at epoch {epoch + 1}, step "
                        f"{len(losses) + 1}; lower learning_rate (now "
                        f"{config.learning_rate}) or use float32 weights")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                n_tokens += n
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    return n_tokens


# ------------------------------------------------------------------------------------ saving


def save_finetuned(result: FinetuneResult, output_dir: str | Path, *,
                   metadata: dict[str, Any] | None = None) -> Path:
    """Save the fine-tuned model as a Hugging Face directory (safetensors + tokenizer) with
    ``avec-finetune.json`` (configuration, loss summary and per-step losses, number of
    examples, seconds, avec version, ``metadata``). Returns the directory.

    The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and with
    ``avec.load_model(dir)``. A GGUF quantizer left on the model (its weights are already
    dequantized) is removed first, since ``save_pretrained`` refuses GGUF-quantized models.
    """
    from avec._version import __version__

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"{out} exists and is not a directory")
    info = {"avec_version": __version__,
            "base_model": result.base_model,
            "config": result.config.to_dict(),
            "n_examples": result.n_examples,
            "n_tokens_trained": result.n_tokens_trained,
            "n_truncated": result.n_truncated,
            "seconds": round(result.seconds, 3),
            "loss": result.summary(),
            "losses": [round(x, 6) for x in result.losses],
            "metadata": metadata or {}}
    try:
        text = json.dumps(info, indent=2, ensure_ascii=False)
    except TypeError as exc:
        raise ValueError(f"metadata must be JSON-serializable: {exc}") from None
    hf = result.model.hf
    if getattr(hf, "hf_quantizer", None) is not None:
        hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    kwargs = ({"safe_serialization": True}
              if "safe_serialization" in inspect.signature(hf.save_pretrained).parameters else {})
    hf.save_pretrained(out, **kwargs)  # transformers >= 5 always writes safetensors
    result.model.tokenizer.save_pretrained(out)
    (out / METADATA_FILE).write_text(text + "\n", encoding="utf-8")
    return out
