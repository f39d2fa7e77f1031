"""The graph types every model, neighbour list and engine exchanges: edges and edge vectors."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Edges(NamedTuple):
    """Directed edges sender -> receiver with integer cell shifts (ASE ``ijS`` with i = receiver).

    The edge vector is ``positions[sender] + shifts @ cell[system] - positions[receiver]``.
    """

    sender: torch.Tensor  # [E] int64
    receiver: torch.Tensor  # [E] int64
    shifts: torch.Tensor  # [E, 3] integer-valued


def edge_vectors(positions: torch.Tensor, cell: torch.Tensor, system_index: torch.Tensor, sender: torch.Tensor,
                 receiver: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """[E, 3] r_sender + shifts @ cell[system of receiver] - r_receiver, Å (``shifts`` [E, 3], cast to the
    positions' dtype)."""
    shift_vec = torch.einsum("ei,eij->ej", shifts.to(positions.dtype), cell[system_index[receiver]])
    return positions[sender] + shift_vec - positions[receiver]


def min_contact_ratio(vectors: torch.Tensor, radii: torch.Tensor, numbers: torch.Tensor, sender: torch.Tensor,
                      receiver: torch.Tensor, system_index: torch.Tensor, n_systems: int,
                      real: torch.Tensor | None = None) -> torch.Tensor:
    """[S] the smallest |r_ij| / (r_i + r_j) over each system's edges (inf for a system without edges): the one
    contact measure of the failure checks and the MD monitors (a ratio below ``min_distance_factor`` = atoms too
    close). ``vectors`` [E, 3] edge vectors, ``radii`` [max Z + 1] covalent radii (Å) indexed by atomic number,
    ``real`` [E] bool (False: padding edges, ignored). Device-side only: no host read."""
    ratio = torch.linalg.vector_norm(vectors, dim=-1) / (radii[numbers[sender]] + radii[numbers[receiver]])
    if real is not None:
        ratio = torch.where(real, ratio, torch.inf)
    out = torch.full((n_systems,), torch.inf, dtype=ratio.dtype, device=ratio.device)
    return out.scatter_reduce(0, system_index[receiver], ratio, reduce="amin")
