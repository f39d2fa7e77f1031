"""Energies, forces and stress from one autograd pass (strain method, MACE-style).

A zero displacement-gradient tensor D [S, 3, 3] is symmetrised, eps = (D + D^T)/2,
and applied to positions and cell (row vectors: r <- r + r eps). Edge vectors are
formed from the strained tensors, so forces = -dE/dr and stress = (1/V) dE/deps
(ASE sign, eV/Å^3) come from a single ``torch.autograd.grad`` call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from geodite_sim.batch import Batch
from geodite_sim.core import graph
from geodite_sim.core.ops import cell_volumes, segment_sum

__all__ = ["cell_volumes", "edge_vectors", "energy_and_derivatives"]  # cell_volumes: from geodite_sim.core.ops


def edge_vectors(positions: torch.Tensor, cell: torch.Tensor, system_index: torch.Tensor, edges) -> torch.Tensor:
    """r_sender + shifts @ cell - r_receiver: [E, 3] Å (:func:`geodite_sim.core.graph.edge_vectors` of an edge list)."""
    return graph.edge_vectors(positions, cell, system_index, edges.sender, edges.receiver, edges.shifts)


def energy_and_derivatives(
    batch: Batch,
    edges,
    atomic_energies: Callable[[torch.Tensor], torch.Tensor],
    compute_forces: bool = True,
    compute_stress: bool = True,
    per_atom_energies: bool = False,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Evaluate ``atomic_energies(edge_vectors) -> [N]`` and its derivatives for every system.

    Returns ``energy`` [S] eV, ``forces`` [N, 3] eV/Å, ``stress`` [S, 3, 3] eV/Å^3
    (zeros unless all three axes are periodic), ``energies`` [N] if requested.
    """
    n = batch.n_atoms
    sys_idx = batch.system_index[:n]
    positions = batch.positions[:n]
    need_grad = compute_forces or compute_stress
    with torch.enable_grad() if need_grad else torch.no_grad():
        if compute_forces:
            positions = positions.detach().requires_grad_(True)
        strain = torch.zeros_like(batch.cell).requires_grad_(compute_stress)
        sym = 0.5 * (strain + strain.transpose(1, 2))
        pos = positions + torch.einsum("ni,nij->nj", positions, sym[sys_idx])
        cell = batch.cell + torch.bmm(batch.cell, sym)
        e_atom = atomic_energies(edge_vectors(pos, cell, sys_idx, edges))
        energy = segment_sum(e_atom, sys_idx, batch.n_systems)
        out = {"energy": energy}
        if per_atom_energies:
            out["energies"] = e_atom
        if need_grad:
            inputs = ([positions] if compute_forces else []) + ([strain] if compute_stress else [])
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
            if compute_forces:
                out["forces"] = -grads[0]
            if compute_stress:
                volume = cell_volumes(batch.cell)
                periodic = batch.fully_periodic & (volume > 0)
                safe_v = torch.where(periodic, volume, torch.ones_like(volume))
                out["stress"] = torch.where(periodic[:, None, None], grads[-1] / safe_v[:, None, None], 0.0)
    if not create_graph:
        out = {k: v.detach() for k, v in out.items()}
    return out
