"""``avec serve --backend vllm``: avec's HTTP API (chat completions with ``steering``,
``/v1/vectors``, the playground, streaming) over vLLM's async engine with avec's plugin.

:class:`VLLMEngine` offers what :func:`avec.serve.app.create_app` asks of an engine (``model``,
``registry``, ``limits``, ``check_capacity``, ``submit``, ``shutdown``), so the app, its checks
and its error bodies are the same as on the HF engine; vLLM's continuous batching replaces the
HF engine's static batches (a newcomer joins at the next step instead of waiting for a batch to
finish). vLLM runs in a thread of its own with its own event loop, so the HTTP event loop never
waits on it.

The registry's vectors reach vLLM's processes as files: :class:`VectorMirror` saves each vector
once, content-addressed (``sha-<digest>.safetensors``, never overwritten), into a private
directory given to vLLM as ``$AVEC_VLLM_VECTORS``, and deletes a file when neither a registry name
nor a running request uses it. A vector replaced or deleted through ``/v1/vectors`` while
requests use it is therefore never changed under them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from avec.errors import SteeringError
from avec.intervene.conditions import renamed, to_spec
from avec.models.model import TextModel
from avec.serve.engine import ResolvedSteering, check_request, resolve_entries
from avec.serve.errors import ServeError, safe_text
from avec.serve.limits import Limits
from avec.serve.registry import VectorRegistry, working_dtype
from avec.serve.rows import Generation, GenerationResult
from avec.serve.schemas import SteeringSpec
from avec.vector import SteeringVector
from avec.vllm import DEFAULT_ENV, DEFAULT_KEY, EXTRA_ARGS_KEY
from avec.vllm.store import check_flat, vectors_from

log = logging.getLogger("avec.serve")


class VLLMModel(TextModel):
    """What the server needs of the model vLLM runs (tokenizer, chat template, width, layers),
    without loading its weights a second time in the server's process."""

    family = "vllm"

    def __init__(self, model_dir: str, name: str | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.source = model_dir
        self.name = name or Path(model_dir).name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        config = getattr(config, "text_config", config)
        self._n_layers = int(config.num_hidden_layers)
        self.d_model = int(config.hidden_size)
        self.dtype = torch.float32

    @property
    def n_layers(self) -> int:
        return self._n_layers


class VectorMirror:
    """The vectors vLLM's processes can read: each registry vector saved once as
    ``sha-<digest>.safetensors`` in ``directory``, with a count of the running requests that use
    it. :meth:`sweep` deletes files no one uses any more."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._files: dict[int, tuple[SteeringVector, str]] = {}  # id(vector) -> (vector, name)
        self._running: Counter[str] = Counter()

    def acquire(self, vector: SteeringVector) -> str:
        """The file name (stem) vLLM knows ``vector`` by, held until :meth:`release`."""
        with self._lock:
            held = self._files.get(id(vector))
            if held is None or held[0] is not vector:
                tmp = vector.save(self.directory / f".new-{secrets.token_hex(8)}.safetensors")
                name = "sha-" + hashlib.sha256(tmp.read_bytes()).hexdigest()[:40]
                os.replace(tmp, self.directory / f"{name}.safetensors")
                held = self._files[id(vector)] = (vector, name)
            self._running[held[1]] += 1
            return held[1]

    def release(self, name: str) -> None:
        with self._lock:
            self._running[name] -= 1
            if self._running[name] <= 0:
                del self._running[name]

    def sweep(self, live: Sequence[SteeringVector]) -> int:
        """Delete the files of vectors that are neither in ``live`` (the registry and the
        default steering) nor used by a running request; returns how many were deleted."""
        keep = {id(v) for v in live}
        removed = 0
        with self._lock:
            for key, (_, name) in list(self._files.items()):
                if key in keep or name in self._running:
                    continue
                del self._files[key]
                if name not in {n for _, n in self._files.values()}:
                    (self.directory / f"{name}.safetensors").unlink(missing_ok=True)
                    removed += 1
        return removed

    def files(self) -> int:
        return sum(1 for _ in self.directory.glob("*.safetensors"))


@dataclass
class _Request:
    future: Generation
    prompt_tokens: int
    names: list[str]
    on_token: Callable[[int], None] | None
    deadline: float


class VLLMEngine:
    """Serves ``model_dir`` with vLLM's ``AsyncLLM`` and avec's plugin. ``max_num_seqs``
    requests run at once (vLLM's continuous batching); up to ``limits.max_queue`` more wait in
    vLLM's queue, beyond which :meth:`submit` answers 429. ``engine_kwargs`` go to vLLM's
    ``AsyncEngineArgs`` (``enforce_eager``, ``max_model_len``, ``tensor_parallel_size``...)."""

    def __init__(self, model_dir: str, registry: VectorRegistry, limits: Limits | None = None,
                 *, model: VLLMModel | None = None, max_num_seqs: int | None = None,
                 dtype: str = "float32", **engine_kwargs: Any) -> None:
        from avec.vllm import prepare_process

        prepare_process()
        self.model = model or VLLMModel(model_dir)
        self.registry = registry
        self.limits = limits or Limits()
        registry.set_caps(max_file_bytes=self.limits.max_vector_bytes,
                          max_vectors=self.limits.max_vectors,
                          max_total_bytes=self.limits.max_store_bytes)
        self.default: list[ResolvedSteering] = []
        self.stats: Counter[str] = Counter()
        self.max_num_seqs = int(max_num_seqs or self.limits.max_batch)
        self._dir = Path(tempfile.mkdtemp(prefix="avec-serve-vllm-"))
        self.mirror = VectorMirror(self._dir)
        self._running = 0
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="avec-vllm",
                                        daemon=True)
        self._thread.start()
        args = dict(model=model_dir, dtype=dtype, max_num_seqs=self.max_num_seqs,
                    max_model_len=engine_kwargs.pop(
                        "max_model_len", self.limits.max_prompt_tokens + self.limits.max_tokens),
                    **engine_kwargs)
        try:
            self._llm = asyncio.run_coroutine_threadsafe(self._start(args), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise

    async def _start(self, args: dict[str, Any]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # the engine's front end reads the vector directory and the plugin's own default when
        # it is built: avec serve gives its vectors, and its default through each request
        saved = os.environ.pop(DEFAULT_ENV, None)
        if saved:
            log.warning("$%s is ignored by avec serve: use --default-steering", DEFAULT_ENV)
        try:
            with vectors_from(self._dir):
                return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        finally:
            if saved is not None:
                os.environ[DEFAULT_ENV] = saved

    # ---- validation ------------------------------------------------------------------------
    def set_default(self, specs: Sequence[SteeringSpec]) -> None:
        """The server's default steering, checked now, applied before each request's own."""
        self.default = self._flat(resolve_entries(specs, self.registry, self.limits,
                                                  working_dtype(self.model),
                                                  label="default_steering"))

    def resolve(self, specs: Sequence[SteeringSpec], use_default: bool = True
                ) -> list[ResolvedSteering]:
        own = self._flat(resolve_entries(specs, self.registry, self.limits,
                                         working_dtype(self.model)))
        return (list(self.default) if use_default else []) + own

    @staticmethod
    def _flat(entries: list[ResolvedSteering]) -> list[ResolvedSteering]:
        for i, entry in enumerate(entries):
            try:
                check_flat(entry.vector, f"vector {entry.name!r}")
            except Exception as exc:
                raise SteeringError(str(exc)) from None
            if entry.per_token:
                raise SteeringError(f"steering[{i}].per_token: the vLLM backend decides a "
                                    f"condition once, on the prompt; re-checking on generated "
                                    f"tokens needs --backend hf")
        return entries

    # ---- API -------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        if self._closed:
            raise ServeError(503, "the server is shutting down", retry_after=5)
        with self._lock:
            full = self._running >= self.max_num_seqs + self.limits.max_queue
        if full:
            self.stats["refused"] += 1
            raise ServeError(**self.limits.busy_error_args())

    def submit(self, prompt_ids: list[int], steering: Sequence[SteeringSpec],
               max_tokens: int, on_token: Callable[[int], None] | None = None,
               temperature: float = 0.0, seed: int | None = None,
               stop: Sequence[str] = (), use_default: bool = True) -> Generation:
        """As :meth:`avec.serve.engine.Engine.submit`: validate, then hand the request to
        vLLM; the :class:`Generation` resolves when its last token is out."""
        check_request(prompt_ids, max_tokens, temperature, self.limits)
        resolved = self.resolve(steering, use_default)
        self.check_capacity()
        names = [self.mirror.acquire(s.vector) for s in resolved]
        entries = [{"vector": n, "coef": s.coef, "layers": list(s.layers), "op": s.op,
                    "positions": s.positions, "value": s.value}
                   for n, s in zip(names, resolved)]
        for entry, s in zip(entries, resolved):
            if s.when is not None:  # the condition's vectors reach vLLM as files too
                mirrored = {name: self.mirror.acquire(vec) for name, vec in s.condition_vectors}
                names.extend(mirrored.values())
                entry["when"] = renamed(to_spec(s.when), mirrored)
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra = {DEFAULT_KEY: "off"}
        if entries:
            extra[EXTRA_ARGS_KEY] = json.dumps(entries)
        params = SamplingParams(temperature=float(temperature), seed=seed,
                                max_tokens=int(max_tokens), stop=list(stop) or None,
                                output_kind=RequestOutputKind.DELTA, extra_args=extra)
        request = _Request(Generation(), len(prompt_ids), names, on_token,
                           time.monotonic() + self.limits.request_timeout_s)
        with self._lock:
            self._running += 1
        task = asyncio.run_coroutine_threadsafe(
            self._generate(list(prompt_ids), params, request), self._loop)
        request.future.add_done_callback(
            lambda f: task.cancel() if f.cancelled() else None)  # stop(): vLLM aborts it
        return request.future

    async def _generate(self, ids: list[int], params: Any, request: _Request) -> None:
        from vllm.exceptions import VLLMValidationError

        future = request.future
        tokens: list[int] = []
        finish, stop_reason = "length", None
        try:
            async with asyncio.timeout(max(0.0, request.deadline - time.monotonic())):
                async for out in self._llm.generate({"prompt_token_ids": ids}, params,
                                                    request_id=f"avec-{secrets.token_hex(8)}"):
                    done = out.outputs[0]
                    new = list(done.token_ids)
                    if done.finish_reason is not None:
                        finish, stop_reason = done.finish_reason, done.stop_reason
                        if finish == "stop" and stop_reason is None and new:
                            new.pop()  # the end-of-sequence token is not part of the text
                    for tok in new:
                        tokens.append(tok)
                        if request.on_token is not None:
                            try:
                                request.on_token(tok)
                            except Exception:  # a broken listener must not fail the request
                                request.on_token = None
        except asyncio.CancelledError:
            return  # the client went away: vLLM aborted the request
        except TimeoutError:
            self._fail(future, ServeError(504, f"generation did not finish within "
                                               f"{self.limits.request_timeout_s:g} s; ask for "
                                               f"fewer max_tokens or retry later"), "timed_out")
            return
        except VLLMValidationError as exc:
            self._fail(future, ServeError(400, f"steering failed: {safe_text(str(exc))}",
                                          param="steering"), "failed")
            return
        except Exception as exc:  # the engine failed: this request gets a 500
            ref = secrets.token_hex(4)
            log.error("vLLM generation failed (ref %s)", ref, exc_info=exc)
            self._fail(future, ServeError(500, f"generation failed: {type(exc).__name__} (a "
                                               f"server error, logged as ref {ref})"), "failed")
            return
        finally:
            for name in request.names:
                self.mirror.release(name)
            with self._lock:
                self._running -= 1
        if not future.done():
            future.set_result(GenerationResult(tokens, request.prompt_tokens,
                                               "length" if finish == "length" else "stop"))
        self.sweep()

    def _fail(self, future: Generation, error: ServeError, counter: str) -> None:
        if not future.done():
            future.set_exception(error)
            self.stats[counter] += 1

    def sweep(self) -> int:
        """Delete mirrored vector files that nothing uses any more."""
        live = [self.registry.get(n) for n in self.registry.names()] + [
            s.vector for s in self.default] + [
            v for s in self.default for _, v in s.condition_vectors]
        return self.mirror.sweep(live)

    def shutdown(self, timeout: float | None = 5.0) -> None:
        self._closed = True
        try:
            if self._llm is not None:
                self._llm.shutdown()
                self._llm = None  # collected now, not at interpreter exit
        finally:
            self._stop_loop(timeout)
            shutil.rmtree(self._dir, ignore_errors=True)

    def _stop_loop(self, timeout: float | None = 5.0) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
