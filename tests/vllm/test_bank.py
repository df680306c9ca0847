"""The worker's slot bank: references, recycling, growth (no engine)."""

from __future__ import annotations

import pytest
import torch

from avec.vector import SteeringVector
from avec.vllm.bank import SlotBank


def vec(x: float, layers=(0, 2)) -> SteeringVector:
    return SteeringVector({L: torch.full((4,), x) for L in layers})


def test_a_slot_holds_its_vector_at_its_layers_only():
    bank = SlotBank(3, 4, torch.float32, "cpu", capacity=4)
    s = bank.acquire("a", lambda: vec(2.0))
    assert s != 0 and torch.equal(bank.directions[0, s], torch.full((4,), 2.0))
    assert torch.equal(bank.directions[1, s], torch.zeros(4)) and bank.inv_norm[1, s] == 0
    assert torch.isclose(bank.inv_norm[2, s], torch.tensor(0.25))
    assert torch.equal(bank.directions[:, 0], torch.zeros(3, 4))  # slot 0 stays zeros


def test_references_share_and_release_keeps_the_vector_until_needed():
    bank = SlotBank(3, 4, torch.float32, "cpu", capacity=3)
    a = bank.acquire("a", lambda: vec(1.0))
    assert bank.acquire("a", lambda: pytest.fail("loaded twice")) == a and bank.refs(a) == 2
    bank.release(a)
    bank.release(a)
    assert bank.in_use() == 0
    assert bank.acquire("a", lambda: pytest.fail("reloaded an idle slot")) == a  # still there
    bank.release(a)
    b = bank.acquire("b", lambda: vec(2.0))  # a never-used slot first
    bank.release(b)
    c = bank.acquire("c", lambda: vec(3.0))  # then the least recently released: a's
    assert c == a and torch.equal(bank.directions[0, c], torch.full((4,), 3.0))
    with pytest.raises(ValueError, match="not held"):
        bank.release(b)


def test_the_bank_grows_only_when_more_vectors_are_in_use_at_once():
    bank = SlotBank(2, 4, torch.float32, "cpu", capacity=4)
    held = [bank.acquire(str(i), lambda i=i: vec(float(i + 1), (0,))) for i in range(10)]
    assert bank.capacity == 16 and bank.in_use() == 10
    for i, s in enumerate(held):  # growth kept every vector in place
        assert torch.equal(bank.directions[0, s], torch.full((4,), float(i + 1)))
    for s in held:
        bank.release(s)
    for i in range(100):
        bank.release(bank.acquire(f"x{i}", lambda: vec(1.0, (1,))))
    assert bank.capacity == 16
