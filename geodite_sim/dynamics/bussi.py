"""Bussi stochastic velocity rescaling (``"nvt_bussi"``), batched: ASE 3.29's ``ase.md.bussi.Bussi``.

Each step (Bussi, Donadio, Parrinello, J. Chem. Phys. 126, 014101 (2007), eq. A7), per system
with Nf = 3N - removed degrees of freedom (ASE's ``get_number_of_degrees_of_freedom``; FixAtoms
and FixCartesian remove theirs, and their components of p stay zero), K the kinetic energy,
K̄ = Nf kT / 2 and c = exp(-dt/taut)::

    α² = c + (1 - c) K̄/(K Nf) (S + R1²) + 2 R1 sqrt(c (1 - c) K̄/(K Nf))
    p <- α p;   transferred += (α² - 1) K
    velocity Verlet:  p += (dt/2) F;  r += dt p/m;  F = F(r);  p += (dt/2) F

with R1 ~ N(0, 1) and S ~ χ²(Nf - 1). α is the positive root, as in ASE. The conserved
quantity is E_pot + K - transferred (ASE's ``transferred_energy``).

Noise is counter-based (``langevin.counter_normals``): four normal deviates per atom keyed by
(seed ^ tag, step, local atom index, column), so a system's noise does not depend on its
batch-mates, needs no generator state (restart = same step counter) and is the same on CPU
and GPU. R1 is column 0 of the system's first atom; S is the sum of squares of columns 0-2 of
all its atoms except that one entry: 3N - 1 squared normals, a χ²(3N - 1) draw with static
shapes and no loop over systems. ASE draws from numpy's generator, so trajectories cannot
equal ASE's number for number; the tests check the canonical statistics instead.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from geodite_sim.dynamics.langevin import counter_normals, local_atom_index
from geodite_sim.dynamics.mtk import AtomView, ForceStressFn, kinetic_energy, per_system_param, safe_denominator
from geodite_sim.dynamics.verlet import MDState, degrees_of_freedom, fixed_atoms
from geodite_sim.state import system_field

#: Mixed into the seed so Bussi's stream differs from Langevin's for the same seed.
_STREAM_TAG = 0x42555353


@dataclass
class BussiState(MDState):
    """MD state plus Bussi's coupling time and energy bookkeeping.

    Attributes:
        taut: [S] thermostat time constant, t (ASE time units).
        transferred: [S] energy the thermostat has put into the system, eV (ASE's ``transferred_energy``).
    """

    taut: torch.Tensor = system_field(default=None)
    transferred: torch.Tensor = system_field(default=None)


def bussi_init(state: MDState, *, taut) -> BussiState:
    """Bussi state from an MD state (energy and forces at its positions); ``taut`` in t, one value or [S].

    ASE refuses to start from zero kinetic energy; check :func:`zero_kinetic_energy` at admission.
    """
    if state.forces is None or state.energy is None:
        raise ValueError("Bussi needs energy and forces at the initial positions")
    base = {f.name: getattr(state, f.name) for f in fields(MDState)}
    new = BussiState(**base, taut=per_system_param(taut, state.kT, "taut"), transferred=torch.zeros_like(state.kT))
    if new.conserved0 is None:
        new.conserved0 = bussi_conserved(new)
    return new


def zero_kinetic_energy(state: MDState) -> torch.Tensor:
    """[S] bool: systems with atoms whose kinetic energy is ~0 (ASE's Bussi raises ValueError for them)."""
    ke = kinetic_energy(state)
    return (ke.abs() <= 1e-12) & (state.batch.atoms_per_system > 0)


def bussi_noise(state: MDState, at: AtomView | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([S] R1 ~ N(0, 1), [S] S ~ χ²(N_dof - 1)) for every system at its current step.

    Entry k = 3 · local atom + column of the system's normals: R1 is entry 0, S the sum of the squares
    of entries 1 .. N_dof - 1 (all 3N - 1 without constraints).
    """
    at = AtomView(state) if at is None else at
    b = state.batch
    local = local_atom_index(b.offsets, at.sys)
    z = counter_normals(state.seed ^ _STREAM_TAG, state.step, at.sys, local, 4, b.dtype)[:, :3]
    k = 3 * local[:, None] + torch.arange(3, device=b.device)[None, :]
    first = k == 0
    used = (k >= 1) & (k < degrees_of_freedom(state).to(torch.long)[at.sys][:, None])
    r1 = at.sum(torch.where(first, z, torch.zeros_like(z)).sum(-1))
    chi2 = at.sum(torch.where(used, z * z, torch.zeros_like(z)).sum(-1))
    return r1, chi2


def bussi_alpha(state: BussiState, ke: torch.Tensor, dt: float, at: AtomView | None = None) -> torch.Tensor:
    """[S] ASE's ``calculate_alpha`` with the counter-based noise."""
    at = AtomView(state) if at is None else at
    ndof = degrees_of_freedom(state)
    c = torch.exp(-dt / safe_denominator(state.taut))
    target = 0.5 * state.kT * ndof
    e = (1 - c) * target / safe_denominator(ke) / safe_denominator(ndof)
    r1, chi2 = bussi_noise(state, at)
    a2 = c + e * (chi2 + r1**2) + 2 * r1 * torch.sqrt(c * e)
    return torch.sqrt(a2.clamp_min(0.0))


def bussi_step(state: BussiState, force_fn: ForceStressFn, dt: float) -> BussiState:
    """One ``Bussi.step`` of every system (``dt`` in ASE time units). Pure: returns a new state.

    ``force_fn`` returns (energy, forces, stress); the stress is stored on the state.
    """
    at = AtomView(state)
    ke = kinetic_energy(state)
    alpha = bussi_alpha(state, ke, dt, at)
    transferred = state.transferred + (alpha**2 - 1.0) * ke
    c = fixed_atoms(state)
    p = state.momenta * alpha[at.sys][:, None]
    p = p + 0.5 * dt * state.forces
    if c is not None:  # ASE: fixed positions stay and p = m Δr / dt (zero on fixed components)
        p = c.adjust_momenta(p, state.batch)
    r0 = state.batch.positions
    batch = state.batch.with_positions(at.keep(r0 + dt * p / at.m, r0))
    energy, forces, stress = force_fn(batch)
    p = at.keep(p + 0.5 * dt * forces, state.momenta)
    if c is not None:
        p = c.adjust_momenta(p, batch)
    return replace(state, batch=batch, energy=energy, forces=forces, stress=stress, momenta=p,
                   transferred=transferred, step=state.step + 1)


def bussi_conserved(state: BussiState) -> torch.Tensor:
    """[S] E_pot + E_kin - transferred, eV (drifts only by the integration error of the Verlet part)."""
    return state.energy + kinetic_energy(state) - state.transferred
