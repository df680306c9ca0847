"""Named steering vectors a server can apply: loaded from a directory or uploaded.

Every vector goes through :func:`avec.vector.load_vector` with the served model, so width,
layer range, finiteness and metadata are checked, and nothing is ever unpickled; then
:func:`check_servable` checks what steering will do with it: every direction is ``[d]`` or
``[T, d]`` with T >= 1, floating point, and finite (norm included) in the served model's dtype,
so no vector can bring inf or NaN into a batch. The store is capped in file size, count and
total tensor bytes.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from avec.errors import VectorFileError
from avec.models.model import Model
from avec.vector import SteeringVector, load_vector

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")  # always matched whole (fullmatch)
SUFFIXES = (".safetensors", ".gguf")
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_VECTORS = 256
DEFAULT_MAX_TOTAL_BYTES = 1024 * 1024 * 1024


class RegistryError(ValueError):
    """A registry operation was refused; ``status`` is the HTTP status that fits it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class VectorRegistry:
    """Thread-safe mapping name -> :class:`SteeringVector` for one model.

    ``max_file_bytes`` caps one uploaded file, ``max_vectors`` the number of vectors and
    ``max_total_bytes`` the sum of their tensors' bytes (see :meth:`set_caps`).
    """

    def __init__(self, model: Model, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, *,
                 max_vectors: int = DEFAULT_MAX_VECTORS,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES) -> None:
        self.model = model
        self.max_file_bytes = max_file_bytes
        self.max_vectors = max_vectors
        self.max_total_bytes = max_total_bytes
        self._vectors: dict[str, SteeringVector] = {}
        self._lock = threading.Lock()

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise RegistryError(f"invalid vector name {name!r}: use 1-64 characters from "
                                f"A-Z a-z 0-9 _ . - (not starting with . or -)")
        return name

    def set_caps(self, *, max_file_bytes: int, max_vectors: int, max_total_bytes: int) -> None:
        """Set the store's caps; raise :class:`RegistryError` if it already holds more."""
        with self._lock:
            count, total = len(self._vectors), self._total_bytes()
        if count > max_vectors or total > max_total_bytes:
            raise RegistryError(f"the vector store holds {count} vectors ({total} bytes), more "
                                f"than the limits of {max_vectors} vectors and "
                                f"{max_total_bytes} bytes; load fewer vectors or raise the "
                                f"limits", status=413)
        self.max_file_bytes = max_file_bytes
        self.max_vectors = max_vectors
        self.max_total_bytes = max_total_bytes

    def load_dir(self, directory: str | Path, *, skip_bad: bool = False,
                 on_skip: Callable[[Path, str], None] | None = None) -> list[str]:
        """Load every ``*.safetensors`` / ``*.gguf`` file in ``directory``, named by its stem
        (hidden files are ignored). Returns the names.

        A file that does not load (bad name, bad file, not servable, over a cap) is named with
        its reason: by default nothing is registered and :class:`VectorFileError` lists every
        bad file; with ``skip_bad`` the good files are registered and ``on_skip(path, reason)``
        hears about each bad one.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise VectorFileError(f"{directory}: not a directory of vector files")
        good: list[tuple[str, SteeringVector]] = []
        bad: list[tuple[Path, str]] = []
        for path in sorted(directory.iterdir()):
            if (path.suffix.lower() not in SUFFIXES or path.name.startswith(".")
                    or not path.is_file()):
                continue
            try:
                name = self.check_name(path.stem)
                if path.stat().st_size > self.max_file_bytes:
                    raise RegistryError(f"the file is {path.stat().st_size} bytes; the limit "
                                        f"is {self.max_file_bytes}")
                vec = load_vector(path, self.model)
                check_servable(vec, self.model)
                good.append((name, vec))
            except Exception as exc:  # any parser error is this file's fault: name it
                reason = str(exc).replace(str(path), "").lstrip(": ") or type(exc).__name__
                bad.append((path, reason))
        if bad and not skip_bad:
            listing = "\n".join(f"  {p}: {why}" for p, why in bad)
            raise VectorFileError(f"{len(bad)} bad vector file(s) in {directory}:\n{listing}\n"
                                  f"fix or remove them, or skip them with --skip-bad-vectors")
        for path, why in bad:
            if on_skip is not None:
                on_skip(path, why)
        names = []
        for name, vec in good:
            try:
                self._store(name, vec, replace=True)
            except RegistryError as exc:
                if not skip_bad:
                    raise VectorFileError(f"{directory}: {exc}") from None
                if on_skip is not None:
                    on_skip(directory / name, str(exc))
                continue
            names.append(name)
        return names

    def add(self, name: str, data: bytes, filename: str = "upload.safetensors",
            *, replace: bool = True) -> SteeringVector:
        """Validate uploaded file bytes (via a temporary file and ``load_vector``) and register
        them as ``name``. ``filename``'s suffix picks the format (.gguf, else safetensors)."""
        self.check_name(name)
        if len(data) > self.max_file_bytes:
            raise RegistryError(f"vector file is {len(data)} bytes; the limit is "
                                f"{self.max_file_bytes}", status=413)
        if not data:
            raise RegistryError("the uploaded vector file is empty")
        suffix = ".gguf" if str(filename).lower().endswith(".gguf") else ".safetensors"
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="avec-upload-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            try:
                vec = load_vector(tmp, self.model)
                check_servable(vec, self.model)
            except (VectorFileError, RegistryError) as exc:
                raise RegistryError(str(exc).replace(tmp, f"upload {name!r}")) from None
            except Exception as exc:  # a parser error we do not know: still a bad upload
                raise RegistryError(f"upload {name!r} is not a valid vector file "
                                    f"({type(exc).__name__}: {exc})") from None
        finally:
            os.unlink(tmp)
        self._store(name, vec, replace=replace)
        return vec

    def put(self, name: str, vector: SteeringVector) -> None:
        """Register an in-memory vector (checked against the model and the caps)."""
        self.check_name(name)
        vector.check_model(self.model)
        check_servable(vector, self.model)
        self._store(name, vector, replace=True)

    def _store(self, name: str, vec: SteeringVector, *, replace: bool) -> None:
        """Register ``vec`` as ``name`` if the caps allow it (409 for a name taken or the count
        full, 413 for the bytes)."""
        size = vector_bytes(vec)
        with self._lock:
            old = self._vectors.get(name)
            if old is not None and not replace:
                raise RegistryError(f"a vector named {name!r} already exists", status=409)
            if old is None and len(self._vectors) >= self.max_vectors:
                raise RegistryError(f"the vector store is full ({self.max_vectors} vectors); "
                                    f"delete one (DELETE /v1/vectors/{{name}}) first",
                                    status=409)
            total = self._total_bytes() - (vector_bytes(old) if old is not None else 0) + size
            if total > self.max_total_bytes:
                raise RegistryError(f"vector {name!r} ({size} bytes) would bring the store to "
                                    f"{total} bytes; the limit is {self.max_total_bytes}; "
                                    f"delete vectors first", status=413)
            self._vectors[name] = vec

    def _total_bytes(self) -> int:  # call with the lock held
        return sum(vector_bytes(v) for v in self._vectors.values())

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._vectors:
                raise RegistryError(f"no vector named {name!r}", status=404)
            del self._vectors[name]

    def get(self, name: str) -> SteeringVector:
        with self._lock:
            vec = self._vectors.get(name)
            known = sorted(self._vectors)
        if vec is None:
            raise RegistryError(f"unknown vector {name!r}; known vectors: {known} "
                                f"(GET /v1/vectors lists them)", status=404)
        return vec

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._vectors)

    def list(self) -> list[dict[str, Any]]:
        """Metadata of every vector: name, layers, width, method, per-layer norms."""
        with self._lock:
            items = sorted(self._vectors.items())
        return [describe(n, v) for n, v in items]


def vector_bytes(vec: SteeringVector) -> int:
    """Bytes held by ``vec``'s tensors."""
    return sum(t.numel() * t.element_size() for t in vec.directions.values())


def working_dtype(model: Any) -> torch.dtype:
    """The floating-point dtype steering arithmetic runs in on ``model`` (float32 for a model
    that has none, e.g. llama.cpp's)."""
    dtype = getattr(model, "dtype", torch.float32)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return torch.float32
    return dtype


def check_servable(vec: SteeringVector, model: Any) -> None:
    """Raise :class:`RegistryError` unless every direction of ``vec`` can be steered with on
    ``model`` without bringing inf or NaN into a batch: ``[d]`` or ``[T, d]`` (T >= 1),
    floating point, finite and with a finite norm once cast to the model's dtype."""
    dtype = working_dtype(model)
    for layer, direction in vec.directions.items():
        where = f"layer {layer}"
        shape = tuple(direction.shape)
        if len(shape) not in (1, 2) or 0 in shape:
            raise RegistryError(f"{where}: a direction must be [d] or [T, d] with T >= 1, got "
                                f"shape {list(shape)}")
        if not direction.is_floating_point():
            raise RegistryError(f"{where}: the direction has dtype {direction.dtype}; save it "
                                f"as floating point")
        cast = direction.detach().to(dtype)
        if not bool(torch.isfinite(cast).all()) or not bool(torch.isfinite(cast.norm())):
            raise RegistryError(f"{where}: the direction is not finite in the model's dtype "
                                f"{dtype} (NaN, inf, or too large: max |x| "
                                f"{float(direction.float().abs().max()):.3g}); rescale it")


def describe(name: str, vec: SteeringVector) -> dict[str, Any]:
    """The JSON summary of one registered vector."""
    info = vec.describe()
    rec = vec.recommended
    return {"name": name, "layers": info["layers"], "width": vec.width,
            "method": info.get("method"), "norms": info["norms"],
            "recommended": rec.to_dict() if rec is not None else None}
