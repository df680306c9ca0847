"""``avec.models.hooks.installed_hooks``: the one place avec registers hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from avec.models.hooks import installed_hooks


def _hook_counts(module: nn.Module) -> tuple[int, int]:
    return len(module._forward_hooks), len(module._forward_pre_hooks)


def test_hooks_fire_inside_and_are_gone_after():
    lin = nn.Linear(3, 3)
    calls: list[str] = []
    with installed_hooks() as hooks:
        hooks.pre(lin, lambda _m, _a: calls.append("pre"))
        hooks.forward(lin, lambda _m, _a, _o: calls.append("post"))
        hooks.forward(lin, lambda _m, _a, _o: calls.append("first"), prepend=True)
        assert len(hooks) == 3
        lin(torch.zeros(1, 3))
    assert calls == ["pre", "first", "post"]
    assert _hook_counts(lin) == (0, 0)
    lin(torch.zeros(1, 3))
    assert calls == ["pre", "first", "post"]


def test_hooks_are_removed_when_the_body_raises():
    lin = nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match="boom"):
        with installed_hooks() as hooks:
            hooks.forward(lin, lambda *_: None)
            hooks.pre(lin, lambda _m, args, kwargs: None, with_kwargs=True)
            raise RuntimeError("boom")
    assert _hook_counts(lin) == (0, 0)


def test_hooks_are_removed_when_a_later_registration_fails():
    lin = nn.Linear(3, 3)
    with pytest.raises(AttributeError):
        with installed_hooks() as hooks:
            hooks.forward(lin, lambda *_: None)
            hooks.forward(None, lambda *_: None)  # type: ignore[arg-type]
    assert _hook_counts(lin) == (0, 0)


def test_a_hook_that_replaces_the_output_is_applied():
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with installed_hooks() as hooks:
        hooks.forward(lin, lambda _m, _a, out: out * 0)
        assert torch.equal(lin(x), torch.zeros(2, 3))
    assert not torch.equal(lin(x), torch.zeros(2, 3))
