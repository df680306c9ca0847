"""Reading block outputs from llama.cpp, for conditions (CAST) on the llama.cpp backend.

llama.cpp exposes no hidden states, but a context created with an *eval callback*
(``cb_eval``) is shown each graph node as it is computed. :class:`BlockReader` owns a second
context over the already loaded model (the weights are shared; only its own KV cache is new)
whose callback copies the nodes named ``l_out-L`` (block L's output, the site avec reads and
steers) for the layers asked for. A prompt is decoded there once, with the control vector the
request's prompt tokens get, and the mean over the tokens after the first is returned: the value
a condition compares (:mod:`avec.intervene.conditions`).

llama.cpp adds block L's control vector before naming the node ``l_out-L``; avec's HF steering
reads a condition layer before that layer's own steering, so the reader subtracts the layer's
control row from what it copies. The last block's output is cut to the last token by llama.cpp
(only its logits are needed), so a condition cannot read the last layer here.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from avec.errors import SteeringError

_NODE = "l_out-"


def _ggml(lib: Any) -> ctypes.CDLL:
    """ggml's base library, as llama-cpp-python loaded it (tensor names and data)."""
    folder = Path(lib.__file__).resolve().parent / "lib"
    names = sorted(folder.glob("libggml-base.*")) if folder.is_dir() else []
    if not names:
        raise SteeringError(f"llama-cpp-python's ggml library was not found in {folder}; "
                            f"conditions need it on the llama.cpp backend")
    ggml = ctypes.CDLL(str(names[0]))
    ggml.ggml_get_name.restype = ctypes.c_char_p
    ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_nelements.restype = ctypes.c_int64
    ggml.ggml_nelements.argtypes = [ctypes.c_void_p]
    ggml.ggml_nbytes.restype = ctypes.c_size_t
    ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_tensor_get.restype = None
    ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                             ctypes.c_size_t]
    return ggml


class BlockReader:
    """Block outputs of prompts, from a second llama.cpp context over ``model_ptr``."""

    def __init__(self, lib: Any, model_ptr: Any, *, n_ctx: int, n_layers: int, d_model: int,
                 n_threads: int | None = None) -> None:
        self._lib, self._ggml = lib, _ggml(lib)
        self.n_layers, self.d_model, self.n_ctx = n_layers, d_model, n_ctx
        self._wanted: dict[bytes, int] = {}
        self._rows: dict[int, list[np.ndarray]] = {}
        self._error: str | None = None
        # keep a reference: llama.cpp calls it for as long as the context lives
        self._callback = lib.ggml_backend_sched_eval_callback(self._on_node)
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = params.n_threads_batch = n_threads or os.cpu_count() or 1
        params.cb_eval = self._callback
        params.cb_eval_user_data = None
        params.embeddings = False
        self.ctx = lib.llama_init_from_model(model_ptr, params)
        if not self.ctx:
            raise SteeringError("llama.cpp could not create the context that reads hidden "
                                "states for conditions")
        self._installed: bytes | None = None

    def _on_node(self, tensor: Any, ask: bool, _user: Any) -> bool:
        try:
            name = self._ggml.ggml_get_name(tensor) or b""
            layer = self._wanted.get(name)
            if ask:
                return layer is not None
            if layer is None:
                return True
            n = int(self._ggml.ggml_nelements(tensor))
            nbytes = int(self._ggml.ggml_nbytes(tensor))
            if nbytes != 4 * n or n % self.d_model:
                self._error = (f"llama.cpp's {name.decode()} is not a float32 "
                               f"[tokens, {self.d_model}] tensor ({nbytes} bytes, {n} values)")
                return True
            out = np.empty(n, dtype=np.float32)
            self._ggml.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, nbytes)
            self._rows[layer].append(out.reshape(-1, self.d_model))
        except Exception as exc:  # never raise through C
            self._error = f"{type(exc).__name__}: {exc}"
        return True

    def _install(self, control: np.ndarray) -> None:
        key = control.tobytes()
        if key == self._installed:
            return
        ptr = control.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = self._lib.llama_set_adapter_cvec(self.ctx, ptr, control.size, self.d_model, 1,
                                              self.n_layers - 1)
        if rc != 0:
            raise SteeringError(f"llama.cpp refused the control vector (code {rc})")
        self._installed = key

    def prompt_means(self, tokens: Sequence[int], layers: Sequence[int],
                     control: np.ndarray | None = None) -> dict[int, np.ndarray]:
        """``{layer: [d]}``: the mean block output over the prompt's tokens after the first
        (zeros for a one-token prompt), with ``control`` (llama.cpp's control buffer, blocks
        1..n-1) steering the prompt, read before each layer's own control row."""
        layers = sorted(set(int(L) for L in layers))
        for L in layers:
            if not 0 <= L < self.n_layers - 1:
                raise SteeringError(f"a condition at layer {L} cannot be read on the llama.cpp "
                                    f"backend (layers 0..{self.n_layers - 2}: llama.cpp keeps "
                                    f"only the last token of the last block)")
        if not 0 < len(tokens) <= self.n_ctx:
            raise SteeringError(f"a prompt of {len(tokens)} tokens; the llama.cpp context "
                                f"holds {self.n_ctx}")
        if control is None:
            control = np.zeros((self.n_layers - 1) * self.d_model, dtype=np.float32)
        self._install(control)
        self._wanted = {f"{_NODE}{L}".encode(): L for L in layers}
        self._rows = {L: [] for L in layers}
        self._error = None
        lib = self._lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        ids = (lib.llama_token * len(tokens))(*[int(t) for t in tokens])
        rc = lib.llama_decode(self.ctx, lib.llama_batch_get_one(ids, len(tokens)))
        self._wanted = {}
        if rc != 0:
            raise SteeringError(f"llama.cpp could not decode the prompt to read a condition "
                                f"(code {rc})")
        if self._error is not None:
            raise SteeringError(f"reading llama.cpp's hidden states failed: {self._error}")
        out = {}
        for L in layers:
            rows = np.concatenate(self._rows[L]) if self._rows[L] else np.zeros(
                (0, self.d_model), np.float32)
            if rows.shape[0] != len(tokens):
                raise SteeringError(f"llama.cpp gave {rows.shape[0]} rows of block {L} for a "
                                    f"prompt of {len(tokens)} tokens")
            if L >= 1:  # the block's own control row, added before the node is named
                rows = rows - control[(L - 1) * self.d_model:L * self.d_model]
            out[L] = rows[1:].mean(0) if len(tokens) > 1 else np.zeros(self.d_model,
                                                                         np.float32)
        self._rows = {}
        return out

    def close(self) -> None:
        if self.ctx:
            self._lib.llama_free(self.ctx)
            self.ctx = None


__all__ = ["BlockReader"]
