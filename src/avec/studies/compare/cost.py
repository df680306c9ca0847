"""What an intervention costs to obtain: wall seconds, CPU seconds and peak extra resident memory.

:class:`Meter` times a block of work in wall seconds and in CPU seconds (the process's user +
system time over all its threads: what the work consumed, which other load on a shared machine
does not inflate the way it inflates wall time), and samples the process's resident set size
(RSS, from ``/proc/self/statm``) every few milliseconds on a background thread; ``peak_mb`` is
the highest sample minus the RSS at the start. Before the start the garbage collector runs and
glibc's ``malloc_trim`` hands freed heap pages back to the system, so memory freed by earlier
work is not silently reused and missed. What it measures is therefore *the extra memory the
block made resident*: for a steering vector the forward passes that read the activations and
the fit; for LoRA the copy of the model, the adapters, their optimizer state and the
activations kept for the backward pass. Sampling can miss a spike shorter than the interval,
so it is a lower bound.

Where ``/proc`` is missing (macOS, Windows) it falls back to the growth of
``resource.getrusage``'s ``ru_maxrss``, the process's high-water mark, which rises only when a
block exceeds every earlier peak: a lower bound that is often 0. ``Meter.method`` says which.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MB = 2.0 ** 20


def rss_bytes() -> int | None:
    """Current resident set size of this process, or None where ``/proc`` is not available."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _trim() -> None:
    """Return freed heap memory to the system (glibc only; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Meter:
    """``with Meter() as m: ...`` then ``m.seconds`` and ``m.peak_mb`` (see the module doc)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.peak_mb = 0.0
        self.method = "rss_sampled" if rss_bytes() is not None else "maxrss_delta"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_bytes = 0
        self._peak_bytes = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_bytes() or 0
            if now > self._peak_bytes:
                self._peak_bytes = now

    def __enter__(self) -> "Meter":
        gc.collect()
        _trim()
        if self.method == "rss_sampled":
            self._start_bytes = self._peak_bytes = rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._start_bytes = _max_rss_bytes()
        self._t0 = time.perf_counter()
        self._cpu0 = _cpu_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = _cpu_time() - self._cpu0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak_bytes = max(self._peak_bytes, rss_bytes() or 0)
        else:
            self._peak_bytes = _max_rss_bytes()
        self.peak_mb = max(0, self._peak_bytes - self._start_bytes) / MB


def _cpu_time() -> float:
    """User + system CPU seconds of this process so far, all threads included."""
    t = os.times()
    return t.user + t.system


def combine(*parts: Meter) -> dict[str, float]:
    """The cost of work done in steps one after another: seconds add up, the peak is the
    largest step's peak (each step's peak is measured from its own start)."""
    return {"seconds": sum(p.seconds for p in parts),
            "cpu_seconds": sum(p.cpu_seconds for p in parts),
            "peak_mb": max(p.peak_mb for p in parts)}


def machine() -> dict[str, Any]:
    """What the seconds were measured on: CPU threads torch used and the memory measure."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "memory_measure": Meter().method}
