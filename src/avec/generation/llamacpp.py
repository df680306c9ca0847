"""The llama.cpp backend: generate from a ``.gguf`` model with llama.cpp, steered by control
vectors (through ``llama-cpp-python``'s ``llama_set_adapter_cvec``).

llama.cpp adds one control vector per block to that block's output (``direction.N`` in a
control-vector GGUF is added at the output of 0-based block N), which is exactly avec's
``add`` at layer N. So only addition can run here: ``ablate``/``clamp`` (which read the hidden
state) and per-position (ActAdd) blocks raise :class:`~avec.errors.SteeringError`, as does
layer 0, which llama.cpp cannot steer (its control-vector buffer starts at block 1: avec
layer L sits at offset ``(L - 1) * n_embd``). Positions (``all``, ``prompt``, ``generated``,
``from:K``) are honoured by switching the control vector between the token segments they
cover.

The control vector stays installed over blocks 1..n-1 at all times (zeros where nothing is
steered; adding zero leaves a float unchanged), so the compute graph never changes shape and
an unsteered run is exactly llama.cpp's plain output.

Prompts are tokenized with the Hugging Face tokenizer of the same GGUF file (the one
:func:`avec.load_model` uses), so both backends see the same token ids and chat template.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from avec.generation.llamacpp_probe import REBUILD_HINT
from avec.generation.llamacpp_probe import probe as probe_llama_cpp
from avec.errors import ModelLoadError, SteeringError
from avec.generation.hf import Completion, RowSampling, choose_next, format_prompt
from avec.generation.llamacpp_states import BlockReader
from avec.intervene.conditions import Condition
from avec.intervene.conditions import layers as condition_layers
from avec.models.model import TextModel
from avec.intervene.steer import Positions, parse_positions
from avec.vector import SteeringVector

INSTALL_HINT = ("the llama.cpp backend needs llama-cpp-python (it builds llama.cpp from source, "
                "5-18 minutes on 2 cores): `make llama` in a checkout, or "
                "`CMAKE_ARGS=-DGGML_NATIVE=OFF pip install 'llama-cpp-python>=0.3.30'`")


@dataclass(frozen=True)
class ControlTerm:
    """One addition llama.cpp can apply: ``coef * vector[L]`` at each of ``layers`` (default:
    all of the vector's layers) on the token positions ``positions`` selects."""

    vector: SteeringVector
    coef: float
    layers: tuple[int, ...] | None = None
    positions: Positions = "all"
    op: str = "add"
    # conditional (CAST): decided on the prompt (read in a second context), steering the
    # generated tokens when met
    when: Condition | None = None

    def steered_layers(self) -> tuple[int, ...]:
        return tuple(self.vector.layers) if self.layers is None else tuple(self.layers)

    def active(self, index: int, prompt_len: int) -> bool:
        """Whether the token at ``index`` (0-based, prompt included) is steered."""
        pos = parse_positions(self.positions)
        if pos == "all":
            return True
        if pos == "prompt":
            return index < prompt_len
        if pos == "generated":
            return index >= prompt_len
        return index >= int(pos)


def check_terms(terms: Sequence[ControlTerm], n_layers: int, d_model: int) -> None:
    """Raise :class:`SteeringError` for anything llama.cpp's control vectors cannot do."""
    for i, term in enumerate(terms):
        where = f"steering[{i}]" if len(terms) > 1 else "steering"
        if term.op != "add":
            raise SteeringError(
                f"{where}: op {term.op!r} cannot run on the llama.cpp backend, whose control "
                f"vectors can only add a fixed vector to a block's output; use --backend hf "
                f"for ablate and clamp")
        parse_positions(term.positions)
        for layer in term.steered_layers():
            if layer not in term.vector.directions:
                raise SteeringError(f"{where}: layer {layer} is not in the vector, which has "
                                    f"layers {term.vector.layers}")
            if layer == 0:
                raise SteeringError(
                    f"{where}: llama.cpp cannot steer layer 0 (its control vectors start at "
                    f"block 1); steer layers 1..{n_layers - 1}, or use --backend hf")
            if not 0 < layer < n_layers:
                raise SteeringError(f"{where}: layer {layer} is out of range 1..{n_layers - 1}")
            direction = term.vector[layer]
            if direction.dim() != 1:
                raise SteeringError(
                    f"{where}: a per-position (ActAdd) vector of shape "
                    f"{tuple(direction.shape)} cannot run on llama.cpp, whose control vectors "
                    f"add the same vector at every position; use --backend hf")
            if direction.shape[0] != d_model:
                raise SteeringError(f"{where}: vector width {direction.shape[0]} does not match "
                                    f"the model width {d_model}")
        if not np.isfinite(term.coef):
            raise SteeringError(f"{where}: coef must be finite")
        if term.when is not None:
            if parse_positions(term.positions) != "generated":
                raise SteeringError(f"{where}: a conditional term steers the generated "
                                    f"tokens, not {term.positions!r}")
            bad = [L for L in condition_layers(term.when) if not 0 <= L < n_layers - 1]
            if bad:
                raise SteeringError(f"{where}.when: layer(s) {bad} cannot be read on the "
                                    f"llama.cpp backend (layers 0..{n_layers - 2}: llama.cpp "
                                    f"keeps only the last token of the last block)")


def control_buffer(terms: Sequence[ControlTerm], n_layers: int, d_model: int) -> np.ndarray:
    """The ``(n_layers - 1) * d_model`` float32 buffer llama.cpp takes: block L's vector
    (the sum of ``coef * vector[L]`` over ``terms``) at offset ``(L - 1) * d_model``."""
    data = np.zeros((n_layers - 1) * d_model, dtype=np.float32)
    for term in terms:
        for layer in term.steered_layers():
            start = (layer - 1) * d_model
            data[start:start + d_model] += \
                float(term.coef) * term.vector[layer].float().numpy().astype(np.float32)
    return data


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ModelLoadError(INSTALL_HINT) from None
    except (OSError, RuntimeError) as exc:  # the shared library is missing or damaged
        raise ModelLoadError(f"llama-cpp-python is installed but its native library does not "
                             f"load ({exc}); {REBUILD_HINT}") from exc
    return llama_cpp


def _hf_tokenizer(gguf: Path) -> tuple[Any, set[int]]:
    """The Hugging Face tokenizer of ``gguf`` and its end-of-sequence ids (the generation
    config's when avec has converted this file already, else the tokenizer's), from avec's
    conversion cache when it exists (fast), else parsed from the file."""
    from transformers import AutoTokenizer, GenerationConfig

    from avec.models.gguf_cache import cache_entry, is_complete

    entry = cache_entry(gguf)
    if is_complete(entry):
        tokenizer = AutoTokenizer.from_pretrained(entry)
        try:
            eos = GenerationConfig.from_pretrained(entry).eos_token_id
        except OSError:
            eos = None
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    return tokenizer, ids


class LlamaCppModel(TextModel):
    """A ``.gguf`` model run by llama.cpp. Not thread-safe: use it from one thread at a time
    (the server's engine owns it in its worker thread)."""

    family = "llama.cpp"

    def __init__(self, llm: Any, tokenizer: Any, eos_ids: set[int], *, name: str,
                 source: str) -> None:
        self._lib = _import_llama_cpp()
        self.llm = llm
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.name = name
        self.source = source
        self._n_layers = int(self._lib.llama_model_n_layer(llm.model))
        self._d_model = int(self._lib.llama_model_n_embd(llm.model))
        self._n_vocab = int(llm.n_vocab())
        self._installed: bytes | None = None
        self._install(np.zeros((self._n_layers - 1) * self._d_model, dtype=np.float32))
        self._reader: BlockReader | None = None  # created for the first condition

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *, n_ctx: int = 4096,
             n_threads: int | None = None, probe: bool = True) -> "LlamaCppModel":
        """Load a ``.gguf`` file (default: the packaged SmolLM2-135M-Instruct) with llama.cpp.

        ``n_ctx`` bounds prompt plus generated tokens; ``n_threads`` defaults to the CPU count.
        With ``probe`` (the default) the file is first loaded and decoded in a child process
        (:mod:`avec.generation.llamacpp_probe`, about a second on the default model), so a
        llama.cpp build that crashes on this CPU raises :class:`ModelLoadError` with the
        rebuild command instead of killing this process.
        """
        from avec.models.loading import default_model_path

        gguf = default_model_path() if path is None else Path(path).expanduser()
        if gguf.suffix != ".gguf":
            raise ModelLoadError(f"the llama.cpp backend runs .gguf files, not {gguf}; give a "
                                 f".gguf model or use --backend hf")
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        if probe:
            checked = probe_llama_cpp(gguf)
            if not checked.ok:
                raise ModelLoadError(checked.message)
        lib = _import_llama_cpp()
        try:
            llm = lib.Llama(model_path=str(gguf), n_ctx=n_ctx,
                            n_threads=n_threads or os.cpu_count() or 1, logits_all=False,
                            verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {gguf}: {exc}") from exc
        tokenizer, eos = _hf_tokenizer(gguf)
        return cls(llm, tokenizer, eos, name=gguf.name.removesuffix(".gguf"), source=str(gguf))

    # ---- what the rest of avec asks of a model ---------------------------------------------
    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def d_model(self) -> int:
        return self._d_model

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "model_type": "",
                "n_layers": self.n_layers, "d_model": self.d_model}

    # ---- control vectors -------------------------------------------------------------------
    def _install(self, data: np.ndarray) -> None:
        """Set the control vector of blocks 1..n-1 (no-op if it is already this one)."""
        key = data.tobytes()
        if key == self._installed:
            return
        ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = self._lib.llama_set_adapter_cvec(self.llm.ctx, ptr, data.size, self._d_model, 1,
                                              self._n_layers - 1)
        if rc != 0:
            raise SteeringError(f"llama.cpp refused the control vector (code {rc})")
        self._installed = key

    def _schedule(self, terms: Sequence[ControlTerm], prompt_len: int
                  ) -> Callable[[int], np.ndarray]:
        """Control buffer for the token at each index: the sum of the terms active there
        (buffers are built once per distinct active set)."""
        cache: dict[tuple[int, ...], np.ndarray] = {}

        def at(index: int) -> np.ndarray:
            active = tuple(i for i, t in enumerate(terms) if t.active(index, prompt_len))
            if active not in cache:
                cache[active] = control_buffer([terms[i] for i in active], self._n_layers,
                                               self._d_model)
            return cache[active]

        return at

    def _feed(self, tokens: Sequence[int], start: int, buffer_at: Callable[[int], np.ndarray]
              ) -> np.ndarray:
        """Evaluate ``tokens`` (at indices ``start``...) in segments of constant steering;
        return the logits of the last one."""
        i = 0
        while i < len(tokens):
            data = buffer_at(start + i)
            j = i + 1
            while j < len(tokens) and buffer_at(start + j) is data:
                j += 1
            self._install(data)
            self.llm.eval(list(tokens[i:j]))
            i = j
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    # ---- conditions ------------------------------------------------------------------------
    def prompt_means(self, prompt_ids: Sequence[int], layers: Sequence[int],
                     terms: Sequence[ControlTerm] = ()) -> dict[int, np.ndarray]:
        """The mean block outputs over the prompt's tokens after the first (a condition's
        input), the prompt steered by the unconditional ``terms``."""
        if self._reader is None:
            self._reader = BlockReader(self._lib, self.llm.model, n_ctx=self.n_ctx,
                                       n_layers=self._n_layers, d_model=self._d_model,
                                       n_threads=self.llm.n_threads)
        prompt = list(prompt_ids)
        at = self._schedule([t for t in terms if t.when is None], len(prompt))
        control = at(0)
        if any(at(i) is not control for i in range(1, len(prompt))):
            raise SteeringError("a conditional entry with another entry whose positions start "
                                "inside the prompt (from:K) cannot run on the llama.cpp "
                                "backend; use --backend hf")
        return self._reader.prompt_means(prompt, layers, control)

    def decide(self, prompt_ids: Sequence[int], terms: Sequence[ControlTerm]
               ) -> list[ControlTerm]:
        """``terms`` with each conditional one kept (as a plain generated-tokens term) when its
        condition holds on this prompt, dropped when it does not."""
        if all(t.when is None for t in terms):
            return list(terms)
        layers = sorted({L for t in terms if t.when is not None
                         for L in condition_layers(t.when)})
        means = {L: torch.from_numpy(m).unsqueeze(0)
                 for L, m in self.prompt_means(prompt_ids, layers, terms).items()}
        return [replace(t, when=None) for t in terms
                if t.when is None or bool(t.when.met(means)[0])]

    # ---- generation ------------------------------------------------------------------------
    def check(self, terms: Sequence[ControlTerm]) -> None:
        """Raise if ``terms`` cannot run on llama.cpp (see :func:`check_terms`)."""
        check_terms(terms, self._n_layers, self._d_model)

    def next_logits(self, prompt_ids: Sequence[int], terms: Sequence[ControlTerm] = ()
                    ) -> np.ndarray:
        """Logits ``[n_vocab]`` after ``prompt_ids`` under the control terms."""
        self.check(terms)
        terms = self.decide(prompt_ids, terms)
        self.llm.reset()
        return self._feed(list(prompt_ids), 0, self._schedule(terms, len(prompt_ids)))

    def logits_along(self, prompt_ids: Sequence[int], continuation: Sequence[int],
                     terms: Sequence[ControlTerm] = ()) -> np.ndarray:
        """Teacher forcing: ``[len(continuation), n_vocab]`` logits, row k being the
        prediction of ``continuation[k]`` after the prompt and ``continuation[:k]`` (the
        continuation's tokens count as generated ones for ``positions``)."""
        self.check(terms)
        terms = self.decide(prompt_ids, terms)
        prompt, cont = list(prompt_ids), list(continuation)
        buffer_at = self._schedule(terms, len(prompt))
        self.llm.reset()
        rows = [self._feed(prompt, 0, buffer_at)]
        for k, tok in enumerate(cont[:-1]):
            rows.append(self._feed([tok], len(prompt) + k, buffer_at))
        return np.stack(rows[:len(cont)]) if cont else np.zeros((0, self._n_vocab), np.float32)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                 terms: Sequence[ControlTerm] = (), *, sampling: RowSampling | None = None,
                 min_new_tokens: int = 0,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """New tokens after ``prompt_ids`` (greedy, or drawn with ``sampling``), cut at the
        first end-of-sequence token. ``on_token`` sees each new token as it is chosen (not the
        end-of-sequence one). Raises :class:`SteeringError` if the logits turn non-finite."""
        self.check(terms)
        prompt = list(prompt_ids)
        if not prompt:
            raise SteeringError("the prompt is empty")
        if len(prompt) + max_new_tokens > self.n_ctx:
            raise SteeringError(f"{len(prompt)} prompt tokens + {max_new_tokens} new tokens "
                                f"exceed the llama.cpp context of {self.n_ctx}; load the model "
                                f"with a larger n_ctx")
        terms = self.decide(prompt, terms)
        buffer_at = self._schedule(terms, len(prompt))
        eos = sorted(self.eos_ids)
        self.llm.reset()
        logits = self._feed(prompt, 0, buffer_at)
        out: list[int] = []
        for step in range(max_new_tokens):
            scores = torch.from_numpy(logits).unsqueeze(0)
            if not bool(torch.isfinite(scores).all()):
                raise SteeringError(f"the model's outputs became NaN or infinite at new token "
                                    f"{step}; the steering is too strong (lower the coef)")
            if step < min_new_tokens and eos:
                scores[:, eos] = -float("inf")
            tok = int(choose_next(scores, [sampling] if sampling is not None else None)[0])
            if tok in self.eos_ids:
                break
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if step == max_new_tokens - 1:
                break
            logits = self._feed([tok], len(prompt) + step, buffer_at)
        return out

    def close(self) -> None:
        """Free llama.cpp's model and context now (otherwise at garbage collection)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


def steered_completions(model: LlamaCppModel, prompts: Sequence[str],
                        vector: SteeringVector | None = None, coefs: Sequence[float] = (0.0,),
                        *, layers: Sequence[int] | None = None, positions: Positions = "all",
                        op: str = "add", max_new_tokens: int = 64, chat: bool | None = None,
                        progress: bool = False, when: Condition | None = None
                        ) -> list[Completion]:
    """:func:`avec.generation.hf.steered_completions` on llama.cpp: greedy completions of every
    prompt at every coefficient (coefficient 0 is the plain model), one prompt at a time;
    ``when`` makes the steering conditional (decided on each prompt, generated tokens steered).
    Everything is checked before the first token is generated."""
    from tqdm.auto import tqdm

    if vector is None and any(c != 0 for c in coefs):
        raise ValueError("a nonzero coefficient needs a vector")
    lay = tuple(int(L) for L in layers) if layers is not None else None

    def terms(coef: float) -> list[ControlTerm]:
        if vector is None or coef == 0:
            return []
        return [ControlTerm(vector, float(coef), lay,
                            "generated" if when is not None else positions, op, when)]

    for coef in coefs:
        model.check(terms(coef))
    encoded = [format_prompt(model, p, chat)[0] for p in prompts]  # type: ignore[arg-type]
    out = []
    jobs = [(i, c) for i in range(len(prompts)) for c in coefs]
    for i, coef in tqdm(jobs, desc="generate", disable=not progress, leave=False):
        toks = model.generate(encoded[i], max_new_tokens, terms(coef))
        text = model.tokenizer.decode(toks, skip_special_tokens=True).strip()
        out.append(Completion(prompts[i], float(coef), text))
    return out
