"""Train a TopK sparse autoencoder on a tensor of activations (Gao et al. 2024, "Scaling and
evaluating sparse autoencoders"), and measure an SAE on activations.

Training: Adam on the mean squared reconstruction error, batches drawn from a seeded
permutation each epoch, tied initialisation with ``b_dec`` at the data's geometric median,
decoder rows kept at unit norm (the gradient component parallel to each row is removed before
the step, and rows are renormalised after it), and an optional AuxK loss in which latents that
have not fired for ``dead_window`` steps reconstruct the residual. The same seed and data give
the same SAE on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from avec.sae.model import SAEConfig, SAEError, SparseAutoencoder

Progress = Callable[[int, int, float], None]  # (step, total steps, loss of this step)


@dataclass
class SAETrainConfig:
    """How to train a TopK SAE.

    Args:
        d_sae: number of latents.
        k: latents kept per row.
        lr: Adam learning rate.
        batch_size: rows per step.
        epochs: passes over the data (ignored when ``steps`` is given).
        steps: total optimiser steps (overrides ``epochs``; may stop mid-epoch).
        seed: seeds the initialisation and the batch order.
        aux_k: dead latents used by the AuxK loss (default ``d_in // 2``).
        aux_k_coef: weight of the AuxK loss (0 turns it off).
        dead_window: a latent that has not fired for this many steps counts as dead.
        b_dec_init: ``"geometric_median"``, ``"mean"`` or ``"zeros"``.
        log_every: steps between entries of the loss history.
    """

    d_sae: int
    k: int = 32
    lr: float = 1e-3
    batch_size: int = 256
    epochs: int = 10
    steps: int | None = None
    seed: int = 0
    aux_k: int | None = None
    aux_k_coef: float = 1.0 / 32
    dead_window: int = 1000
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    log_every: int = 100

    def __post_init__(self) -> None:
        positive = {"d_sae": self.d_sae, "k": self.k, "batch_size": self.batch_size,
                    "epochs": self.epochs, "dead_window": self.dead_window,
                    "log_every": self.log_every}
        if self.steps is not None:
            positive["steps"] = self.steps
        if self.aux_k is not None:
            positive["aux_k"] = self.aux_k
        bad = {name: value for name, value in positive.items() if int(value) < 1}
        if bad:
            raise SAEError(f"SAE training settings must be >= 1: {bad}")
        if self.k > self.d_sae:
            raise SAEError(f"k={self.k} is larger than d_sae={self.d_sae}; use k <= d_sae")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SAEError(f"lr must be a positive number, got {self.lr}")
        if self.aux_k_coef < 0:
            raise SAEError(f"aux_k_coef must be >= 0, got {self.aux_k_coef}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise SAEError(f"unknown b_dec_init {self.b_dec_init!r}; use 'geometric_median', "
                           f"'mean' or 'zeros'")


def _as_rows(activations: torch.Tensor) -> torch.Tensor:
    if activations.dim() < 2 or activations.shape[0] == 0 or activations.shape[-1] == 0:
        raise SAEError(f"expected activations [N, d_in] with N >= 1, got shape "
                       f"{tuple(activations.shape)}")
    rows = activations.detach().reshape(-1, activations.shape[-1]).float()
    if not torch.isfinite(rows).all():
        raise SAEError("activations contain NaN or inf; drop those rows before training")
    return rows


@torch.no_grad()
def sae_metrics(sae: SparseAutoencoder, activations: torch.Tensor,
                batch_size: int = 4096) -> dict[str, Any]:
    """Reconstruction and sparsity of ``sae`` on ``activations [..., d_in]``.

    Returns plain numbers: ``fve`` (fraction of variance explained,
    1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2), ``mse`` (per element), ``l0`` (mean number of
    nonzero latents per row), ``dead_latents`` (never nonzero on these rows),
    ``dead_fraction`` and ``n_samples``.
    """
    x = _as_rows(activations)
    n = x.shape[0]
    device = sae.W_enc.device
    sq_err = sq_sum = 0.0
    col_sum = torch.zeros(x.shape[1], dtype=torch.float64)
    nonzero = 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for start in range(0, n, batch_size):
        batch = x[start:start + batch_size].to(device)
        x_hat, z = sae(batch)
        batch64 = batch.double()
        sq_err += float((x_hat.double() - batch64).pow(2).sum())
        sq_sum += float(batch64.pow(2).sum())
        col_sum += batch64.sum(0).cpu()
        active = z != 0
        nonzero += int(active.sum())
        fired |= active.any(0).cpu()
    total = sq_sum - float(col_sum.pow(2).sum()) / n  # sum |x - mean|^2
    fve = 1.0 - sq_err / total if total > 0 else float("nan")
    dead = int((~fired).sum())
    return {"fve": fve, "mse": sq_err / x.numel(), "l0": nonzero / n, "dead_latents": dead,
            "dead_fraction": dead / sae.d_sae, "n_samples": n}


def _aux_k_loss(sae: SparseAutoencoder, pre: torch.Tensor, residual: torch.Tensor,
                dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """Normalised error of the top ``aux_k`` dead latents reconstructing the residual."""
    k_aux = min(aux_k, int(dead.sum()))
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(k_aux, dim=-1)
    aux_z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    residual_hat = aux_z @ sae.W_dec
    return (residual_hat - residual).pow(2).mean() / residual.pow(2).mean().clamp_min(1e-12)


def train_sae(activations: torch.Tensor, config: SAETrainConfig,
              progress: Progress | None = None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train a TopK SAE on ``activations [N, d_in]`` (on their device).

    ``progress(step, total_steps, loss)`` is called after every step. Returns the SAE and a
    record: the config, ``n_samples``, ``d_in``, ``steps``, ``epochs`` (possibly fractional),
    ``history`` (``{"step", "epoch", "loss", "mse", "aux_loss"}`` averaged over each
    ``log_every`` window), ``epoch_losses`` (mean loss per epoch), ``metrics``
    (:func:`sae_metrics` on all the activations) and ``seconds``.
    """
    started = time.perf_counter()
    x = _as_rows(activations).to(activations.device)
    n, d_in = x.shape
    sae = SparseAutoencoder(
        SAEConfig(d_in=d_in, d_sae=config.d_sae, k=config.k, activation="topk",
                  metadata={"method": "avec.sae.train", "train": asdict(config)}),
        seed=config.seed).to(x.device)
    order = torch.Generator().manual_seed(config.seed)
    if config.b_dec_init != "zeros":
        sample = torch.randperm(n, generator=order)[:4096].to(x.device)
        sae.init_b_dec(x[sample], config.b_dec_init)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    per_epoch = math.ceil(n / config.batch_size)
    total = config.steps if config.steps is not None else config.epochs * per_epoch
    aux_k = config.aux_k or max(1, d_in // 2)
    since_fired = torch.zeros(config.d_sae, dtype=torch.long, device=x.device)
    history: list[dict[str, Any]] = []
    epoch_losses: list[float] = []
    window = {"loss": 0.0, "mse": 0.0, "aux_loss": 0.0, "n": 0}
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=order).to(x.device)
        epoch_sum, epoch_n = 0.0, 0
        for start in range(0, n, config.batch_size):
            if step >= total:
                break
            batch = x[perm[start:start + config.batch_size]]
            pre = sae.pre_activation(batch)
            z = sae.activate(pre)
            x_hat = sae.decode(z)
            mse = (x_hat - batch).pow(2).mean()
            loss = mse
            since_fired = torch.where((z > 0).any(0), 0, since_fired + 1)
            dead = since_fired >= config.dead_window
            aux = torch.zeros((), device=x.device)
            if config.aux_k_coef > 0 and bool(dead.any()):
                aux = _aux_k_loss(sae, pre, (batch - x_hat).detach(), dead, aux_k)
                loss = loss + config.aux_k_coef * aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():  # keep unit-norm decoder rows: drop the radial gradient
                grad, rows = sae.W_dec.grad, sae.W_dec
                if grad is not None:
                    grad -= (grad * rows).sum(-1, keepdim=True) * rows
            optimizer.step()
            sae.normalize_decoder()
            step += 1
            value = float(loss.detach())
            epoch_sum, epoch_n = epoch_sum + value, epoch_n + 1
            window["loss"] += value
            window["mse"] += float(mse.detach())
            window["aux_loss"] += float(aux.detach())
            window["n"] += 1
            if step % config.log_every == 0 or step == total:
                count = window.pop("n")
                history.append({"step": step, "epoch": len(epoch_losses),
                                **{key: val / count for key, val in window.items()}})
                window = {"loss": 0.0, "mse": 0.0, "aux_loss": 0.0, "n": 0}
            if progress is not None:
                progress(step, total, value)
        epoch_losses.append(epoch_sum / max(epoch_n, 1))
    sae.eval()
    metrics = sae_metrics(sae, x)
    sae.cfg.metadata.update({"n_samples": n, "fve": metrics["fve"], "l0": metrics["l0"]})
    record = {"config": asdict(config), "n_samples": n, "d_in": d_in, "steps": step,
              "epochs": step / per_epoch, "history": history, "epoch_losses": epoch_losses,
              "metrics": metrics, "seconds": time.perf_counter() - started}
    return sae, record
