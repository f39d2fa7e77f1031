"""What every batched relaxation shares: the Fréchet-filter coordinates, ASE's convergence test and the move.

FIRE (:mod:`.fire`), L-BFGS (:mod:`.lbfgs`) and BFGS (:mod:`.bfgs`) all optimise the generalised
coordinates of :mod:`.cell_filter` (the atoms, plus the cell of systems that relax it) exactly as ASE's
optimisers do on ``FrechetCellFilter(atoms)`` (or on ``atoms``):

* :class:`OptimizerState` holds the filter's per-system variables and the bookkeeping of a relaxation
  (step counter, convergence, the generalised forces of the last evaluation);
* :func:`relax_converged` is ASE's test ``optimizable.converged(gradient, fmax)``: max row norm of the
  generalised forces (atoms and cell rows) < fmax, evaluated right after each evaluation (ASE's ``irun``);
* :func:`displace` moves the systems that are not done by a generalised step ``dr`` (ASE's
  ``optimizable.set_x(x + dr)``) and :func:`coordinates` gives ``x`` itself (``get_x``: F⁻¹ r for the
  atoms of cell systems, r otherwise), so quasi-Newton methods see the step actually taken after the
  constraints adjusted it;
* :func:`row_norm_max` is ASE's ``gradient_norm`` of any generalised vector (max over atom and cell rows).

Shapes: N atoms, S systems; everything per system is a tensor indexed by slot and no function here reads
anything back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from geodite_sim.batch import Batch
from geodite_sim.core.ops import segment_sum
from geodite_sim.dynamics.cell_filter import apply_displacement, generalized_forces, inv3
from geodite_sim.state import SimState, atom_field, packed_field, system_field


@dataclass
class OptimizerState(SimState):
    """Per-system state of a batched relaxation (N atoms, S systems).

    Attributes (besides :class:`SimState`'s batch, energy [S], forces [N, 3], stress [S, 3, 3]):
        orig_cell: [S, 3, 3] reference cell C0 of the Fréchet filter (cell at the start), Å.
        cell_log: [S, 3, 3] X = log F, the logarithm of the deformation gradient.
        deform: [S, 3, 3] F = exp X, the deformation gradient (C = C0 Fᵀ).
        cell_factor: [S] ASE's ``exp_cell_factor`` (number of atoms by default).
        relax_cell: [S] bool, whether the cell is a degree of freedom.
        n_steps: [S] int64 optimiser steps taken (ASE's ``opt.nsteps``).
        converged: [S] bool, max generalised force norm < fmax at the last evaluation.
        done: [S] bool, converged, out of steps or frozen; a done system no longer moves.
        fmax: [S] max generalised force norm (atoms and cell rows) at the last evaluation, eV/Å.
        g_atoms, g_cell: [N, 3], [S, 3, 3] generalised forces at the last evaluation (set by
            :func:`relax_converged`; None: not computed yet).
        constraints: :class:`~geodite_sim.dynamics.constraints.BatchConstraints` (FixAtoms, FixCartesian,
            FixSymmetry per system; None: unconstrained). The caller applies them (runner/registry.py).
    """

    orig_cell: torch.Tensor = system_field(default=None)
    cell_log: torch.Tensor = system_field(default=None)
    deform: torch.Tensor = system_field(default=None)
    cell_factor: torch.Tensor = system_field(default=None)
    relax_cell: torch.Tensor = system_field(default=None)
    n_steps: torch.Tensor = system_field(default=None)
    converged: torch.Tensor = system_field(default=None)
    done: torch.Tensor = system_field(default=None)
    fmax: torch.Tensor = system_field(default=None)
    g_atoms: torch.Tensor = atom_field(default=None)
    g_cell: torch.Tensor = system_field(default=None)
    constraints: Any = packed_field(default=None)


def optimizer_fields(batch: Batch, relax_cell: bool | torch.Tensor = True,
                     cell_factor: float | torch.Tensor | None = None) -> dict:
    """The :class:`OptimizerState` fields of a fresh relaxation of ``batch`` (no evaluation yet).

    ``relax_cell`` (bool or [S] bool) is honoured only for fully periodic systems; ``cell_factor``
    defaults to the number of atoms of each system (ASE's ``exp_cell_factor`` default).
    """
    s, dev, dtype = batch.n_systems, batch.device, batch.dtype
    relax = torch.as_tensor(relax_cell, dtype=torch.bool, device=dev).expand(s).clone()
    relax &= batch.fully_periodic
    if cell_factor is None:
        factor = batch.atoms_per_system.to(dtype)
    else:
        factor = torch.as_tensor(cell_factor, dtype=dtype, device=dev).expand(s).clone()
    return dict(
        orig_cell=batch.cell.clone(),
        cell_log=torch.zeros_like(batch.cell),
        deform=torch.eye(3, dtype=dtype, device=dev).expand(s, 3, 3).clone(),
        cell_factor=factor,
        relax_cell=relax,
        n_steps=torch.zeros(s, dtype=torch.long, device=dev),
        converged=torch.zeros(s, dtype=torch.bool, device=dev),
        done=torch.zeros(s, dtype=torch.bool, device=dev),
        fmax=torch.full((s,), float("nan"), dtype=dtype, device=dev),
    )


def per_system_max(values: torch.Tensor, system_index: torch.Tensor, n_systems: int) -> torch.Tensor:
    """Max of non-negative ``values`` [N] over the atoms of each system -> [S] (0 for no atoms; NaN propagates)."""
    out = values.new_zeros(n_systems)
    return out.scatter_reduce_(0, system_index, values, reduce="amax", include_self=True)


def row_norm_max(v_a: torch.Tensor, v_c: torch.Tensor, system_index: torch.Tensor) -> torch.Tensor:
    """ASE's ``gradient_norm``: max Euclidean norm over a system's rows (atoms [N, 3], cell rows [S, 3, 3]) -> [S]."""
    norm_a = per_system_max(torch.linalg.vector_norm(v_a, dim=1), system_index, v_c.shape[0])
    return torch.maximum(norm_a, torch.linalg.vector_norm(v_c, dim=2).amax(dim=1))


def system_dot(x_a, y_a, x_c, y_c, system_index: torch.Tensor) -> torch.Tensor:
    """Per-system dot product of two generalised vectors (atoms [N, 3] + cell [S, 3, 3]) -> [S] (``np.vdot``)."""
    return segment_sum((x_a * y_a).sum(1), system_index, x_c.shape[0]) + (x_c * y_c).sum((1, 2))


def generalized_forces_of(state: OptimizerState, cell: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g_atoms [N, 3], g_cell [S, 3, 3], max row norm [S]) of the filter at the state's last evaluation.

    ``cell=False`` promises that no system relaxes its cell (skips the filter: g_atoms = forces, g_cell = 0).
    """
    b = state.batch
    if cell:
        stress = state.stress if state.stress is not None else torch.zeros_like(b.cell)
        g_a, g_c = generalized_forces(
            state.forces, stress, b.cell, state.cell_log, state.deform, state.cell_factor, state.relax_cell,
            b.system_index,
        )
    else:
        g_a, g_c = state.forces, torch.zeros_like(b.cell)
    return g_a, g_c, row_norm_max(g_a, g_c, b.system_index)


def relax_converged[S: OptimizerState](
    state: S,
    fmax: float,
    max_steps: int,
    frozen: torch.Tensor | None = None,
    cell: bool = True,
) -> S:
    """ASE's convergence test at the state's current evaluation (``optimizer.converged()``).

    ``state.forces`` (and ``state.stress`` for cell systems) must hold the model's output at the
    current positions. A system becomes done when converged (max generalised force norm < fmax, as
    ASE's ``optimizer.run(fmax)``), when it has taken ``max_steps`` steps, or where ``frozen`` [S]
    is True (the caller's failure mask); a system that was done keeps ``converged`` and ``fmax``.
    The generalised forces are cached (``g_atoms``, ``g_cell``) for the next move.
    """
    g_a, g_c, fnorm = generalized_forces_of(state, cell)
    conv_now = fnorm < fmax
    was_done = state.done
    done = was_done | conv_now | (state.n_steps >= max_steps)
    if frozen is not None:
        done = done | frozen
    return replace(state, converged=torch.where(was_done, state.converged, conv_now), done=done,
                   fmax=torch.where(was_done, state.fmax, fnorm), g_atoms=g_a, g_cell=g_c)


def cached_forces(state: OptimizerState, cell: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The generalised forces of the last evaluation (cached by :func:`relax_converged`, else computed)."""
    if state.g_atoms is None or state.g_cell is None:
        g_a, g_c, _ = generalized_forces_of(state, cell)
        return g_a, g_c
    return state.g_atoms, state.g_cell


def displace[S: OptimizerState](state: S, dr_a: torch.Tensor, dr_c: torch.Tensor, cell: bool = True) -> S:
    """Move every system that is not done by the generalised step (dr_a [N, 3], dr_c [S, 3, 3]) and count the
    step (ASE's ``set_x(x + dr)``; cell systems through the filter, :func:`~.cell_filter.apply_displacement`).

    Done systems keep their batch, X and F bit for bit. The new positions are not evaluated and not constrained.
    """
    b = state.batch
    active = ~state.done
    act_a = active[b.system_index, None]
    act_c = active[:, None, None]
    if cell:
        pos, new_cell, cell_log, deform = apply_displacement(
            b.positions, b.cell, state.orig_cell, state.cell_log, state.deform, state.cell_factor,
            state.relax_cell, b.system_index, dr_a, dr_c,
        )
        new_cell = torch.where(act_c, new_cell, b.cell)
        cell_log = torch.where(act_c, cell_log, state.cell_log)
        deform = torch.where(act_c, deform, state.deform)
    else:
        pos, new_cell, cell_log, deform = b.positions + dr_a, b.cell, state.cell_log, state.deform
    batch = b.with_positions(torch.where(act_a, pos, b.positions), new_cell)
    return replace(state, batch=batch, cell_log=cell_log, deform=deform, n_steps=state.n_steps + active.long())


def coordinates(state: OptimizerState, cell: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The generalised coordinates x (ASE's ``optimizable.get_x()``): atoms u = F⁻¹ r [N, 3] (r itself where the
    cell is fixed) and cell e·X [S, 3, 3] (ASE's e·logm(n F) less the constant e·log(n)·I, which differences cancel)."""
    b = state.batch
    x_c = state.cell_log * state.cell_factor[:, None, None]
    if not cell:
        return b.positions, x_c
    inv_t = inv3(state.deform).transpose(1, 2)[b.system_index]
    u = (b.positions[:, :, None] * inv_t).sum(dim=1)
    return torch.where(state.relax_cell[b.system_index, None], u, b.positions), x_c


__all__ = ["OptimizerState", "cached_forces", "coordinates", "displace", "generalized_forces_of", "optimizer_fields",
           "per_system_max", "relax_converged", "row_norm_max", "system_dot"]
