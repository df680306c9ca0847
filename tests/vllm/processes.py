"""Servers the tests start as subprocesses, each in a session of its own, so every process it
spawns (vLLM's engine core and workers) can be found, and none outlives its test."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def survivors(session: int) -> list[int]:
    """PIDs still alive in ``session`` (a process group id)."""
    out = subprocess.run(["ps", "-o", "pid=,pgid=,stat=", "-e"], capture_output=True, text=True)
    pids = []
    for line in out.stdout.splitlines():
        pid, pgid, stat = line.split(None, 2)
        if int(pgid) == session and not stat.startswith("Z"):
            pids.append(int(pid))
    return pids


def stop(proc: subprocess.Popen, timeout: float = 90.0) -> list[int]:
    """SIGTERM ``proc`` (started with ``start_new_session=True``), wait for it, and return the
    PIDs of its session that were still alive ``timeout`` seconds later (then kill them)."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.time() + timeout
    left = survivors(proc.pid)
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = survivors(proc.pid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
