"""Batched BFGS that reproduces ASE's ``BFGS`` step by step, optionally with the Fréchet cell filter.

One :func:`bfgs_move` does, for every system that is not done, what one ``ase.optimize.BFGS.step()`` does
(ASE 3.29) on the generalised coordinates x of :mod:`~geodite_sim.dynamics.optimizer`::

    g = -f;  ω, V = eigh(H);  dx = -V (Vᵀ g / |ω|)          H: dense Hessian, α I at the start
    L = max row norm of dx (atoms and cell rows);  if L >= maxstep: dx = dx · maxstep / L
    x = x + dx

and :func:`bfgs_learn` updates H after the evaluation at the new x (ASE's ``update`` at the start of the
next step; none before the first step, and none when max |Δx| < 1e-7)::

    s = Δx, y = Δg;  a = s·y;  h = H s;  b = s·h;  H = H + y yᵀ / a - h hᵀ / b

H is dense over a system's 3 n + 9 degrees of freedom (cell rows first, then the atoms, so that every
system's block starts at 0): [S, D, D] with D = 3 n_max + 9 for the batch's largest system n_max
(:func:`geodite_sim.state.sized_field`); smaller systems' extra rows and columns are replaced by the
identity for the eigendecomposition, where they carry zero gradient and so add nothing to the step. The
9 cell coordinates are kept for systems that do not relax their cell (zero forces: H's cell block stays
α I and adds nothing), so one layout serves every system.

Cost and limit: memory 8 D² bytes per system and an eigendecomposition O(D³) per step; every system of a
batch pays for the largest one's D. On this project's CPU ``torch.linalg.eigh`` takes 0.3 ms for D = 57
(16 atoms), 4.3 ms for D = 201 (64 atoms), 23 ms for D = 393 (128 atoms) and 161 ms for D = 777 (256
atoms) per system and step — from about 128 atoms on it rivals the model's own cost per step — so
structures above :attr:`BFGSParams.max_atoms` (default :data:`MAX_ATOMS`) are refused, each with its own
error; L-BFGS (:mod:`.lbfgs`) has no such limit. On CUDA, ``torch.linalg.eigh`` checks LAPACK's error flag
on the host: one device synchronisation per step that L-BFGS and FIRE do not have.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from geodite_sim.batch import Batch
from geodite_sim.dynamics.optimizer import (
    OptimizerState,
    cached_forces,
    coordinates,
    displace,
    optimizer_fields,
)
from geodite_sim.state import sized_field

#: Largest structure (atoms) BFGS accepts by default (module docstring).
MAX_ATOMS = 128
#: ASE's ``BFGSMethod.update`` skips the update when the largest coordinate change is below this (Å).
SAME_CONFIGURATION = 1e-7


def dofs(n_atoms: int) -> int:
    """Degrees of freedom of a system of ``n_atoms`` atoms in BFGS's layout: 9 cell + 3 per atom."""
    return 3 * int(n_atoms) + 9


@dataclass(frozen=True)
class BFGSParams:
    """BFGS parameters, ASE's names and defaults (``ase.optimize.BFGS``): ``maxstep`` Å (largest row of a step),
    ``alpha`` eV/Å² (initial Hessian α I); ``max_atoms``: larger structures are refused (module docstring)."""

    maxstep: float = 0.2
    alpha: float = 70.0
    max_atoms: int = MAX_ATOMS

    def __post_init__(self):
        if not self.maxstep > 0 or not self.alpha > 0:
            raise ValueError(f"BFGS maxstep and alpha must be positive, got {self.maxstep}, {self.alpha}")
        if int(self.max_atoms) < 1:
            raise ValueError(f"BFGS max_atoms must be >= 1, got {self.max_atoms}")

    def refusal(self, n_atoms: int) -> str | None:
        """Why a structure of ``n_atoms`` atoms is refused (None: accepted)."""
        if n_atoms <= self.max_atoms:
            return None
        d = dofs(n_atoms)
        return (f"{n_atoms} atoms is too large for optimizer='bfgs' (limit {self.max_atoms} atoms: its dense "
                f"{d}x{d} Hessian takes {8 * d * d / 2**20:.1f} MiB and an O({d}^3) eigendecomposition every step); "
                "use optimizer='lbfgs' (no size limit) or raise BFGSParams.max_atoms")


@dataclass
class BFGSState(OptimizerState):
    """BFGS state (besides :class:`~.optimizer.OptimizerState`'s).

    Attributes:
        hessian: [S, D, D] dense Hessian of each system's generalised coordinates (eV/Å²; cell rows first,
            then the atoms; D = 3 n_max + 9 for the batch's largest system, rows beyond a system's own
            3 n + 9 unused).
    """

    hessian: torch.Tensor = sized_field(dofs, default=None)


def bfgs_init(batch: Batch, relax_cell: bool | torch.Tensor = True, params: BFGSParams | None = None,
              cell_factor: float | torch.Tensor | None = None, **fields) -> BFGSState:
    """A fresh BFGS state of ``batch`` (H = α I, no evaluation yet; host read of the largest system's size).
    ``relax_cell``, ``cell_factor`` as :func:`~.optimizer.optimizer_fields`; extra keyword arguments fill further
    fields (e.g. ``constraints``)."""
    p = params or BFGSParams()
    s = batch.n_systems
    d = dofs(int(batch.atoms_per_system.max())) if s else dofs(0)
    eye = torch.eye(d, dtype=batch.dtype, device=batch.device)
    return BFGSState(batch=batch, hessian=(p.alpha * eye).expand(s, d, d).clone(),
                     **optimizer_fields(batch, relax_cell, cell_factor), **fields)


def _layout(batch: Batch, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat index [N, 3] of every atom's coordinates in the [S, D - 9] atom block, and [N] whether it fits
    (the runner's padding atoms may not)."""
    sys_idx = batch.system_index
    n = sys_idx.shape[0]
    local = torch.arange(n, device=sys_idx.device) - batch.offsets[sys_idx]
    fits = 3 * local + 3 <= d - 9
    base = torch.where(fits, sys_idx * (d - 9) + 3 * local, torch.zeros_like(local))
    return base[:, None] + torch.arange(3, device=sys_idx.device), fits


def to_dense(batch: Batch, v_a: torch.Tensor, v_c: torch.Tensor, d: int) -> torch.Tensor:
    """A generalised vector (atoms [N, 3], cell [S, 3, 3]) as [S, D] (cell rows first, then the atoms)."""
    s = v_c.shape[0]
    index, fits = _layout(batch, d)
    values = torch.where(fits[:, None], v_a, torch.zeros_like(v_a))
    atoms = v_a.new_zeros(s * (d - 9)).index_add_(0, index.reshape(-1), values.reshape(-1))
    return torch.cat([v_c.reshape(s, 9), atoms.view(s, d - 9)], dim=1)


def from_dense(batch: Batch, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`to_dense`: [S, D] -> (atoms [N, 3], cell [S, 3, 3])."""
    s, d = dense.shape
    index, fits = _layout(batch, d)
    v_a = dense[:, 9:].reshape(-1)[index]
    return torch.where(fits[:, None], v_a, torch.zeros_like(v_a)), dense[:, :9].reshape(s, 3, 3)


def _used(batch: Batch, d: int) -> torch.Tensor:
    """[S, D] bool: the degrees of freedom a system has (3 n + 9 of D)."""
    return torch.arange(d, device=batch.device)[None, :] < (3 * batch.atoms_per_system + 9)[:, None]


def bfgs_move(state: BFGSState, params: BFGSParams | None = None, cell: bool = True) -> BFGSState:
    """Move every system that is not done by one BFGS step (module docstring) from the generalised forces cached
    by :func:`~.optimizer.relax_converged`. The new positions are neither constrained nor evaluated."""
    p = params or BFGSParams()
    b = state.batch
    d = state.hessian.shape[-1]
    g_a, g_c = cached_forces(state, cell)
    gradient = -to_dense(b, g_a, g_c, d)
    used = _used(b, d)
    eye = torch.eye(d, dtype=gradient.dtype, device=gradient.device)
    hessian = torch.where(used[:, :, None] & used[:, None, :], state.hessian, eye)
    omega, vectors = torch.linalg.eigh(hessian)
    coeff = (gradient[:, None, :] @ vectors)[:, 0, :] / omega.abs()  # ASE: gradient @ vectors / |omega|
    dx = -(vectors @ coeff[:, :, None])[:, :, 0]
    longest = torch.linalg.vector_norm(dx.view(dx.shape[0], d // 3, 3), dim=2).amax(dim=1)
    big = longest >= p.maxstep
    scale = torch.where(big, p.maxstep / torch.where(big, longest, torch.ones_like(longest)), torch.ones_like(longest))
    dr_a, dr_c = from_dense(b, dx * scale[:, None])
    return displace(state, dr_a, dr_c, cell)


def bfgs_learn(old: BFGSState, new: BFGSState, cell: bool = True) -> BFGSState:
    """ASE's Hessian update for the step from ``old`` to ``new`` (``new`` evaluated, its generalised forces cached
    by :func:`~.optimizer.relax_converged`), in every system that moved (``old`` not done)."""
    b = new.batch
    d = new.hessian.shape[-1]
    x_old_a, x_old_c = coordinates(old, cell)
    x_new_a, x_new_c = coordinates(new, cell)
    g_old_a, g_old_c = cached_forces(old, cell)
    s = to_dense(b, x_new_a - x_old_a, x_new_c - x_old_c, d)
    y = to_dense(b, g_old_a - new.g_atoms, g_old_c - new.g_cell, d)  # gradient change = -(f_new - f_old)
    h = new.hessian
    a = (s * y).sum(1)
    hs = (h @ s[:, :, None])[:, :, 0]
    bb = (s * hs).sum(1)
    ok = ~old.done & (s.abs().amax(dim=1) >= SAME_CONFIGURATION)
    safe_a = torch.where(ok, a, torch.ones_like(a))[:, None, None]
    safe_b = torch.where(ok, bb, torch.ones_like(bb))[:, None, None]
    updated = h + (y[:, :, None] * y[:, None, :] / safe_a - hs[:, :, None] * hs[:, None, :] / safe_b)
    return replace(new, hessian=torch.where(ok[:, None, None], updated, h))


__all__ = ["BFGSParams", "BFGSState", "MAX_ATOMS", "bfgs_init", "bfgs_learn", "bfgs_move", "dofs", "from_dense",
           "to_dense"]
