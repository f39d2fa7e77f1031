"""Radial and angular edge features of Geodite (architecture spec §2-§3).

Module and buffer names follow the official checkpoint keys
(``encoder.radial_basis.*``, ``encoder.distance_weighting_fn.*``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from ase.data import covalent_radii as ase_covalent_radii
from torch import nn


def covalent_radii_table() -> torch.Tensor:
    """ASE covalent radii (Cordero 2008), [119] float32, index = Z, Å."""
    return torch.tensor(ase_covalent_radii[:119], dtype=torch.float32)


class BesselBasis(nn.Module):
    """phi_n(r) = sqrt(2/r_c) sin(n pi r / r_c) / (r + 1e-6), n = 1..n_rbf. Not trainable."""

    freqs: torch.Tensor  # buffers, typed for the checker
    prefactor: torch.Tensor

    def __init__(self, cutoff: float, n_rbf: int):
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, n_rbf + 1, dtype=torch.float32) * math.pi / cutoff)
        self.register_buffer("prefactor", torch.tensor(math.sqrt(2.0 / cutoff), dtype=torch.float32))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """r: [E] Å -> [E, n_rbf]."""
        r = r.unsqueeze(-1)
        return self.prefactor * torch.sin(self.freqs * r) / (r + 1e-6)


def polynomial_cutoff(r: torch.Tensor, cutoff: float, p: int = 6) -> torch.Tensor:
    """DimeNet polynomial envelope u(r/r_c) of degree p, zero beyond the cutoff. [E] -> [E]."""
    x = r / cutoff
    c1 = (p + 1) * (p + 2) / 2.0
    c2 = p * (p + 2.0)
    c3 = p * (p + 1) / 2.0
    out = 1.0 - c1 * x**p + c2 * x ** (p + 1) - c3 * x ** (p + 2)
    out = out * (x < 1.0)
    return out.clamp(min=0.0)


class DistanceWeighting(nn.Module):
    """Agnesi-type attenuation y(t), t = r / (r_cov[Z_i] + r_cov[Z_j]) (paper Eq. 1).

    ``p`` and ``q`` are stored raw (before softplus with beta = 0.5, + 1), as in the checkpoint.
    """

    covalent_radii: torch.Tensor  # buffer, typed for the checker

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.tensor(3.2139))  # q before p: official parameter order
        self.p = nn.Parameter(torch.tensor(-15.2013))
        self.register_buffer("covalent_radii", covalent_radii_table())

    def forward(self, r: torch.Tensor, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
        """r: [E] Å, z_i, z_j: [E] atomic numbers -> y: [E]."""
        p = F.softplus(self.p, 0.5) + 1.0
        q = F.softplus(self.q, 0.5) + 1.0
        a = -2.0 * (p + q - 2.0 * q * p) / (p * p + p + q * q + q)
        t = r / (self.covalent_radii[z_i] + self.covalent_radii[z_j])
        tq = t**q
        return a * tq / (1.0 + t ** (q - p) + a * tq)


def spherical_harmonics_l12(unit: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics l = 1, 2 of unit vectors, e3nn order, unit norm per degree.

    unit: [E, 3] -> [E, 8] = (x, y, z, sqrt3 xz, sqrt3 xy, y^2 - (x^2+z^2)/2, sqrt3 yz, sqrt3/2 (z^2 - x^2)).
    """
    x, y, z = unit.unbind(-1)
    s3 = math.sqrt(3.0)
    return torch.stack(
        [
            x,
            y,
            z,
            s3 * x * z,
            s3 * x * y,
            y * y - 0.5 * (x * x + z * z),
            s3 * y * z,
            0.5 * s3 * (z * z - x * x),
        ],
        dim=-1,
    )
