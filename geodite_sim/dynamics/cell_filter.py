"""Batched Fréchet cell filter: the cell as 3 extra "atoms" of the optimiser, as ASE's ``FrechetCellFilter``.

For a system with reference cell C0 (rows = lattice vectors, the cell when the
relaxation started) and current cell C, the deformation gradient F is defined by
C = C0 Fᵀ, and its matrix logarithm X = log F is the cell degree of freedom. The
filter's generalised coordinates and forces are (ASE, ``ase/_4/optimize/cellutil.py``)::

    atoms:  u_i = F⁻¹ r_i                       g_i = Fᵀ f_i            (row form: f_i @ F)
    cell:   x_c = e · X  (e = exp_cell_factor)  g_c = L(Xᵀ, G) / e,    G = W F⁻ᵀ,   W = -V σ

with σ the stress (ASE sign, eV/Å³), V the volume, W the virial and L(A, E) the
Fréchet derivative of the matrix exponential at A in direction E. ASE evaluates
``g_c[μ,ν] = Σ L(X, E_μν) ⊙ G`` with nine ``expm_frechet`` calls; since
⟨L(X, E), G⟩ = ⟨E, L(Xᵀ, G)⟩ the same matrix is one Fréchet derivative, read here
from the exponential of the 6×6 block matrix [[Xᵀ, G], [0, Xᵀ]] (top-right block).

A step dx = (du, dx_c) moves X ← X + dx_c / e, F ← exp(X), C ← C0 Fᵀ and
r_i ← F (u_i + du_i), as ``FrechetCellFilter.set_positions`` does. ASE recomputes
X = logm(F) from the cell at every step; keeping X (and F = exp X) as state gives the
same numbers to rounding and avoids a batched matrix logarithm.

Systems whose cell is not relaxed (``relax`` False) keep X = 0, F = I and zero cell
forces; their atoms move by r ← r + du exactly (ASE's plain ``FIRE`` on the atoms).
All functions act on every system at once: shapes N atoms, S systems.
"""

from __future__ import annotations

import torch

from geodite_sim.core.ops import det3

#: Taylor degree and target 1-norm of the scaled matrix in :func:`expm` (truncation error < 1e-17).
_TAYLOR_DEGREE = 12
_THETA = 0.25
#: Squarings always done (the per-matrix count stays on the device): accurate for 1-norms up to 0.25 · 2^8 = 64,
#: far beyond the strains a relaxation reaches before the volume check (V/V0 outside [1/3, 3]) stops it.
_MAX_SQUARINGS = 8


def expm(a: torch.Tensor) -> torch.Tensor:
    """exp of a batch of small matrices [S, n, n] (scaling and squaring, Taylor degree 12).

    Accurate to rounding for 1-norms up to 0.25 · 2^12 (the per-matrix squaring count is on the
    device). ``torch.linalg.matrix_exp`` gives the same numbers but, batched over many 3×3 and
    6×6 matrices, costs several times more on the CPU (it sorts matrices by norm degree).
    """
    norm = a.abs().sum(dim=-2).amax(dim=-1)
    s = torch.clamp(torch.ceil(torch.log2(norm / _THETA)), min=0.0, max=float(_MAX_SQUARINGS))
    s = torch.where(torch.isfinite(s), s, 0.0)
    x = a * torch.exp2(-s)[:, None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    e = eye + x / _TAYLOR_DEGREE
    for k in range(_TAYLOR_DEGREE - 1, 0, -1):
        e = eye + (x @ e) / k
    for k in range(_MAX_SQUARINGS):  # fixed count: no host read of the squaring count (device-resident step)
        e = torch.where((s > k)[:, None, None], e @ e, e)
    return e


def inv3(m: torch.Tensor) -> torch.Tensor:
    """Inverse of [S, 3, 3] matrices by the adjugate (no solver error check, so no host sync on CUDA)."""
    a, b, c = m[:, 0], m[:, 1], m[:, 2]
    adj = torch.stack((torch.linalg.cross(b, c, dim=-1), torch.linalg.cross(c, a, dim=-1),
                       torch.linalg.cross(a, b, dim=-1)), dim=2)  # columns: b x c, c x a, a x b
    return adj / (a * adj[:, :, 0]).sum(-1)[:, None, None]


def expm_frechet_adjoint(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """L(xᵀ, g): the adjoint of the Fréchet derivative of exp at ``x`` applied to ``g``; [S, 3, 3] each.

    ``g`` is normalised per system before the block exponential (the derivative is linear in it),
    so large virials do not inflate the squaring count.
    """
    s = x.shape[0]
    scale = g.abs().flatten(1).amax(dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None, None]
    block = x.new_zeros(s, 6, 6)
    xt = x.transpose(1, 2)
    block[:, :3, :3] = xt
    block[:, 3:, 3:] = xt
    block[:, :3, 3:] = g / scale
    return expm(block)[:, :3, 3:] * scale


def _rows_times(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """v_i @ m_i for rows v [N, 3] and matrices m [N, 3, 3]."""
    return (v[:, :, None] * m).sum(dim=1)


def generalized_forces(
    forces: torch.Tensor,
    stress: torch.Tensor,
    cell: torch.Tensor,
    cell_log: torch.Tensor,
    deform: torch.Tensor,
    cell_factor: torch.Tensor,
    relax: torch.Tensor,
    system_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The filter's generalised forces: atom rows [N, 3] and cell rows [S, 3, 3].

    Args:
        forces: [N, 3] eV/Å. stress: [S, 3, 3] eV/Å³, ASE sign. cell: [S, 3, 3] rows = lattice vectors, Å.
        cell_log: [S, 3, 3] X = log F. deform: [S, 3, 3] F = exp X. cell_factor: [S] exp_cell_factor e.
        relax: [S] bool. system_index: [N] system of each atom.
    Returns:
        (g_atoms = f @ F, g_cell = L(Xᵀ, W F⁻ᵀ) / e); where ``relax`` is False, g_atoms = f and g_cell = 0.
    """
    mask = relax[:, None, None]
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    x = torch.where(mask, cell_log, 0.0)
    f_def = torch.where(mask, deform, eye)
    g_atoms = torch.where(relax[system_index, None], _rows_times(forces, f_def[system_index]), forces)
    volume = det3(torch.where(mask, cell, eye)).abs()
    virial = -volume[:, None, None] * torch.where(mask, stress, 0.0)
    g = virial @ inv3(f_def.transpose(1, 2))
    g_cell = expm_frechet_adjoint(x, g) / cell_factor[:, None, None]
    return g_atoms, torch.where(mask, g_cell, 0.0)


def apply_displacement(
    positions: torch.Tensor,
    cell: torch.Tensor,
    orig_cell: torch.Tensor,
    cell_log: torch.Tensor,
    deform: torch.Tensor,
    cell_factor: torch.Tensor,
    relax: torch.Tensor,
    system_index: torch.Tensor,
    dr_atoms: torch.Tensor,
    dr_cell: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move generalised coordinates by (dr_atoms [N, 3], dr_cell [S, 3, 3]).

    Cell systems: u = F⁻¹ r, X ← X + dr_cell / e, F' = exp(X), C = C0 F'ᵀ, r = F' (u + dr).
    Others: r ← r + dr; cell, X and F unchanged. Returns (positions, cell, cell_log, deform).
    """
    mask = relax[:, None, None]
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    f_old = torch.where(mask, deform, eye)
    u = _rows_times(positions, inv3(f_old).transpose(1, 2)[system_index])
    x_new = torch.where(mask, cell_log + dr_cell / cell_factor[:, None, None], 0.0)
    f_new = expm(x_new)
    r_cell = _rows_times(u + dr_atoms, f_new.transpose(1, 2)[system_index])
    new_positions = torch.where(relax[system_index, None], r_cell, positions + dr_atoms)
    new_cell = torch.where(mask, orig_cell @ f_new.transpose(1, 2), cell)
    return new_positions, new_cell, torch.where(mask, x_new, cell_log), torch.where(mask, f_new, deform)
