"""Langevin NVT, batched, with ASE's propagator (``ase.md.langevin.Langevin``) and counter-based noise.

ASE's update (Vanden-Eijnden & Ciccotti 2006, eq. 23), per atom with friction γ, kT, mass m::

    σ  = sqrt(2 kT γ / m)
    c1 = dt/2 − dt² γ/8          c2 = dt γ/2 − dt² γ²/8
    c3 = sqrt(dt) σ/2 − dt^1.5 γ σ/8
    c5 = dt^1.5 σ / (2 sqrt 3)   c4 = γ/2 · c5
    ξ, η ~ N(0, 1)³ per atom;  δr = c5 η;  δv = c3 ξ − c4 η
    v += c1 F/m − c2 v + δv;  r += dt v + δr;  F = F(r);  v += c1 F/m − c2 v + δv

γ and kT are per system here (γ in 1/t internally; the public API takes 1/fs). ``fix_com``
reproduces ASE's (deprecated) ``fixcm=True`` per system; the default is False (ASE ≥ 3.28
recommends ``FixCom`` instead of ``fixcm``). ASE recomputes v from the constrained
positions after the drift; without constraints that only changes rounding, so it is skipped.

Random numbers are counter-based: the normal deviates of atom i (local index within its
system) at step t of a system with seed s are a hash of (s, t, i, component), so a
system's noise does not depend on its batch-mates, is identical on CPU and GPU, and
needs no generator state in checkpoints (the step counter is the state). The hash is
Wellons' ``triple32`` evaluated with exact 64-bit integer arithmetic (no overflow), the
deviates come from Box–Muller on 32-bit uniforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from geodite_sim.core.ops import segment_sum
from geodite_sim.dynamics.verlet import ForceFn, MDState, constrain_momenta, constrain_positions
from geodite_sim.state import system_field

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


@dataclass
class LangevinState(MDState):
    """MD state plus a per-system friction ``friction`` [S] in 1/t (ASE time units)."""

    friction: torch.Tensor = system_field(default=None)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2^32 for int64 ``x`` in [0, 2^32) without int64 overflow (16-bit split of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' triple32 integer hash of 32-bit values held in int64 (a bijection on [0, 2^32))."""
    x = x & _M32
    x = x ^ (x >> 17)
    x = _mul32(x, 0xED5AD4BB)
    x = x ^ (x >> 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x31848BAB)
    x = x ^ (x >> 14)
    return x


def counter_normals(seed: torch.Tensor, step: torch.Tensor, system_index: torch.Tensor,
                    local_index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, n] standard normal deviates (``n`` even) keyed by (seed[S], step[S], local atom index, column).

    Args:
        seed: [S] int64 per-system seeds (32-bit values).
        step: [S] int64 step counter of each system.
        system_index: [N] system of each atom.
        local_index: [N] index of each atom within its system.
    """
    if n % 2:
        raise ValueError("n must be even (Box-Muller pairs)")
    base = hash32(hash32(seed ^ 0x5BD1E995) ^ (step & _M32))
    base = hash32(base + _mul32(step >> 32, _GOLDEN))  # steps beyond 2^32 stay distinct
    cols = torch.arange(n, device=seed.device)
    counter = local_index[:, None] * n + cols[None, :]
    bits = hash32(base[system_index][:, None] ^ hash32(counter + _GOLDEN))
    u = (bits.to(torch.float64) + 0.5) * 2.0**-32  # in (0, 1)
    u1, u2 = u[:, 0::2], u[:, 1::2]
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = 2.0 * math.pi * u2
    z = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), -1).reshape(u.shape[0], n)
    return z.to(dtype)


def local_atom_index(offsets: torch.Tensor, system_index: torch.Tensor) -> torch.Tensor:
    """[N] index of each atom within its system."""
    return torch.arange(system_index.shape[0], device=system_index.device) - offsets[system_index]


def langevin_step(state: LangevinState, force_fn: ForceFn, dt: float, fix_com: bool = False) -> LangevinState:
    """One ASE Langevin step of every system (``dt`` in ASE time units; ``state.friction`` in 1/t)."""
    b = state.batch
    n = b.n_atoms
    sys_idx = b.system_index[:n]
    m = b.masses[:n, None]
    fr = state.friction[sys_idx][:, None]
    T = state.kT[sys_idx][:, None]
    sigma = torch.sqrt(2 * T * fr / m)
    c1 = dt / 2.0 - dt * dt * fr / 8.0
    c2 = dt * fr / 2 - dt * dt * fr * fr / 8.0
    c3 = math.sqrt(dt) * sigma / 2.0 - dt**1.5 * fr * sigma / 8.0
    c5 = dt**1.5 * sigma / (2 * math.sqrt(3))
    c4 = fr / 2.0 * c5

    z = counter_normals(state.seed, state.step, sys_idx, local_atom_index(b.offsets, sys_idx), 6, m.dtype)
    xi, eta = z[:, :3], z[:, 3:]
    rnd_pos = c5 * eta
    rnd_vel = c3 * xi - c4 * eta
    if fix_com:
        count = b.atoms_per_system.to(m.dtype)[:, None]
        natoms = count[sys_idx]
        factor = torch.sqrt(natoms / (natoms - 1.0).clamp_min(1.0))  # a lone atom gets no noise
        rnd_pos = rnd_pos - segment_sum(rnd_pos, sys_idx, state.n_systems)[sys_idx] / natoms
        rnd_vel = rnd_vel - segment_sum(rnd_vel * m, sys_idx, state.n_systems)[sys_idx] / (m * natoms)
        rnd_pos = rnd_pos * factor
        rnd_vel = rnd_vel * factor

    v = state.momenta / m
    v = v + (c1 * state.forces / m - c2 * v + rnd_vel)
    state.batch = b.with_positions(b.positions + dt * v + rnd_pos)
    constrain_positions(state, b.positions)  # fixed components stay (ASE: set_positions)
    state.energy, state.forces = force_fn(state.batch)
    v = v + (c1 * state.forces / m - c2 * v + rnd_vel)
    state.momenta = v * m
    constrain_momenta(state)  # ASE: set_momenta with the constraints
    state.step = state.step + 1
    return state
