"""The Geodite training loss (architecture spec §11) and validation metrics.

L = λ_E Huber(ΔE/N / σ_E) + λ_F Huber(ΔF / σ_F) + λ_σ Huber(Δσ / σ_σ), Huber with δ = 0.01 on the
normalised residuals, where σ_E, σ_F and σ_σ are the training-set standard deviations of the
per-atom residual energy (after E0), the force components and the stress components.
Each term is a mean: over structures, force components, and stress components of periodic structures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geodite_sim.training.data import Collated


def _huber(residual: torch.Tensor, delta: float) -> torch.Tensor:
    if residual.numel() == 0:
        return residual.new_zeros(())
    return F.huber_loss(residual, torch.zeros_like(residual), delta=delta, reduction="mean")


def loss_terms(out: dict[str, torch.Tensor], data: Collated, norm: dict[str, float], delta: float
               ) -> dict[str, torch.Tensor]:
    """Normalised Huber terms ``energy``, ``forces``, ``stress`` (scalars, differentiable)."""
    de = (out["energy"] - data.energy) / data.n_atoms / norm["energy_std"]
    df = ((out["forces"] - data.forces) / norm["force_std"])[data.forces_mask]
    ds = ((out["stress"] - data.stress) / norm["stress_std"])[data.stress_mask]
    return {"energy": _huber(de, delta), "forces": _huber(df, delta), "stress": _huber(ds, delta)}


def total_loss(terms: dict[str, torch.Tensor], weights: tuple[float, float, float]) -> torch.Tensor:
    return weights[0] * terms["energy"] + weights[1] * terms["forces"] + weights[2] * terms["stress"]


class MetricAccumulator:
    """Sums of absolute and squared errors over batches -> MAE/RMSE in eV/atom, eV/Å, eV/Å^3."""

    def __init__(self) -> None:
        self.sums = {k: 0.0 for k in ("e_abs", "e_sq", "f_abs", "f_sq", "s_abs", "s_sq", "loss")}
        self.counts = {"e": 0, "f": 0, "s": 0, "loss": 0}

    def add(self, out: dict[str, torch.Tensor], data: Collated, loss: float | None = None) -> None:
        de = ((out["energy"] - data.energy) / data.n_atoms).detach().double()
        df = (out["forces"] - data.forces)[data.forces_mask].detach().double()
        ds = (out["stress"] - data.stress)[data.stress_mask].detach().double()
        self.sums["e_abs"] += float(de.abs().sum())
        self.sums["e_sq"] += float((de**2).sum())
        self.sums["f_abs"] += float(df.abs().sum())
        self.sums["f_sq"] += float((df**2).sum())
        self.sums["s_abs"] += float(ds.abs().sum())
        self.sums["s_sq"] += float((ds**2).sum())
        self.counts["e"] += de.numel()
        self.counts["f"] += df.numel()
        self.counts["s"] += ds.numel()
        if loss is not None:
            self.sums["loss"] += loss * de.numel()
            self.counts["loss"] += de.numel()

    def result(self) -> dict[str, float]:
        def div(a, b):
            return a / b if b else float("nan")

        c = self.counts
        return {
            "energy_mae": div(self.sums["e_abs"], c["e"]),  # eV/atom
            "energy_rmse": div(self.sums["e_sq"], c["e"]) ** 0.5,
            "forces_mae": div(self.sums["f_abs"], c["f"]),  # eV/Å
            "forces_rmse": div(self.sums["f_sq"], c["f"]) ** 0.5,
            "stress_mae": div(self.sums["s_abs"], c["s"]),  # eV/Å^3
            "stress_rmse": div(self.sums["s_sq"], c["s"]) ** 0.5,
            "loss": div(self.sums["loss"], c["loss"]),
        }
