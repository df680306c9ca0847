"""avec.steer on arbitrary torch modules (avec.models.modules.ModuleModel), beyond the maze CNN."""

from __future__ import annotations

import torch
from torch import nn

import avec
from avec.models.modules import ModuleModel, difference_vector, read_sites


def test_an_mlp_and_a_conv1d_are_steered_like_language_models() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    model = ModuleModel(mlp, ["0"])
    x = torch.randn(4, 5)
    vec = avec.SteeringVector({0: torch.randn(7)})
    base = mlp(x)
    with avec.steer(model, vec, coef=2.0):
        steered = mlp(x)
    expected = mlp[2](torch.relu(mlp[0](x) + 2.0 * vec[0]))
    assert torch.allclose(steered, expected, atol=1e-6)
    assert torch.equal(mlp(x), base)

    # a 2-D per-example direction ([C, L]) is a whole activation here, not an ActAdd block
    conv = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh()).eval()
    cmodel = ModuleModel(conv, ["0"])
    y = torch.randn(2, 2, 6)
    diff = difference_vector(cmodel, y[:1], y[1:], [0])
    assert diff.shape == (3, 6)
    with avec.steer(cmodel, diff, op="ablate"):
        h = read_sites(cmodel, y)[0]
    unit = (diff[0] / diff[0].norm()).flatten()
    assert torch.allclose(h.flatten(1) @ unit, torch.zeros(2), atol=1e-5)
    with avec.steer(cmodel, diff, coef=1.0):
        pushed = read_sites(cmodel, y[1:])[0]
    assert torch.allclose(pushed, read_sites(cmodel, y[:1])[0], atol=1e-5), \
        "adding the difference to the negative input's activation gives the positive one"
