"""Batched L-BFGS that reproduces ASE's ``LBFGS`` step by step, optionally with the Fréchet cell filter.

One :func:`lbfgs_move` does, for every system that is not done, what one ``ase.optimize.LBFGS.step()``
does (ASE 3.29, ``use_line_search=False``) on the generalised coordinates x of
:mod:`~geodite_sim.dynamics.optimizer` (atoms, plus the cell of systems that relax it)::

    g = -f (generalised forces);  p = -H g      H: L-BFGS inverse Hessian of the last ``memory`` pairs
                                                (s_i, y_i) = (x_{i+1} - x_i, g_{i+1} - g_i), H0 = I / alpha
    L = max row norm of p (atoms and cell rows);  if L >= maxstep: p = p · maxstep / L
    x = x + damping · p

and :func:`lbfgs_learn` stores the new pair after the evaluation at the new x (ASE's ``update`` at the
start of the next step; the first step has no pair, ASE's ``iteration == 0``). ``s`` is the step
actually taken (after the constraints adjusted it), as ASE's ``pos - r0``.

H g is computed in the compact form of Byrd, Nocedal and Schnabel (1994, Theorem 2.2) instead of ASE's
two-loop recursion — the same matrix, with a number of tensor operations independent of ``memory`` and
of the number of systems::

    H g = γ g + S R⁻ᵀ[(D + γ YᵀY) w - γ Yᵀg] - γ Y w,   w = R⁻¹ Sᵀg,   γ = 1 / alpha

with S, Y the stored pairs in chronological order, R the upper triangle of SᵀY and D its diagonal.
The history holds ``memory`` slots per system in chronological order, the newest last: s, y per atom
[N, M, 3] and per cell [S, M, 3, 3], and the small Gram matrices SᵀY and YᵀY [S, M, M]; a new pair shifts
them by one slot (the oldest drops out once all are used) and adds one row and column. Unused slots hold
zeros (their R diagonal is set to 1), so they drop out. The two forms agree with ASE's to
rounding (tests/dynamics/test_lbfgs.py compares paths to 1e-8 Å).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from geodite_sim.batch import Batch
from geodite_sim.core.ops import segment_sum
from geodite_sim.dynamics.optimizer import (
    OptimizerState,
    cached_forces,
    coordinates,
    displace,
    optimizer_fields,
    row_norm_max,
)
from geodite_sim.state import atom_field, system_field


@dataclass(frozen=True)
class LBFGSParams:
    """L-BFGS parameters, ASE's names and defaults (``ase.optimize.LBFGS``): ``maxstep`` Å (largest row of a
    step), ``memory`` pairs kept, ``damping`` (step factor), ``alpha`` eV/Å² (initial Hessian α I, H0 = I / α)."""

    maxstep: float = 0.2
    memory: int = 100
    damping: float = 1.0
    alpha: float = 70.0

    def __post_init__(self):
        if not 0 < self.maxstep <= 1.0:  # ASE refuses maxstep > 1 Å
            raise ValueError(f"LBFGS maxstep must be in (0, 1] Å, got {self.maxstep}")
        if int(self.memory) < 1:
            raise ValueError(f"LBFGS memory must be >= 1, got {self.memory}")
        if not self.alpha > 0 or not self.damping > 0:
            raise ValueError(f"LBFGS alpha and damping must be positive, got {self.alpha}, {self.damping}")


@dataclass
class LBFGSState(OptimizerState):
    """L-BFGS state (besides :class:`~.optimizer.OptimizerState`'s), M = ``memory`` slots per system, oldest
    first and the newest in slot M - 1 (the first M - count slots unused, zero).

    Attributes:
        s_atoms, y_atoms: [N, M, 3] steps and gradient changes of the atoms' generalised coordinates.
        s_cell, y_cell: [S, M, 3, 3] the same for the cell coordinates (zero without the cell).
        sy, yy: [S, M, M] Gram matrices s_i·y_j and y_i·y_j.
        count: [S] int64, pairs stored (≤ M).
    """

    s_atoms: torch.Tensor = atom_field(default=None)
    y_atoms: torch.Tensor = atom_field(default=None)
    s_cell: torch.Tensor = system_field(default=None)
    y_cell: torch.Tensor = system_field(default=None)
    sy: torch.Tensor = system_field(default=None)
    yy: torch.Tensor = system_field(default=None)
    count: torch.Tensor = system_field(default=None)


def lbfgs_init(batch: Batch, relax_cell: bool | torch.Tensor = True, params: LBFGSParams | None = None,
               cell_factor: float | torch.Tensor | None = None, **fields) -> LBFGSState:
    """A fresh L-BFGS state of ``batch`` (empty history, no evaluation yet). ``relax_cell``, ``cell_factor`` as
    :func:`~.optimizer.optimizer_fields`; extra keyword arguments fill further fields (e.g. ``constraints``)."""
    p = params or LBFGSParams()
    m = int(p.memory)
    s, n, dev, dtype = batch.n_systems, batch.positions.shape[0], batch.device, batch.dtype
    zeros_a = torch.zeros(n, m, 3, dtype=dtype, device=dev)
    zeros_c = torch.zeros(s, m, 3, 3, dtype=dtype, device=dev)
    zeros_g = torch.zeros(s, m, m, dtype=dtype, device=dev)
    return LBFGSState(batch=batch, s_atoms=zeros_a, y_atoms=zeros_a.clone(), s_cell=zeros_c, y_cell=zeros_c.clone(),
                      sy=zeros_g, yy=zeros_g.clone(), count=torch.zeros(s, dtype=torch.long, device=dev),
                      **optimizer_fields(batch, relax_cell, cell_factor), **fields)


def _dots(hist_a: torch.Tensor, hist_c: torch.Tensor, v_a: torch.Tensor, v_c: torch.Tensor,
          system_index: torch.Tensor) -> torch.Tensor:
    """[S, M] dot products of every stored vector (atoms [N, M, 3], cell [S, M, 3, 3]) with one vector per system."""
    per_atom = (hist_a * v_a[:, None, :]).sum(-1)
    return segment_sum(per_atom, system_index, hist_c.shape[0]) + (hist_c * v_c[:, None]).sum((-1, -2))


def inverse_hessian_times(state: LBFGSState, q_a: torch.Tensor, q_c: torch.Tensor,
                          alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H q for the L-BFGS inverse Hessian of every system (compact form, module docstring): q [N, 3] + [S, 3, 3]."""
    sys_idx = state.batch.system_index
    m = state.sy.shape[1]
    gamma = 1.0 / alpha
    unused = torch.arange(m, device=q_a.device)[None, :] < (m - state.count)[:, None]
    a = _dots(state.s_atoms, state.s_cell, q_a, q_c, sys_idx)[:, :, None]  # Sᵀq [S, M, 1]
    b = _dots(state.y_atoms, state.y_cell, q_a, q_c, sys_idx)[:, :, None]  # Yᵀq
    r = torch.triu(state.sy) + torch.diag_embed(unused.to(state.sy.dtype))
    w = torch.linalg.solve_triangular(r, a, upper=True)
    rhs = torch.diagonal(state.sy, dim1=1, dim2=2)[:, :, None] * w + gamma * (state.yy @ w) - gamma * b
    p1 = torch.linalg.solve_triangular(r.transpose(1, 2), rhs, upper=False)[:, :, 0]
    w = w[:, :, 0]
    p1_a, w_a = p1[sys_idx][:, :, None], w[sys_idx][:, :, None]
    p1_c, w_c = p1[:, :, None, None], w[:, :, None, None]
    h_a = gamma * q_a + (state.s_atoms * p1_a).sum(1) - gamma * (state.y_atoms * w_a).sum(1)
    h_c = gamma * q_c + (state.s_cell * p1_c).sum(1) - gamma * (state.y_cell * w_c).sum(1)
    return h_a, h_c


def lbfgs_move(state: LBFGSState, params: LBFGSParams | None = None, cell: bool = True) -> LBFGSState:
    """Move every system that is not done by one L-BFGS step (module docstring) from the generalised forces
    cached by :func:`~.optimizer.relax_converged`. The new positions are neither constrained nor evaluated.
    ``cell=False`` promises that no system relaxes its cell. No host synchronisation."""
    p = params or LBFGSParams()
    g_a, g_c = cached_forces(state, cell)
    h_a, h_c = inverse_hessian_times(state, -g_a, -g_c, p.alpha)
    p_a, p_c = -h_a, -h_c  # ASE: p = compute_step(gradient) = -H gradient
    longest = row_norm_max(p_a, p_c, state.batch.system_index)
    big = longest >= p.maxstep
    scale = torch.where(big, p.maxstep / torch.where(big, longest, torch.ones_like(longest)), torch.ones_like(longest))
    dr_a = p_a * scale[state.batch.system_index, None] * p.damping
    dr_c = p_c * scale[:, None, None] * p.damping
    return displace(state, dr_a, dr_c, cell)


def _shifted(history: torch.Tensor, new: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """The history [L, M, ...] with its slots shifted one towards the start and ``new`` [L, ...] in the last slot,
    where ``moved`` [L]; unchanged elsewhere."""
    shifted = torch.cat([history[:, 1:], new[:, None]], dim=1)
    return torch.where(moved.view(-1, *([1] * (history.dim() - 1))), shifted, history)


def lbfgs_learn(old: LBFGSState, new: LBFGSState, cell: bool = True) -> LBFGSState:
    """Store the pair (s, y) of the step from ``old`` to ``new`` (``new`` evaluated, its generalised forces cached
    by :func:`~.optimizer.relax_converged`) as the newest of every system that moved (``old`` not done)."""
    sys_idx = new.batch.system_index
    m = new.sy.shape[1]
    x_old_a, x_old_c = coordinates(old, cell)
    x_new_a, x_new_c = coordinates(new, cell)
    g_old_a, g_old_c = cached_forces(old, cell)
    s_a, s_c = x_new_a - x_old_a, x_new_c - x_old_c
    y_a, y_c = g_old_a - new.g_atoms, g_old_c - new.g_cell  # gradient change = -(f_new - f_old)
    moved = ~old.done
    moved_a = moved[sys_idx]
    s_atoms, y_atoms = _shifted(new.s_atoms, s_a, moved_a), _shifted(new.y_atoms, y_a, moved_a)
    s_cell, y_cell = _shifted(new.s_cell, s_c, moved), _shifted(new.y_cell, y_c, moved)
    s_dot_y = _dots(s_atoms, s_cell, y_a, y_c, sys_idx)  # s_l · y_new (the last column of SᵀY)
    y_dot_s = _dots(y_atoms, y_cell, s_a, s_c, sys_idx)  # s_new · y_l (its last row)
    y_dot_y = _dots(y_atoms, y_cell, y_a, y_c, sys_idx)  # y_l · y_new
    last = torch.arange(m, device=s_a.device) == m - 1
    row, col = last[None, :, None], last[None, None, :]

    def grown(gram, last_row, last_col):
        shifted = torch.roll(gram, shifts=(-1, -1), dims=(1, 2))  # slot 0 (the oldest) wraps into the new slot
        g = torch.where(col, last_col[:, :, None], torch.where(row, last_row[:, None, :], shifted))
        return torch.where(moved[:, None, None], g, gram)

    return replace(new, s_atoms=s_atoms, y_atoms=y_atoms, s_cell=s_cell, y_cell=y_cell,
                   sy=grown(new.sy, y_dot_s, s_dot_y), yy=grown(new.yy, y_dot_y, y_dot_y),
                   count=torch.where(moved, torch.clamp(new.count + 1, max=m), new.count))


__all__ = ["LBFGSParams", "LBFGSState", "inverse_hessian_times", "lbfgs_init", "lbfgs_learn", "lbfgs_move"]
