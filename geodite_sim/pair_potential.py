"""A batched Morse pair potential with ASE's ``MorsePotential`` parameters and smooth cutoff.

Cheap, smooth and exactly reproducible by ASE, it is used to test integrators
and the scheduler independently of the Geodite model; it has the same call
signature as :class:`geodite_sim.model.Geodite`.
"""

from __future__ import annotations

import torch
from torch import nn

from geodite_sim.batch import Batch
from geodite_sim.model.strain import energy_and_derivatives
from geodite_sim.neighbors import neighbor_list


class MorsePotential(nn.Module):
    """V(r) = eps (exp(-2 rho0 (r/r0 - 1)) - 2 exp(-rho0 (r/r0 - 1))) * fcut(r; rcut1 r0, rcut2 r0), eV.

    Satisfies the model contract (``geodite_sim.model.contract``): every element, conservative, uses
    the given edges only (padded batches work).
    """

    implemented_properties = ("energy", "forces", "stress")
    conservative = True
    uses_edges = True
    supported_elements = None

    def __init__(self, epsilon=1.0, rho0=6.0, r0=1.0, rcut1=1.9, rcut2=2.7, dtype=torch.float64, device="cpu"):
        super().__init__()
        self.epsilon, self.rho0, self.r0 = epsilon, rho0, r0
        self.rcut1, self.rcut2 = rcut1 * r0, rcut2 * r0
        self._dtype, self._device = dtype, torch.device(device)

    def identity_config(self) -> dict:
        """The parameters that define the potential (enters ``model_fingerprint``)."""
        return {"epsilon": self.epsilon, "rho0": self.rho0, "r0": self.r0, "rcut1": self.rcut1, "rcut2": self.rcut2,
                "dtype": str(self._dtype)}

    @property
    def cutoff(self) -> float:
        return self.rcut2

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def ase_calculator(self):
        """The equivalent ASE calculator."""
        from ase.calculators.morse import MorsePotential as AseMorse

        return AseMorse(epsilon=self.epsilon, rho0=self.rho0, r0=self.r0,
                        rcut1=self.rcut1 / self.r0, rcut2=self.rcut2 / self.r0)

    def _fcut(self, r: torch.Tensor) -> torch.Tensor:
        s = 1.0 - (r - self.rcut1) / (self.rcut2 - self.rcut1)
        smooth = 6.0 * s**5 - 15.0 * s**4 + 10.0 * s**3
        return torch.where(s >= 1.0, torch.ones_like(s), torch.where(s > 0.0, smooth, torch.zeros_like(s)))

    def forward(self, batch: Batch, edges=None, compute_forces=True, compute_stress=True,
                per_atom_energies=False, create_graph=False, *, neighbor_backend: str = "auto"
                ) -> dict[str, torch.Tensor]:
        """``energy`` [S] eV, ``forces`` [N, 3] eV/Å, ``stress`` [S, 3, 3] eV/Å^3 (ASE sign) from ``edges``
        (default: a neighbour list at ``cutoff`` built with ``neighbor_backend``)."""
        if edges is None:
            edges = neighbor_list(batch, self.cutoff, backend=neighbor_backend)
        n = batch.n_atoms

        def atomic(vec: torch.Tensor) -> torch.Tensor:
            r = torch.linalg.vector_norm(vec, dim=-1)
            x = torch.exp(-self.rho0 * (r / self.r0 - 1.0))
            pair = self.epsilon * (x * x - 2.0 * x) * self._fcut(r)
            return vec.new_zeros(n).index_add_(0, edges.receiver, 0.5 * pair)

        return energy_and_derivatives(batch, edges, atomic, compute_forces, compute_stress,
                                      per_atom_energies, create_graph)
