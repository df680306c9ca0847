"""Supervised fine-tuning on instruction/response pairs (LoRA or full), sized for CPUs.

>>> from avec.studies.refusal.finetune import FinetuneConfig, finetune, load_examples, save_finetuned
>>> result = finetune(model, load_examples("refusals.jsonl"), FinetuneConfig())
>>> save_finetuned(result, "smollm2-refuses")          # loads with avec.load_model(dir)

Each example becomes ``prompt + target`` tokens: the prompt is exactly what generation feeds
the model (:meth:`Model.chat_prompt`, the chat template with its generation prompt, or the
plain instruction when the model has no template) and the target is the response followed by
the template's end-of-turn text (``<|im_end|>\\n`` for SmolLM2), as the template itself renders
an assistant turn. The loss is the mean cross-entropy over target tokens only.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from avec.errors import AvecError, DataError
from avec.models.model import Model, eos_token_ids

IGNORE_INDEX = -100
METADATA_FILE = "avec-finetune.json"
DEFAULT_LORA_LR = 1e-3
DEFAULT_FULL_LR = 5e-5
_SENTINEL_USER = "Hello."
_SENTINEL_RESPONSE = "AVEC_RESPONSE_SENTINEL_7f3a"


class FinetuneError(AvecError, RuntimeError):
    """Fine-tuning could not run (template, data or numerical problem); the message says why."""


# ---------------------------------------------------------------------------------- examples


@dataclass
class Example:
    """One instruction/response pair.

    Attributes:
        instruction: the user's message.
        response: the assistant's answer (trained on).
        complete: ``False`` when the response was cut off (e.g. a truncated self-distilled
            answer): then no end-of-turn token is trained after it, so the model does not learn
            to stop mid-sentence.
    """

    instruction: str
    response: str
    complete: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise DataError(f"instruction must be a non-empty string, got {self.instruction!r}")
        if not isinstance(self.response, str):
            raise DataError(f"response must be a string, got {type(self.response).__name__}")
        if not isinstance(self.complete, bool):
            raise DataError(f"complete must be true or false, got {self.complete!r}")
        if not self.response and not self.complete:
            raise DataError("an incomplete example with an empty response has nothing to train")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _example_from_obj(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction' and 'response', "
                        f"got {type(obj).__name__}")
    if "instruction" in obj and "prompt" in obj:
        raise DataError(f"{where}: give either 'instruction' or 'prompt', not both")
    key = "instruction" if "instruction" in obj else "prompt"
    for k in (key, "response"):
        if k not in obj:
            name = "'instruction' (or 'prompt')" if k == "prompt" else repr(k)
            raise DataError(f"{where}: missing key {name} (keys present: {sorted(obj)})")
        if not isinstance(obj[k], str):
            raise DataError(f"{where}: {k!r} must be a string, got {type(obj[k]).__name__}")
    complete = obj.get("complete", True)
    if not isinstance(complete, bool):
        raise DataError(f"{where}: 'complete' must be true or false, got {complete!r}")
    try:
        return Example(obj[key], obj["response"], complete)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def load_examples(path: str | Path) -> list[Example]:
    """Read instruction/response pairs from JSON Lines.

    Each non-empty line is an object with ``instruction`` (or ``prompt``) and ``response``
    strings and an optional boolean ``complete`` (default true). Errors name file and line.
    """
    from avec.data.pairs import iter_jsonl

    path = Path(path)
    examples = [_example_from_obj(obj, where) for where, obj in iter_jsonl(path)]
    if not examples:
        raise DataError(f"{path}: no examples found (expected one JSON object per line with "
                        f"'instruction' and 'response')")
    return examples


def save_examples(examples: Sequence[Example], path: str | Path) -> Path:
    """Write examples as JSON Lines (``complete`` only when false); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            obj: dict[str, Any] = {"instruction": ex.instruction, "response": ex.response}
            if not ex.complete:
                obj["complete"] = False
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------ config


@dataclass
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune`.

    The defaults teach SmolLM2-135M-Instruct a new behaviour (e.g. refusing harmful requests)
    from a few hundred examples in two epochs on a CPU.

    Attributes:
        epochs: passes over the data.
        learning_rate: AdamW peak learning rate; ``None`` picks by mode: 1e-3 for LoRA,
            5e-5 for full fine-tuning (:meth:`resolved` fills it in).
        batch_size: examples per optimizer step (right-padded to the longest in the batch).
        lora_rank: LoRA rank; 0 trains all weights instead (full fine-tuning).
        lora_alpha: LoRA scaling numerator (the update is scaled by ``alpha / rank``).
        lora_dropout: dropout on the LoRA input.
        target_modules: module names (or suffixes) to adapt; ``None`` = every linear layer of
            the decoder blocks (peft's ``"all-linear"``: q, k, v, o, gate, up, down for Llama;
            the output head is excluded).
        max_length: tokens per example (prompt + target); longer examples lose the end of
            their response (counted and warned about); examples with no response token left
            are skipped.
        seed: seeds LoRA initialisation, dropout and the shuffling of examples.
        weight_decay: AdamW decoupled weight decay (matrices only, not norms or biases).
        warmup_ratio: share of the steps with a linear warmup; the rate then decays linearly
            to 0.
        grad_clip: maximum global gradient norm (0 disables clipping).
    """

    epochs: int = 2
    learning_rate: float | None = None
    batch_size: int = 8
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    max_length: int = 256
    seed: int = 0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (self.learning_rate is None or self.learning_rate > 0,
             "learning_rate must be > 0 (or None for the default of the mode)"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1,
             "batch_size must be an integer >= 1"),
            (isinstance(self.lora_rank, int) and self.lora_rank >= 0,
             "lora_rank must be an integer >= 0 (0 = full fine-tuning)"),
            (self.lora_alpha > 0, "lora_alpha must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (isinstance(self.max_length, int) and self.max_length >= 2,
             "max_length must be an integer >= 2"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"FinetuneConfig: {message}")

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    def resolved(self) -> "FinetuneConfig":
        """A copy with ``learning_rate`` filled in for the mode (LoRA or full)."""
        if self.learning_rate is not None:
            return replace(self)
        return replace(self, learning_rate=DEFAULT_LORA_LR if self.lora else DEFAULT_FULL_LR)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ------------------------------------------------------------------------------ tokenization


@dataclass(frozen=True)
class TurnFormat:
    """How the chat template renders an assistant turn after the generation prompt:
    ``before`` + response + ``end`` (``end`` is the end-of-turn text, e.g. ``<|im_end|>\\n``).
    For a model without a template, ``end`` is empty and the end-of-sequence token id
    ``eos_id`` is appended instead."""

    chat: bool
    before: str = ""
    end: str = ""
    eos_id: int | None = None


def turn_format(model: Model) -> TurnFormat:
    """Find what the chat template puts around an assistant response, by rendering
    ``[user, assistant]`` with a sentinel response and taking what follows the generation
    prompt (so the target matches what the template produces)."""
    if not model.has_chat_template:
        eos = model.tokenizer.eos_token_id
        if eos is None:
            ids = sorted(eos_token_ids(model))
            eos = ids[0] if ids else None
        return TurnFormat(chat=False, eos_id=eos)
    prompt = model.chat_prompt(_SENTINEL_USER)
    try:
        full = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL_USER},
             {"role": "assistant", "content": _SENTINEL_RESPONSE}], tokenize=False)
    except Exception as exc:  # jinja raises many types
        raise FinetuneError(f"the chat template of {model.name} cannot render a user turn "
                            f"followed by an assistant turn: {exc}") from exc
    if not isinstance(full, str) or not full.startswith(prompt):
        raise FinetuneError(
            f"the chat template of {model.name} renders a conversation that does not start "
            f"with its generation prompt, so responses cannot be appended to the prompt "
            f"(prompt {prompt!r}, conversation {full!r})")
    rest = full[len(prompt):]
    at = rest.find(_SENTINEL_RESPONSE)
    if at < 0:
        raise FinetuneError(f"the chat template of {model.name} does not render the assistant "
                            f"message verbatim: {rest!r}")
    return TurnFormat(chat=True, before=rest[:at], end=rest[at + len(_SENTINEL_RESPONSE):])


@dataclass
class EncodedExample:
    """Token ids of one example and its labels (``-100`` on the prompt)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_example(model: Model, example: Example, max_length: int | None = None,
                   fmt: TurnFormat | None = None) -> EncodedExample:
    """Tokenize ``prompt + target``, labelling target tokens only.

    The prompt ids are those generation uses (see :func:`avec.generation.hf.format_prompt`).
    The target is tokenized together with the prompt when the prompt's tokens are a prefix of
    the joint tokenization (the usual case: the ids then equal those of the templated
    conversation), else on its own. Complete examples end with the end-of-turn text (chat) or
    the end-of-sequence token (no template). Truncated to ``max_length`` tokens from the end.
    """
    fmt = fmt or turn_format(model)
    tok = model.tokenizer
    if fmt.chat:
        prompt_text = model.chat_prompt(example.instruction)
        target_text = fmt.before + example.response + (fmt.end if example.complete else "")
        prompt_ids = _ids(tok, prompt_text, False)
        joint = _ids(tok, prompt_text + target_text, False)
        separate = (lambda: _ids(tok, target_text, False))
        tail: list[int] = []
    else:
        prompt_ids = _ids(tok, example.instruction, True)
        joint = _ids(tok, example.instruction + example.response, True)
        separate = (lambda: _ids(tok, example.response, False))
        if example.complete and fmt.eos_id is None:
            raise FinetuneError(f"{model.name} has no chat template and no end-of-sequence "
                                f"token, so a complete response cannot be marked as finished; "
                                f"mark the examples complete=False")
        tail = [fmt.eos_id] if example.complete and fmt.eos_id is not None else []
    if len(joint) > len(prompt_ids) and joint[:len(prompt_ids)] == prompt_ids:
        target_ids = joint[len(prompt_ids):]
    else:
        target_ids = separate()
    target_ids = target_ids + tail
    ids = prompt_ids + target_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedExample(ids, labels, truncated)


def collate(batch: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions, and their count."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != IGNORE_INDEX).sum())
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / max(n, 1), n


# ---------------------------------------------------------------------------------- training


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
                         if skipped else ""), stacklevel=2)
    if not kept:
        raise DataError(f"no example has a response token within max_length="
                        f"{config.max_length}; raise max_length or shorten the instructions")
    pad_id = model.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = 0

    hf = model.hf if inplace else copy.deepcopy(model.hf)
    grad_flags = {name: p.requires_grad for name, p in hf.named_parameters()}
    device = next(hf.parameters()).device
    rng_devices = [device] if device.type == "cuda" else []
    steps_per_epoch = math.ceil(len(kept) / config.batch_size)
    total = steps_per_epoch * config.epochs
    losses: list[float] = []
    n_tokens = 0
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        if config.lora:
            train_model = _wrap_lora(hf, config)
        else:
            for p in hf.parameters():
                p.requires_grad_(True)
            train_model = hf
        params = [p for p in train_model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2],
                   "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]],
                                      lr=config.learning_rate)
        warmup = int(config.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup))
        generator = torch.Generator().manual_seed(config.seed)
        mode = f"LoRA r={config.lora_rank}" if config.lora else "full"
        bar = tqdm(total=total, desc=f"finetune ({mode})", disable=not progress, unit="step")
        # the output head runs only from the first position that predicts a response token
        keep_logits = "logits_to_keep" in inspect.signature(hf.forward).parameters
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
                    first = _first_needed_logit(labels) if keep_logits else 0
                    extra = {"logits_to_keep": labels.shape[1] - first} if keep_logits else {}
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
