"""Batched FIRE that reproduces ASE's ``FIRE`` step by step, optionally with the Fréchet cell filter.

One call of :func:`fire_step` does, for every system that is not done, what one
``ase.optimize.FIRE.step()`` does (ASE 3.23+, ``downhill_check=False``), on the
generalised coordinates of :mod:`geodite_sim.dynamics.cell_filter` (atoms, plus the
cell for systems that relax it)::

    g = generalised forces (atoms and cell rows); converged if max_row |g| < fmax
    first step:          v = 0                                   (ASE's vel = None)
    later, v·g > 0:      v = (1 - a) v + a g / |g| · |v|
                         if Nsteps > Nmin: dt = min(dt · finc, dtmax); a = a · fa
                         Nsteps += 1
    later, v·g <= 0:     v = 0; a = astart; dt = dt · fdec; Nsteps = 0
    v = v + dt g;  dr = dt v;  if |dr| > maxstep: dr = maxstep dr / |dr|   (|·| over the whole system)
    x = x + dr

The step is two functions, so a caller can test convergence right after each evaluation (as
ASE's ``irun`` does) instead of at the start of the next step:
:func:`~geodite_sim.dynamics.optimizer.relax_converged` (the convergence test shared by every
optimiser; caches the generalised forces) and :func:`fire_move` (the move); :func:`fire_step` is
``fire_move(relax_converged(state))``.

Dot products and norms run over all of a system's degrees of freedom (3N atoms + 9
cell), exactly as ASE's ``np.vdot`` over the filter's (N + 3) × 3 array. Per-system
variables (dt, a, Nsteps, step counts, convergence) are tensors of the state; a
system that has converged, reached ``max_steps`` or is frozen by the caller keeps
every variable unchanged, so its result equals the one of a single-system run
whatever the batch around it does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from geodite_sim.batch import Batch
from geodite_sim.dynamics.optimizer import (
    OptimizerState,
    cached_forces,
    displace,
    optimizer_fields,
    relax_converged,
    system_dot,
)
from geodite_sim.state import atom_field, system_field


@dataclass(frozen=True)
class FireParams:
    """FIRE parameters, ASE's names and defaults (``ase.optimize.FIRE``). Times in ASE units, lengths Å."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    Nmin: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99
    a: float = 0.1


@dataclass
class FireState(OptimizerState):
    """FIRE state of a packed batch (N atoms, S systems; no padding rows).

    Attributes (besides :class:`~.optimizer.OptimizerState`'s batch, energy, forces, stress, Fréchet-filter
    variables, step counter, convergence flags and cached generalised forces):
        velocities: [N, 3] FIRE velocities of the atoms' generalised coordinates.
        cell_velocities: [S, 3, 3] FIRE velocities of the cell coordinates (zero without the cell).
        dt, alpha: [S] current FIRE time step and mixing parameter.
        n_pos: [S] int64, ASE's ``Nsteps`` (consecutive steps with v·g > 0).
        started: [S] bool, False before the first step (ASE's ``vel is None``).
    """

    velocities: torch.Tensor = atom_field(default=None)
    cell_velocities: torch.Tensor = system_field(default=None)
    dt: torch.Tensor = system_field(default=None)
    alpha: torch.Tensor = system_field(default=None)
    n_pos: torch.Tensor = system_field(default=None)
    started: torch.Tensor = system_field(default=None)


def fire_init(
    batch: Batch,
    relax_cell: bool | torch.Tensor = True,
    params: FireParams | None = None,
    cell_factor: float | torch.Tensor | None = None,
    **fields,
) -> FireState:
    """A fresh FIRE state for ``batch`` (no model evaluation yet: energy/forces/stress are None).

    ``relax_cell`` (bool or [S] bool) is honoured only for fully periodic systems.
    ``cell_factor`` defaults to the number of atoms of each system (ASE's default).
    Extra keyword arguments fill fields of subclasses (``state_cls`` may be given to build one).
    """
    p = params or FireParams()
    state_cls = fields.pop("state_cls", FireState)
    s, dev, dtype = batch.n_systems, batch.device, batch.dtype
    zeros_s = torch.zeros(s, dtype=dtype, device=dev)
    return state_cls(
        batch=batch,
        velocities=torch.zeros_like(batch.positions),
        cell_velocities=torch.zeros_like(batch.cell),
        dt=zeros_s + p.dt,
        alpha=zeros_s + p.a,
        n_pos=torch.zeros(s, dtype=torch.long, device=dev),
        started=torch.zeros(s, dtype=torch.bool, device=dev),
        **optimizer_fields(batch, relax_cell, cell_factor),
        **fields,
    )


def fire_step(
    state: FireState,
    fmax: float,
    max_steps: int,
    params: FireParams | None = None,
    frozen: torch.Tensor | None = None,
    cell: bool = True,
) -> FireState:
    """Check convergence at the current evaluation, then move every unfinished system by one FIRE step
    (:func:`~.optimizer.relax_converged` then :func:`fire_move`; see them for the arguments). No host
    synchronisation."""
    return fire_move(relax_converged(state, fmax, max_steps, frozen, cell), params, cell)


def fire_move(state: FireState, params: FireParams | None = None, cell: bool = True) -> FireState:
    """Move every system that is not done by one FIRE step, with the generalised forces cached by
    :func:`~.optimizer.relax_converged` (computed here if absent); done systems are left untouched. ``cell=False``
    promises that no system relaxes its cell and skips the filter's arithmetic. The new positions are not
    evaluated (energy/forces/stress still describe the old ones). No host synchronisation."""
    p = params or FireParams()
    b = state.batch
    sys_idx = b.system_index
    g_a, g_c = cached_forces(state, cell)
    active = ~state.done
    act_a = active[sys_idx, None]
    act_c = active[:, None, None]

    v_a, v_c = state.velocities, state.cell_velocities

    def dot(x_a, y_a, x_c, y_c):
        return system_dot(x_a, y_a, x_c, y_c, sys_idx)

    vf = dot(g_a, v_a, g_c, v_c)
    grad2 = dot(g_a, g_a, g_c, g_c)
    vv = dot(v_a, v_a, v_c, v_c)
    uphill_ok = vf > 0.0
    mix = state.started & uphill_ok
    reset = state.started & ~uphill_ok
    a = state.alpha
    # ASE: (1 - a) v + a g / sqrt(grad2) * sqrt(vv), evaluated in that order.
    safe_g = torch.where(mix, torch.sqrt(grad2), torch.ones_like(grad2))
    root_vv = torch.sqrt(vv)

    def mixed(v, g, per):
        return (1.0 - a[per]) * v + a[per] * g / safe_g[per] * root_vv[per]

    per_a = (sys_idx, None)
    per_c = (slice(None), None, None)
    new_v_a = torch.where(mix[per_a], mixed(v_a, g_a, per_a), torch.where(reset[per_a], 0.0, v_a))
    new_v_c = torch.where(mix[per_c], mixed(v_c, g_c, per_c), torch.where(reset[per_c], 0.0, v_c))
    grow = mix & (state.n_pos > p.Nmin)
    dt = torch.where(grow, torch.clamp(state.dt * p.finc, max=p.dtmax), torch.where(reset, state.dt * p.fdec, state.dt))
    alpha = torch.where(grow, a * p.fa, torch.where(reset, torch.full_like(a, p.astart), a))
    n_pos = torch.where(mix, state.n_pos + 1, torch.where(reset, torch.zeros_like(state.n_pos), state.n_pos))

    new_v_a = new_v_a + dt[per_a] * g_a
    new_v_c = new_v_c + dt[per_c] * g_c
    dr_a = dt[per_a] * new_v_a
    dr_c = dt[per_c] * new_v_c
    norm_dr = torch.sqrt(dot(dr_a, dr_a, dr_c, dr_c))
    big = norm_dr > p.maxstep
    safe_norm = torch.where(big, norm_dr, torch.ones_like(norm_dr))
    dr_a = torch.where(big[per_a], p.maxstep * dr_a / safe_norm[per_a], dr_a)
    dr_c = torch.where(big[per_c], p.maxstep * dr_c / safe_norm[per_c], dr_c)

    moved = displace(state, dr_a, dr_c, cell)
    return replace(
        moved,
        velocities=torch.where(act_a, new_v_a, v_a),
        cell_velocities=torch.where(act_c, new_v_c, v_c),
        dt=torch.where(active, dt, state.dt),
        alpha=torch.where(active, alpha, state.alpha),
        n_pos=torch.where(active, n_pos, state.n_pos),
        started=state.started | active,
    )
