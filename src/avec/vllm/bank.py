"""The worker's slot bank: every direction the running requests steer with, in one persistent
tensor on the model's device, reference-counted and recycled.

``directions[L, s]`` is slot ``s``'s direction at layer ``L`` (zeros where its vector has no
layer ``L``) and ``inv_norm[L, s]`` the inverse of its norm (0 for zeros). Slot 0 is zeros for
good: a row that is not steered reads it, and adding ``0 * 0`` leaves it exact. A slot holds one
vector file, found by the sha256 of its bytes; the requests that use it hold a reference each,
released when they finish. A released slot keeps its vector until its space is needed (a vector
used again soon is not copied again); the bank only grows, by doubling, when more distinct
vectors are in use at once than it holds, so its size is bounded by the engine's concurrency
(``max_num_seqs`` x the entries per request), not by how many vectors were ever used.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from avec.vector import SteeringVector


class SlotBank:
    def __init__(self, n_layers: int, d_model: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 16) -> None:
        self.n_layers, self.d_model = n_layers, d_model
        self.dtype, self.device = dtype, torch.device(device)
        capacity = max(2, int(capacity))
        self.directions = torch.zeros(n_layers, capacity, d_model, dtype=dtype,
                                      device=self.device)
        self.inv_norm = torch.zeros(n_layers, capacity, dtype=dtype, device=self.device)
        self._refs = [0] * capacity
        self._slot_of: dict[str, int] = {}  # digest -> slot holding it
        self._digest_of: dict[int, str] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # released, still loaded; LRU first
        self._empty = list(range(capacity - 1, 0, -1))  # never used (pop from the end)
        self.loads = 0  # vectors copied in (a measure of recycling)

    @property
    def capacity(self) -> int:
        return len(self._refs)

    def in_use(self) -> int:
        """Slots referenced by at least one request."""
        return sum(1 for r in self._refs[1:] if r > 0)

    def refs(self, slot: int) -> int:
        return self._refs[slot]

    def acquire(self, digest: str, load: Callable[[], SteeringVector]) -> int:
        """A slot holding the vector whose file hashes to ``digest`` (``load()`` gives it when
        no slot holds it yet), with one more reference."""
        slot = self._slot_of.get(digest)
        if slot is None:
            vector = load()
            slot = self._free_slot()
            self._write(slot, vector)
            self._slot_of[digest] = slot
            self._digest_of[slot] = digest
            self.loads += 1
        self._idle.pop(slot, None)
        self._refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot <= 0 or self._refs[slot] <= 0:
            raise ValueError(f"slot {slot} is not held")
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._idle[slot] = None

    def _free_slot(self) -> int:
        if self._empty:
            return self._empty.pop()
        if self._idle:
            slot, _ = self._idle.popitem(last=False)
            del self._slot_of[self._digest_of.pop(slot)]
            return slot
        self._grow()
        return self._empty.pop()

    def _grow(self) -> None:
        old = self.capacity
        new = old * 2
        directions = torch.zeros(self.n_layers, new, self.d_model, dtype=self.dtype,
                                 device=self.device)
        inv_norm = torch.zeros(self.n_layers, new, dtype=self.dtype, device=self.device)
        directions[:, :old] = self.directions
        inv_norm[:, :old] = self.inv_norm
        self.directions, self.inv_norm = directions, inv_norm
        self._refs.extend([0] * old)
        self._empty = list(range(new - 1, old - 1, -1))

    def _write(self, slot: int, vector: SteeringVector) -> None:
        self.directions[:, slot].zero_()
        self.inv_norm[:, slot].zero_()
        for layer, v in vector.directions.items():
            if not 0 <= layer < self.n_layers:
                continue  # checked at admission; a stale file cannot write out of range
            v = v.to(device=self.device, dtype=self.dtype)
            self.directions[layer, slot] = v
            norm = v.norm()
            if float(norm) > 0:
                self.inv_norm[layer, slot] = 1.0 / norm
