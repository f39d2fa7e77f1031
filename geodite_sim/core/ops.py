"""Small batched tensor operations shared by the model, the integrators and the engine.

All are elementwise or ``index_add`` only: no solver, no host synchronisation, capturable in a CUDA graph.
"""

from __future__ import annotations

import torch

#: Fourth-order Suzuki–Yoshida weights, as in ASE (the Nosé–Hoover chain sweeps, tensor and Triton).
FOURTH_ORDER_COEFFS = (
    1 / (2 - 2 ** (1 / 3)),
    -(2 ** (1 / 3)) / (2 - 2 ** (1 / 3)),
    1 / (2 - 2 ** (1 / 3)),
)


def segment_sum(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Sum the rows of ``values`` [E, ...] into ``n`` rows by ``index`` [E] -> [n, ...] (edges onto atoms,
    atoms onto systems)."""
    return values.new_zeros((n,) + values.shape[1:]).index_add_(0, index, values)


def det3(m: torch.Tensor) -> torch.Tensor:
    """[S] determinant of [S, 3, 3] matrices as the triple product (a x b) . c of the rows."""
    return (torch.linalg.cross(m[:, 0], m[:, 1], dim=-1) * m[:, 2]).sum(-1)


def cell_volumes(cell: torch.Tensor) -> torch.Tensor:
    """|det(cell)| [S], Å³, of [S, 3, 3] cells (rows are the lattice vectors)."""
    return det3(cell).abs()
