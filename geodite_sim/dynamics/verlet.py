"""Velocity Verlet (NVE) on a packed batch, and the MD state shared by all MD integrators.

Units are ASE's internally: positions Å, momenta amu·Å/t with t = Å·sqrt(amu/eV)
(``ase.units.fs`` ≈ 0.0982 t), energies eV, masses amu. The public API (``run_md``)
takes fs and converts. The update reproduces ``ase.md.verlet.VelocityVerlet.step``
operation by operation::

    p <- p + (dt/2) F(r)
    r <- r + dt p / m
    p <- p + (dt/2) F(r)

Every function works on all systems of the batch at once (no loop over systems).

Constraints (``state.constraints``, ASE's ``FixAtoms``/``FixCartesian`` per system) act where ASE's
``set_momenta``/``set_positions`` apply them: momenta are projected after every kick (fixed
components zero), positions keep their fixed components after every drift, and temperatures use
3N - removed degrees of freedom (ASE's ``get_temperature``). Without constraints nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from ase import units

from geodite_sim.core.ops import segment_sum
from geodite_sim.state import SimState, atom_field, packed_field, system_field

#: ``force_fn(batch) -> (energy [S] eV, forces [N, 3] eV/Å)`` evaluated at the batch's positions.
ForceFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class MDState(SimState):
    """State of a batched MD run (N atoms, S systems).

    Attributes (besides :class:`SimState`'s batch, energy [S], forces [N, 3]):
        momenta: [N, 3] ASE momenta, amu·Å/t.
        kT: [S] target temperature times k_B, eV (NVE: the initial temperature, or 0).
        step: [S] int64 steps taken by each system.
        target_steps: [S] int64 steps each system is to run.
        seed: [S] int64 per-system seed (a 32-bit value; Langevin noise key).
        conserved0: [S] conserved quantity at step 0, eV (reference of the drift monitor).
        constraints: :class:`~geodite_sim.dynamics.constraints.BatchConstraints` (FixAtoms/FixCartesian), or
            None when no system of the run has any.
    """

    momenta: torch.Tensor = atom_field(default=None)
    kT: torch.Tensor = system_field(default=None)
    step: torch.Tensor = system_field(default=None)
    target_steps: torch.Tensor = system_field(default=None)
    seed: torch.Tensor = system_field(default=None)
    conserved0: torch.Tensor = system_field(default=None)
    constraints: Any = packed_field(default=None)


def fixed_atoms(state: MDState) -> Any:
    """The state's constraints when some atom component is fixed (host flag, no device read), else None."""
    c = state.constraints
    return c if c is not None and c.any_fixed else None


def degrees_of_freedom(state: MDState) -> torch.Tensor:
    """[S] 3N minus the degrees of freedom the constraints remove (ASE's ``get_number_of_degrees_of_freedom``)."""
    n3 = (3 * state.batch.atoms_per_system).to(state.batch.dtype)
    c = state.constraints
    return n3 if c is None else n3 - c.removed_dof.to(n3.dtype)


def constrain_momenta(state: MDState) -> None:
    """Fixed momentum components set to zero (ASE's ``set_momenta`` with constraints); no-op without any."""
    c = fixed_atoms(state)
    if c is not None:
        state.momenta = c.adjust_momenta(state.momenta, state.batch)


def constrain_positions(state: MDState, old_positions: torch.Tensor) -> None:
    """Fixed position components back to ``old_positions`` (ASE's ``set_positions`` at a fixed cell)."""
    c = fixed_atoms(state)
    if c is not None:
        pos = torch.where(c.fixed_pre | c.fixed_post, old_positions, state.batch.positions)
        state.batch = state.batch.with_positions(pos)


def kinetic_energy(state: MDState) -> torch.Tensor:
    """[S] kinetic energy sum(p^2 / 2m) of each system, eV."""
    n = state.n_atoms
    p = state.momenta[:n]
    m = state.batch.masses[:n]
    per_atom = 0.5 * (p * p).sum(-1) / m
    return segment_sum(per_atom, state.batch.system_index[:n], state.n_systems)


def temperature(state: MDState, ke: torch.Tensor | None = None) -> torch.Tensor:
    """[S] instantaneous temperature 2 KE / (N_dof k_B), K (ASE's ``get_temperature``; N_dof = 3N - removed)."""
    ke = kinetic_energy(state) if ke is None else ke
    return 2.0 * ke / (degrees_of_freedom(state) * units.kB)


def half_kick(state: MDState, dt: float) -> None:
    """p <- p + (dt/2) F, in place on the state (ASE's order of operations), then constrained."""
    state.momenta = state.momenta + 0.5 * dt * state.forces
    constrain_momenta(state)


def drift(state: MDState, dt: float) -> None:
    """r <- r + dt p / m (ASE's order: (dt p) / m); fixed components stay."""
    m = state.batch.masses[:, None]
    old = state.batch.positions
    state.batch = state.batch.with_positions(old + dt * state.momenta / m)
    constrain_positions(state, old)


def evaluate(state: MDState, force_fn: ForceFn) -> None:
    """Store the energy and forces at the current positions on the state."""
    state.energy, state.forces = force_fn(state.batch)


def verlet_step(state: MDState, force_fn: ForceFn, dt: float) -> MDState:
    """One velocity-Verlet step of every system (``dt`` in ASE time units); uses and refreshes
    ``state.forces``."""
    half_kick(state, dt)
    drift(state, dt)
    evaluate(state, force_fn)
    half_kick(state, dt)
    state.step = state.step + 1
    return state


def nve_conserved(state: MDState, ke: torch.Tensor | None = None) -> torch.Tensor:
    """[S] total energy E_pot + E_kin, eV."""
    ke = kinetic_energy(state) if ke is None else ke
    return state.energy + ke
