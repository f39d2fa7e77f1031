"""Nosé–Hoover chain NVT, batched, with one chain per system (ASE's ``NoseHooverChainNVT``).

Equations and splitting are ASE's (``ase/md/nose_hoover_chain.py``; Martyna, Klein,
Tuckerman 1992; Tuckerman et al. 2006)::

    step:  NHC(dt/2)  p += (dt/2) F  r += dt p/m  p += (dt/2) F(r)  NHC(dt/2)
    NHC(δ): tloop × Suzuki–Yoshida 4th order (w = 1/(2-2^{1/3}), -2^{1/3}/(2-2^{1/3}), w),
            each sub-step d = w δ / tloop:
              for j = M-1 .. 0:  p_ηj *= e^{-(d/4) p_η(j+1)/Q(j+1)};  p_ηj += (d/2) G_j;  p_ηj *= (same)
              η += d p_η / Q
              p *= e^{-d p_η0 / Q0}
              for j = 0 .. M-1:  (same update of p_ηj)
    G_0 = Σ p²/m − 3N kT,  G_j = p_η(j−1)²/Q(j−1) − kT
    Q_0 = 3N kT τ²,  Q_j = kT τ²  (τ = tdamp; N = atoms of the system, 3N degrees of freedom as in ASE)
    conserved: E_pot + E_kin + 3N kT η0 + kT Σ_{j≥1} ηj + Σ p_ηj² / 2Qj

With constraints (FixAtoms/FixCartesian) 3N is replaced by N_dof = 3N - removed and the fixed
momenta stay zero (:mod:`geodite_sim.dynamics.verlet`). ASE 3.29's ``NoseHooverChainNVT`` differs
there: it keeps its own copy of the momenta, so a fixed atom's momentum grows under its force
and feeds the thermostat although the atom never moves (docs/constraints.md); without
constraints the two are the same.

Differences from ASE are in rounding only: inside NHC(δ) the atoms' momenta are scaled once
at the end by the product of the per-sub-step factors, and Σ p²/m is carried along as
``K2 · f²`` instead of being re-summed (mathematically identical). Unlike torch-sim's
(global) chain, η, p_η and Q are per-system fields ([S, M]), so systems can be swapped
in and out of a running batch. nvalchemiops' Warp NHC kernels are not used: they cap
the chain at 8 thermostats (the protocol needs 10), use 3N − 3 degrees of freedom and a
different splitting, so they cannot reproduce ASE's trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from geodite_sim.core.ops import FOURTH_ORDER_COEFFS
from geodite_sim.dynamics.nhc_chain import chain_sweeps, chain_sweeps_fused
from geodite_sim.dynamics.verlet import (
    ForceFn,
    MDState,
    degrees_of_freedom,
    drift,
    evaluate,
    half_kick,
    kinetic_energy,
)
from geodite_sim.state import system_field

__all__ = ["FOURTH_ORDER_COEFFS", "chain_sweeps"]  # re-exported: the chain sweep lives in dynamics.nhc_chain


@dataclass
class NHCState(MDState):
    """MD state plus one Nosé–Hoover chain of M thermostats per system.

    Attributes:
        eta: [S, M] thermostat positions (dimensionless).
        p_eta: [S, M] thermostat momenta, eV·t.
        Q: [S, M] thermostat masses, eV·t².
    """

    eta: torch.Tensor = system_field(default=None)
    p_eta: torch.Tensor = system_field(default=None)
    Q: torch.Tensor = system_field(default=None)


def chain_masses(kT: torch.Tensor, dof: torch.Tensor, tdamp: float, chain_length: int) -> torch.Tensor:
    """[S, M] masses Q_0 = N_dof kT tdamp², Q_j = kT tdamp² (``tdamp`` in ASE time units; N_dof [S] = 3N
    without constraints), as ASE."""
    if chain_length < 1:
        raise ValueError("chain_length must be at least 1")
    q = (kT * tdamp**2)[:, None].repeat(1, chain_length)
    q[:, 0] = dof.to(kT.dtype) * kT * tdamp**2
    return q


def init_chain(state: MDState, tdamp: float, chain_length: int) -> NHCState:
    """Attach fresh chains (η = p_η = 0) to an MD state."""
    n_sys = state.n_systems
    kT = state.kT
    zeros = kT.new_zeros(n_sys, chain_length)
    fields = {f: getattr(state, f) for f in state.__dataclass_fields__}
    return NHCState(**fields, eta=zeros, p_eta=zeros.clone(),
                    Q=chain_masses(kT, degrees_of_freedom(state), tdamp, chain_length))


def thermostat_energy(state: NHCState) -> torch.Tensor:
    """[S] N_dof kT η0 + kT Σ_{j≥1} ηj + Σ p_ηj²/(2Qj), eV (ASE's ``get_thermostat_energy``)."""
    n3 = degrees_of_freedom(state)
    return (n3 * state.kT * state.eta[:, 0] + state.kT * state.eta[:, 1:].sum(1)
            + (0.5 * state.p_eta**2 / state.Q).sum(1))


def nhc_conserved(state: NHCState, ke: torch.Tensor | None = None) -> torch.Tensor:
    """[S] E_pot + E_kin + thermostat energy, eV."""
    ke = kinetic_energy(state) if ke is None else ke
    return state.energy + ke + thermostat_energy(state)


def nhc_propagate(state: NHCState, delta: float, tloop: int = 1) -> None:
    """exp(iL_NHC δ) for every system's chain and momenta (δ in ASE time units); rebinds the state's
    fields to new tensors (the input tensors are not modified). Device-side: no host read."""
    n = state.n_atoms
    sys_idx = state.batch.system_index[:n]
    m = state.batch.masses[:n]
    p = state.momenta[:n]
    k2 = torch.zeros_like(state.kT).index_add_(0, sys_idx, (p * p / m[:, None]).sum(-1))
    n3kT = degrees_of_freedom(state) * state.kT
    pe, eta, scale = chain_sweeps_fused(k2, n3kT, state.kT, state.Q, state.p_eta, state.eta, delta, tloop)
    state.p_eta = pe
    state.eta = eta
    state.momenta = state.momenta * scale[state.batch.system_index][:, None]


def nhc_step(state: NHCState, force_fn: ForceFn, dt: float, tloop: int = 1) -> NHCState:
    """One step of ASE's ``NoseHooverChainNVT.step`` for every system (``dt`` in ASE time units)."""
    nhc_propagate(state, dt / 2, tloop)
    half_kick(state, dt)
    drift(state, dt)
    evaluate(state, force_fn)
    half_kick(state, dt)
    nhc_propagate(state, dt / 2, tloop)
    state.step = state.step + 1
    return state
