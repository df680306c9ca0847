"""The self-check: does steering fire inside this vLLM, and do unsteered rows stay exact?

One steered and one plain probe row run in the same batch. The steered row must differ from the
unsteered reference (run alone), and the plain row must equal it token for token. Together with
the worker's start-up check (the op ran at every layer), this turns the silent no-op other
plugins fall into after a vLLM upgrade into an error. ``avec vllm-check MODEL`` runs it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avec.vector import SteeringVector
from avec.vllm import EXTRA_ARGS_KEY
from avec.vllm.store import vectors_from

PROBE = "avec-probe"
PROMPT = "Write one sentence about the weather."


class SelfCheckFailed(RuntimeError):
    """Steering did not fire, or it leaked into an unsteered row."""


@dataclass
class CheckResult:
    steered_changed: bool
    plain_exact: bool
    steered_tokens: list[int]
    plain_tokens: list[int]
    reference_tokens: list[int]

    @property
    def ok(self) -> bool:
        return self.steered_changed and self.plain_exact


def write_probe(directory: str | Path, d_model: int, layer: int, norm: float = 64.0,
                seed: int = 0) -> Path:
    """A random direction of norm ``norm`` at ``layer``, large enough to change any greedy
    continuation, saved as ``avec-probe.safetensors`` in ``directory``."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d_model, generator=g)
    path = Path(directory) / f"{PROBE}.safetensors"
    SteeringVector({layer: v / v.norm() * norm}, {"method": "random", "purpose": "self-check"}
                   ).save(path)
    return path


def probe_entries(layer: int) -> str:
    return json.dumps([{"vector": PROBE, "coef": 1.0, "layers": [layer]}])


def run_check(llm: Any, layer: int, max_tokens: int = 8) -> CheckResult:
    """Run the probe rows on ``llm`` (whose vector store holds :func:`write_probe`'s file)."""
    from vllm import SamplingParams

    def params(steer: bool) -> Any:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              extra_args={EXTRA_ARGS_KEY: probe_entries(layer)} if steer else None)

    prompt = {"prompt": PROMPT}
    ref = llm.generate([prompt], params(False), use_tqdm=False)[0].outputs[0].token_ids
    both = llm.generate([prompt, prompt], [params(True), params(False)], use_tqdm=False)
    steered, plain = (list(o.outputs[0].token_ids) for o in both)
    ref = list(ref)
    return CheckResult(steered != ref, plain == ref, steered, plain, ref)


def check_model(model: str, *, enforce_eager: bool = True, max_model_len: int = 512,
                **llm_kwargs: Any) -> CheckResult:
    """Start vLLM on ``model`` with a probe vector store and run :func:`run_check`; raise
    :class:`SelfCheckFailed` when steering did not fire or leaked."""
    from transformers import AutoConfig
    from vllm import LLM

    config = AutoConfig.from_pretrained(model)
    layer = config.num_hidden_layers // 2
    with tempfile.TemporaryDirectory(prefix="avec-vllm-check-") as tmp, vectors_from(tmp):
        write_probe(tmp, config.hidden_size, layer)
        llm = LLM(model=model, enforce_eager=enforce_eager, max_model_len=max_model_len,
                  **llm_kwargs)
        result = run_check(llm, layer)
    if not result.ok:
        raise SelfCheckFailed(
            ("the steered probe row came back unsteered" if not result.steered_changed else
             "the plain probe row differs from the unsteered reference (steering leaked)")
            + f": steered {result.steered_tokens}, plain {result.plain_tokens}, "
              f"reference {result.reference_tokens}")
    return result
