"""The vectors a vLLM server can steer with: the files of one directory, loaded with avec's own
checked readers (``.safetensors`` avec vectors, ``.gguf`` control vectors), named by stem.

A name is looked up on disk at every request (one ``stat``), so a file added, replaced or
removed while the server runs is seen at once; what was loaded is kept in a small cache keyed by
the file's identity (size, modification time, inode), so memory is bounded by ``cache_size``
vectors however many distinct files requests name over the server's life.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from avec.errors import AvecError
from avec.vector import SteeringVector, load_vector

SUFFIXES = (".safetensors", ".gguf")
DEFAULT_CACHE_SIZE = 64
MAX_FILE_BYTES = 64 * 1024 * 1024


def check_flat(vector: SteeringVector, where: str) -> None:
    """The vLLM backend steers with ``[d]`` directions; refuse ``[T, d]`` blocks (ActAdd)."""
    if any(v.dim() != 1 for v in vector.directions.values()):
        raise AvecError(f"{where}: the vLLM backend steers with [d] directions; this vector "
                        f"holds per-position [T, d] blocks (ActAdd): use --backend hf")


@contextmanager
def vectors_from(directory: str | Path) -> Iterator[None]:
    """``$AVEC_VLLM_VECTORS`` set to ``directory`` inside the block (vLLM processes started
    there inherit it), restored after."""
    from avec.vllm import VECTORS_ENV

    previous = os.environ.get(VECTORS_ENV)
    os.environ[VECTORS_ENV] = str(directory)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(VECTORS_ENV, None)
        else:
            os.environ[VECTORS_ENV] = previous


@dataclass(frozen=True)
class StoredVector:
    """A loaded vector file: the vector and the sha256 of the file's bytes (its identity in
    the prefix-cache salt and in the worker's slot bank)."""

    vector: SteeringVector
    digest: str


class VectorStore:
    """Vectors by name from ``directory`` (``None``: a store with no vectors)."""

    def __init__(self, directory: str | Path | None, cache_size: int = DEFAULT_CACHE_SIZE
                 ) -> None:
        self.directory = Path(directory) if directory else None
        if self.directory is not None and not self.directory.is_dir():
            raise AvecError(f"$AVEC_VLLM_VECTORS={self.directory} is not a directory; point "
                            f"it at a folder of .safetensors / .gguf vector files")
        self.cache_size = max(1, int(cache_size))
        # file identity -> loaded vector, least recently used first
        self._cache: OrderedDict[tuple, StoredVector] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "VectorStore":
        from avec.vllm import VECTORS_ENV

        return cls(os.environ.get(VECTORS_ENV) or None)

    def path(self, name: str) -> Path | None:
        """The file a (validated) vector name refers to, if there is one."""
        if self.directory is None:
            return None
        for suffix in SUFFIXES:
            p = self.directory / f"{name}{suffix}"
            if p.is_file():
                return p
        return None

    def get(self, name: str) -> StoredVector | None:
        """The vector file ``name`` as it is on disk now (``None`` if there is none). Raises
        :class:`AvecError` for a file that is not a usable vector."""
        path = self.path(name)
        if path is None:
            return None
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        if st.st_size > MAX_FILE_BYTES:
            raise AvecError(f"{path}: {st.st_size} bytes; vector files are limited to "
                            f"{MAX_FILE_BYTES}")
        data = path.read_bytes()
        vec = load_vector(path)
        check_flat(vec, str(path))
        stored = StoredVector(vec, hashlib.sha256(data).hexdigest())
        with self._lock:
            self._cache[key] = stored
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return stored

    def names(self, limit: int = 20) -> list[str]:
        """Up to ``limit`` vector names in the directory (for error messages)."""
        if self.directory is None:
            return []
        found = sorted(p.stem for p in self.directory.iterdir()
                       if p.suffix in SUFFIXES and not p.name.startswith("."))
        return found[:limit]

    def cached(self) -> int:
        """How many loaded vectors the cache holds now."""
        with self._lock:
            return len(self._cache)
