"""The hyper-parameters of :func:`~avec.studies.refusal.finetune.finetune`."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


METADATA_FILE = "avec-finetune.json"
DEFAULT_LORA_LR = 1e-3
DEFAULT_FULL_LR = 5e-5


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
