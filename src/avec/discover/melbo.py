"""Unsupervised steering vectors: MELBO (Mack & Turner 2024, "Mechanistically Eliciting Latent
Behaviors in Language Models").

With no labels, learn K vectors ``theta_k``, each added to the output of a source block ``S``
(every position), with ``||theta_k|| = R``, that maximally change a later target block ``T``::

    objective(theta) = sum over prompts of ( sum over target positions t of
                           || h_T,t(theta) - h_T,t(0) ||_2 ^ p ) ^ (1 / q)

Optimisation is projected gradient ascent on the sphere of radius R (Adam on the gradient's
tangent component, then renormalisation); vector k is kept orthogonal to vectors 0..k-1. The
model's weights are frozen and every forward pass stops at block T, so a step costs a forward
through blocks 0..T and a backward through blocks S..T only. The unsteered ``h_T(0)`` is computed
once.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from avec.directions.activations import forward_until, pad_batch
from avec.generation.hf import format_prompt
from avec.models.model import Model
from avec.intervene.steer import steer
from avec.vector import SteeringVector


@dataclass(frozen=True)
class MelboConfig:
    """Settings of one MELBO run (``None`` layers take the defaults of :func:`default_layers`)."""

    source_layer: int | None = None
    target_layer: int | None = None
    radius: float = 8.0  # about 10% of the residual norm at layer 7 of the default model
    num_vectors: int = 8
    steps: int = 200
    lr: float = 0.01
    p: float = 2.0
    q: float = 1.0
    positions: str = "all"  # target positions: "all", "last:K" (last K tokens) or "from:K"
    batch_size: int = 16
    patience: int = 40  # stop when the objective has not improved by tol for this many steps
    tol: float = 1e-3
    chat: bool | None = None  # apply the chat template (default: if the model has one)
    seed: int = 0

    def check(self) -> None:
        if self.radius <= 0 or not math.isfinite(self.radius):
            raise ValueError(f"radius must be a positive number, got {self.radius}")
        if self.num_vectors < 1 or self.steps < 1:
            raise ValueError("num_vectors and steps must be >= 1")
        if self.p <= 0 or self.q <= 0:
            raise ValueError(f"p and q must be > 0, got p={self.p} q={self.q}")
        parse_target_positions(self.positions)


def default_layers(model: Model) -> tuple[int, int]:
    """The paper's choice scaled to the model: source about a quarter of the depth, target
    8 blocks before the end (for a shallow model, three quarters of the depth)."""
    n = model.n_layers
    source = max(1, n // 4)
    target = n - 8 if n - 8 > source else max(source + 1, (3 * n) // 4)
    return source, min(target, n - 1)


def parse_target_positions(spec: str) -> tuple[str, int]:
    if spec == "all":
        return "all", 0
    for kind in ("last", "from"):
        if spec.startswith(kind + ":") and spec[len(kind) + 1:].isdigit():
            k = int(spec[len(kind) + 1:])
            if kind == "last" and k < 1:
                break
            return kind, k
    raise ValueError(f"invalid target positions {spec!r}; use 'all', 'last:K' or 'from:K'")


def target_mask(mask: torch.Tensor, spec: str) -> torch.Tensor:
    """Which tokens of a right-padded batch enter the objective (``[B, T]`` float)."""
    kind, k = parse_target_positions(spec)
    index = mask.long().cumsum(-1) - 1  # index of each real token
    length = mask.long().sum(-1, keepdim=True)
    keep = mask.bool()
    if kind == "last":
        keep &= index >= length - k
    elif kind == "from":
        keep &= index >= k
    return keep.float()


@dataclass
class _Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    weight: torch.Tensor  # [B, T] target-position mask
    base: torch.Tensor  # [B, T, d] unsteered h_T


@dataclass
class MelboVector:
    index: int
    vector: SteeringVector
    objective: float
    steps: int
    history: list[float] = field(default_factory=list)


@dataclass
class MelboResult:
    config: dict[str, Any]
    source_layer: int
    target_layer: int
    vectors: list[MelboVector]
    random_objectives: list[float]
    seconds: float
    seconds_per_step: float

    def cosines(self) -> list[list[float]]:
        units = torch.stack([v.vector[self.source_layer] for v in self.vectors]).double()
        units = units / units.norm(dim=-1, keepdim=True)
        return (units @ units.T).tolist()


class MelboTrainer:
    """Holds the prompts' batches and unsteered targets; trains and scores vectors."""

    def __init__(self, model: Model, prompts: Sequence[str], config: MelboConfig) -> None:
        config.check()
        if not prompts:
            raise ValueError("MELBO needs at least one prompt")
        self.model = model
        self.config = config
        source, target = default_layers(model)
        self.source = model.check_layers([config.source_layer if config.source_layer is not None
                                          else source])[0]
        self.target = model.check_layers([config.target_layer if config.target_layer is not None
                                          else target])[0]
        if self.target <= self.source:
            raise ValueError(f"the target layer ({self.target}) must come after the source layer "
                             f"({self.source})")
        encoded = [format_prompt(model, p, config.chat)[0] for p in prompts]
        pad = model.tokenizer.pad_token_id
        pad = pad if pad is not None else 0
        self.batches: list[_Batch] = []
        for i in range(0, len(encoded), config.batch_size):
            ids, mask, pos = pad_batch(encoded[i:i + config.batch_size], pad, "right",
                                       model.device)
            weight = target_mask(mask, config.positions)
            if not bool((weight.sum(-1) > 0).all()):
                raise ValueError(f"target positions {config.positions!r} leave a prompt with no "
                                 f"token; use 'all' or a smaller K")
            with torch.no_grad():
                base = self._target_states(ids, mask, pos)
            self.batches.append(_Batch(ids, mask, pos, weight, base))

    def _target_states(self, ids: torch.Tensor, mask: torch.Tensor,
                       pos: torch.Tensor) -> torch.Tensor:
        found: dict[int, torch.Tensor] = {}
        forward_until(self.model, [self.target], lambda _L, h: found.__setitem__(0, h),
                      ids, mask, pos)
        return found[0].float()

    def _batch_objective(self, theta: torch.Tensor, batch: _Batch) -> torch.Tensor:
        vec = SteeringVector({self.source: theta})
        with steer(self.model, vec, coef=1.0):
            steered = self._target_states(batch.ids, batch.mask, batch.pos)
        dist = (steered - batch.base).norm(dim=-1)  # [B, T]
        per_prompt = (dist.pow(self.config.p) * batch.weight).sum(-1)
        return per_prompt.pow(1.0 / self.config.q).sum()

    @torch.no_grad()
    def objective(self, theta: torch.Tensor) -> float:
        """The objective of a vector (no gradient)."""
        theta = theta.to(self.model.device, torch.float32)
        return float(sum(self._batch_objective(theta, b) for b in self.batches))

    def _start(self, generator: torch.Generator, earlier: list[torch.Tensor]) -> torch.Tensor:
        theta = torch.randn(self.model.d_model, generator=generator)
        return _on_sphere(theta, earlier, self.config.radius)

    def train(self, progress: bool = False,
              on_vector: Callable[[MelboVector], None] | None = None) -> MelboResult:
        cfg = self.config
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(cfg.seed)
        flags = [p.requires_grad for p in self.model.hf.parameters()]
        self.model.hf.requires_grad_(False)
        earlier: list[torch.Tensor] = []
        vectors: list[MelboVector] = []
        total_steps = 0
        try:
            for k in range(cfg.num_vectors):
                theta = self._start(generator, earlier).to(self.model.device).requires_grad_(True)
                opt = torch.optim.Adam([theta], lr=cfg.lr * cfg.radius)
                history: list[float] = []
                best, best_theta, since = -math.inf, theta.detach().clone(), 0
                bar = tqdm(range(cfg.steps), desc=f"vector {k + 1}/{cfg.num_vectors}",
                           disable=not progress, leave=False)
                for _ in bar:
                    opt.zero_grad()
                    value = 0.0
                    for batch in self.batches:
                        obj = self._batch_objective(theta, batch)
                        (-obj).backward()
                        value += float(obj.detach())
                    history.append(value)
                    total_steps += 1
                    improved = not math.isfinite(best) or value > best + cfg.tol * abs(best)
                    since = 0 if improved else since + 1
                    if value > best:
                        best, best_theta = value, theta.detach().clone()
                    if since >= cfg.patience:
                        break
                    with torch.no_grad():  # tangent component of the gradient only
                        assert theta.grad is not None
                        theta.grad.copy_(_project_out(theta.grad, [theta.detach(), *earlier]))
                    opt.step()
                    with torch.no_grad():
                        theta.copy_(_on_sphere(theta.detach(), earlier, cfg.radius))
                    bar.set_postfix(objective=f"{value:.4g}")
                final = best_theta.cpu()
                earlier.append(final)
                item = MelboVector(k, self._as_vector(final, k, best, len(history)),
                                   best, len(history), [round(h, 6) for h in history])
                vectors.append(item)
                if on_vector is not None:
                    on_vector(item)
            random_generator = torch.Generator().manual_seed(cfg.seed + 7919)
            randoms = [self.objective(_on_sphere(torch.randn(self.model.d_model,
                                                             generator=random_generator),
                                                 [], cfg.radius))
                       for _ in range(cfg.num_vectors)]
        finally:
            for p, flag in zip(self.model.hf.parameters(), flags):
                p.requires_grad_(flag)
        seconds = time.perf_counter() - start
        return MelboResult(asdict(cfg), self.source, self.target, vectors, randoms,
                           round(seconds, 2), round(seconds / max(total_steps, 1), 4))

    def _as_vector(self, theta: torch.Tensor, index: int, objective: float,
                   steps: int) -> SteeringVector:
        cfg = self.config
        return SteeringVector({self.source: theta.float()}, {
            "method": "melbo", "model": self.model.identity(), "index": index,
            "objective": round(objective, 6), "radius": cfg.radius,
            "source_layer": self.source, "target_layer": self.target, "p": cfg.p, "q": cfg.q,
            "target_positions": cfg.positions, "steps": steps, "seed": cfg.seed,
            "n_prompts": sum(int(b.ids.shape[0]) for b in self.batches),
            "positions": "all"})


def _project_out(x: torch.Tensor, directions: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x`` minus its components along each direction (Gram-Schmidt on the directions)."""
    basis: list[torch.Tensor] = []
    for d in directions:
        d = d.to(x.device, x.dtype)
        for b in basis:
            d = d - (d @ b) * b
        n = d.norm()
        if n > 1e-12:
            basis.append(d / n)
    for b in basis:
        x = x - (x @ b) * b
    return x


def _on_sphere(theta: torch.Tensor, earlier: Sequence[torch.Tensor],
               radius: float) -> torch.Tensor:
    theta = _project_out(theta.float(), earlier)
    return theta * (radius / theta.norm().clamp(min=1e-12))


def train_melbo(model: Model, prompts: Sequence[str], config: MelboConfig = MelboConfig(),
                progress: bool = False,
                on_vector: Callable[[MelboVector], None] | None = None) -> MelboResult:
    """Learn ``config.num_vectors`` MELBO vectors on ``prompts`` (see the module docstring)."""
    return MelboTrainer(model, prompts, config).train(progress, on_vector)
