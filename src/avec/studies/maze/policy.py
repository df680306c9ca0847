"""An IMPALA-style residual CNN policy over the maze's symbolic observation, and its file format.

Layout (named like the network in Mini, Turner et al. 2023, so sites read the same)::

    embedder.block1   conv 3x3 -> maxpool 3/1 -> res1 -> res2     [C1, 15, 15] on a 15x15 world
    embedder.block2   conv 3x3 -> maxpool 3/2 -> res1 -> res2     [C2, 8, 8]
    embedder.block3   conv 3x3 -> maxpool 3/2 -> res1 -> res2     [C3, 4, 4]
    embedder.fc       relu -> flatten -> linear -> relu            [hidden]
    fc_policy         linear -> 4 logits (up, down, left, right)

IMPALA pools with stride 2 in every stage; on a symbolic grid (one pixel per cell, where
procgen has ~2.5) the first stage keeps stride 1 so block1 is a cell-level map of the maze
(``strides`` in the config).

A policy file is a safetensors file whose metadata key ``"avec-maze"`` holds the configuration
and training record as JSON; nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from avec.formats.jsonsafe import JSONInputError, loads
from avec.formats.safetensors_check import check_safetensors

METADATA_KEY = "avec-maze"


@dataclass(frozen=True)
class PolicyConfig:
    world: int = 15
    channels: tuple[int, ...] = (16, 32, 32)
    hidden: int = 256
    strides: tuple[int, ...] = (1, 2, 2)

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.channels) or any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"strides {self.strides} must be 1 or 2, one per stage of "
                             f"channels {self.channels}")

    def spatial(self, stage: int) -> int:
        """Side length after the first ``stage`` poolings (3x3, padding 1)."""
        side = self.world
        for stride in self.strides[:stage]:
            side = (side + stride - 1) // stride
        return side


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.resadd = nn.Identity()  # a hook site for the block's output (x + residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.conv0(torch.relu(x))))
        return self.resadd(x + out)


class ConvSequence(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.maxpool = nn.MaxPool2d(3, stride=stride, padding=1)
        self.res1 = ResidualBlock(out_channels)
        self.res2 = ResidualBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.res1(self.maxpool(self.conv(x))))


class Embedder(nn.Module):
    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        chans = (3, *config.channels)
        for i in range(len(config.channels)):
            self.add_module(f"block{i + 1}",
                            ConvSequence(chans[i], chans[i + 1], config.strides[i]))
        side = config.spatial(len(config.channels))
        self.fc = nn.Linear(chans[-1] * side * side, config.hidden)
        self.n_blocks = len(config.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_blocks):
            x = getattr(self, f"block{i + 1}")(x)
        return torch.relu(self.fc(torch.relu(x).flatten(1)))


class MazePolicy(nn.Module):
    """Maps ``[B, 3, world, world]`` observations to ``[B, 4]`` move logits."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__()
        self.config = config or PolicyConfig()
        self.embedder = Embedder(self.config)
        self.fc_policy = nn.Linear(self.config.hidden, 4)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.dim() != 4 or tuple(obs.shape[1:]) != (3, self.config.world, self.config.world):
            raise ValueError(f"expected observations [B, 3, {self.config.world}, "
                             f"{self.config.world}], got {tuple(obs.shape)}")
        return self.fc_policy(self.embedder(obs))

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def save_policy(policy: MazePolicy, path: str | Path, record: dict[str, Any] | None = None,
                half: bool = True) -> Path:
    """Write the weights (float16 by default: half the size, same moves) and the config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in policy.state_dict().items()}
    meta = {"config": {**asdict(policy.config), "channels": list(policy.config.channels),
                       "strides": list(policy.config.strides)},
            "record": record or {}}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def load_policy(path: str | Path) -> tuple[MazePolicy, dict[str, Any]]:
    """A policy (float32, eval mode) and its training record from a file written by
    :func:`save_policy`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such policy file; train one with `avec maze train`")
    check_safetensors(path)  # bounded header check before safetensors allocates anything
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path}: not an avec maze policy (no '{METADATA_KEY}' metadata)")
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    try:
        meta = loads(raw, max_depth=8)
        cfg = meta["config"]
        policy = MazePolicy(PolicyConfig(
            world=int(cfg["world"]), channels=tuple(int(c) for c in cfg["channels"]),
            hidden=int(cfg["hidden"]),
            strides=tuple(int(s) for s in cfg.get("strides", [2] * len(cfg["channels"])))))
        policy.load_state_dict(tensors)
    except (JSONInputError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a valid avec maze policy ({type(exc).__name__}: {exc}); "
                         f"train one with `avec maze train`") from None
    policy.eval()
    return policy, meta.get("record", {})


def default_policy_path() -> Path:
    """The policy shipped with avec (trained by `avec maze train` with default settings)."""
    return Path(__file__).with_name("policy.safetensors")
