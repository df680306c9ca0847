"""The :class:`Model` object: a Hugging Face causal LM plus what avec needs to steer it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from avec.models.adapters import find_blocks


class TextModel:
    """What every avec model offers on top of its engine: a tokenizer (``self.tokenizer``),
    its chat template, and layer-index checks (``self.name``, ``self.n_layers``)."""

    tokenizer: Any
    name: str

    @property
    def n_layers(self) -> int:
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, user_message: str, assistant_prefix: str = "") -> str:
        """Format one user turn with the chat template, ready for the assistant's reply.

        ``assistant_prefix`` is appended after the generation prompt (the start of the
        assistant's answer). Models without a chat template get the message unchanged.
        """
        if not self.has_chat_template:
            return user_message + assistant_prefix
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], add_generation_prompt=True, tokenize=False)
        return text + assistant_prefix

    def prompt_ids(self, prompt: str, chat: bool | None = None) -> tuple[list[int], bool]:
        """Token ids of a prompt as a request is run: chat-templated when ``chat`` (``None``:
        if the model has a template), and whether the template was used."""
        use_chat = self.has_chat_template if chat is None else chat
        if use_chat:
            text = self.chat_prompt(prompt)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), True
        return self.encode([prompt])[0], False

    def check_layers(self, layers: list[int]) -> list[int]:
        """Validate 0-based layer indices (negative counts from the end); return them normalised."""
        out = []
        for layer in layers:
            idx = layer + self.n_layers if layer < 0 else layer
            if not 0 <= idx < self.n_layers:
                raise ValueError(
                    f"layer {layer} is out of range: {self.name} has {self.n_layers} decoder "
                    f"blocks, so layers are 0..{self.n_layers - 1} (or -1..-{self.n_layers})")
            out.append(idx)
        return out

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Tokenize texts as given (special tokens the tokenizer adds by default included)."""
        return [list(ids) for ids in self.tokenizer(list(texts))["input_ids"]]


@dataclass(eq=False)
class Model(TextModel):
    """A loaded causal language model.

    Attributes:
        hf: the Hugging Face ``PreTrainedModel`` (in eval mode).
        tokenizer: its tokenizer (``pad_token`` is always set).
        blocks: the decoder blocks; avec's layer ``L`` is the output of ``blocks[L]``.
        family: architecture family (``llama``, ``gemma``, ``gpt2``, ...).
        name: a human-readable identity (file stem or hub id), stored in vector metadata.
    """

    hf: nn.Module
    tokenizer: Any
    blocks: nn.ModuleList
    family: str
    block_path: str
    name: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, hf: nn.Module, tokenizer: Any, *, name: str = "", source: str = "",
                block_path: str | None = None) -> "Model":
        """Wrap an already-loaded Hugging Face model and tokenizer."""
        family, path, blocks = find_blocks(hf, block_path)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            else:
                tokenizer.add_special_tokens({"pad_token": tokenizer.convert_ids_to_tokens(0)})
        hf.eval()
        return cls(hf=hf, tokenizer=tokenizer, blocks=blocks, family=family, block_path=path,
                   name=name or getattr(hf.config, "_name_or_path", "") or type(hf).__name__,
                   source=source)

    @property
    def config(self) -> Any:
        cfg = self.hf.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        cfg = self.config
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(getattr(cfg, key, None), int):
                return int(getattr(cfg, key))
        raise AttributeError(f"cannot find the model width in {type(cfg).__name__}")

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def identity(self) -> dict[str, Any]:
        """What a vector file records about the model it was made on."""
        return {"name": self.name, "family": self.family,
                "model_type": getattr(self.config, "model_type", ""),
                "n_layers": self.n_layers, "d_model": self.d_model}


def cache_kwarg(model: Model) -> str:
    """Name of the KV-cache argument of the model's forward (``cache`` in transformers 5,
    ``past_key_values`` before)."""
    import inspect

    params = inspect.signature(model.hf.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def keep_logits(hf: Any, n: int) -> dict[str, int]:
    """Forward kwargs that run the output head on the last ``n`` positions only, where the
    model's forward supports it (``logits_to_keep``), else none: slice ``logits[:, -n:]``."""
    import inspect

    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(hf.forward).parameters \
        else {}


def output_cache(out: Any) -> Any:
    """The KV cache a forward pass with ``use_cache=True`` returned (either name)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def eos_token_ids(model: Model) -> set[int]:
    """End-of-sequence token ids: the generation config's (one or several), else the
    tokenizer's."""
    eos = model.hf.generation_config.eos_token_id
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
