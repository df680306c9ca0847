"""Convert a GGUF file to a Hugging Face safetensors directory once, and reuse it.

The cache entry for a file lives in ``<cache_root>/models/<stem>-<sha256[:16]>``; the key is the
hash of the file's bytes, so a changed file gets a new entry. An entry is written to a temporary
directory and renamed into place only when complete, so a half-written cache is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from avec.errors import ModelLoadError

COMPLETE_MARKER = "avec-cache.json"


def cache_root() -> Path:
    """``$AVEC_CACHE`` if set, else ``$XDG_CACHE_HOME/avec`` or ``~/.cache/avec``."""
    env = os.environ.get("AVEC_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "avec"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_entry(path: Path, root: Path | None = None, sha256: str | None = None) -> Path:
    """Directory where the converted copy of ``path`` lives (whether or not it exists yet)."""
    root = cache_root() if root is None else root
    sha256 = file_sha256(path) if sha256 is None else sha256
    return root / "models" / f"{path.stem}-{sha256[:16]}"


def is_complete(entry: Path) -> bool:
    return (entry / COMPLETE_MARKER).is_file()


def ensure_converted(path: Path, convert: Callable[[Path, Path], None],
                     root: Path | None = None) -> Path:
    """Return the cache entry for ``path``, calling ``convert(path, tmp_dir)`` if it is missing.

    ``convert`` writes a loadable directory into ``tmp_dir``; it is renamed into place after the
    completion marker is written. Concurrent converters are safe: the first rename wins.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    sha256 = file_sha256(path)
    entry = cache_entry(path, root, sha256)
    if is_complete(entry):
        return entry
    if entry.exists():  # not complete: left by an older layout or a crash; never used
        shutil.rmtree(entry, ignore_errors=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        convert(path, tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(
            {"source": str(path), "sha256": sha256, "size": path.stat().st_size}))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not is_complete(entry):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry
