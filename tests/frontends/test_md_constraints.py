"""Constraints in ``run_md`` (FixAtoms, FixCartesian): NVE equal to ASE's VelocityVerlet, NHC equal to ASE's
Nosé–Hoover chain thermostat acting on the free degrees of freedom, Langevin/Bussi physics, batch invariance with
refills, bit-for-bit restart, and a clear per-structure error for what MD cannot honour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, fcc111
from ase.constraints import FixAtoms, FixBondLength, FixCartesian, FixSymmetry
from ase.md.nose_hoover_chain import NoseHooverChainThermostat
from ase.md.verlet import VelocityVerlet

import geodite_sim as gs
from geodite_sim.dynamics.velocities import maxwell_boltzmann
from geodite_sim.pair_potential import MorsePotential

MORSE = dict(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2, dtype=torch.float64)
STEPS = 200


def morse() -> MorsePotential:
    return MorsePotential(**MORSE)


def slab(seed: int = 0) -> Atoms:
    """A small Cu(111) slab, bottom layer fixed (MS25-style), rattled, with thermal momenta."""
    a = fcc111("Cu", size=(2, 2, 3), a=3.61, vacuum=5.0)
    a.pbc = True
    a.rattle(0.03, seed=seed)
    bottom = a.positions[:, 2] < a.positions[:, 2].min() + 0.5
    a.set_constraint(FixAtoms(mask=bottom))
    a.set_momenta(maxwell_boltzmann(a, 500.0, seed=seed, index=0))
    return a


def crystal_fix_cartesian(seed: int = 1) -> Atoms:
    a = bulk("Cu", "fcc", 3.61, cubic=True) * (2, 1, 1)
    a.rattle(0.04, seed=seed)
    a.set_constraint([FixCartesian([0, 3], mask=(True, False, True)), FixAtoms([5])])
    a.set_momenta(maxwell_boltzmann(a, 400.0, seed=seed, index=0))
    return a


def fixed_mask(a: Atoms) -> np.ndarray:
    """[N, 3] bool: components held by the atoms' FixAtoms/FixCartesian."""
    out = np.zeros((len(a), 3), bool)
    for c in a.constraints:
        if isinstance(c, FixAtoms):
            out[c.index] = True
        elif isinstance(c, FixCartesian):
            out[c.index] |= c.mask
    return out


def ase_nve(a: Atoms, steps: int, dt_fs: float) -> Atoms:
    a = a.copy()
    a.calc = morse().ase_calculator()
    VelocityVerlet(a, timestep=dt_fs * units.fs).run(steps)
    return a


def nhc_free_dof_reference(a: Atoms, steps: int, dt_fs: float, T: float, tdamp_fs: float, tchain: int) -> Atoms:
    """``NoseHooverChainNVT.step`` with ASE's own thermostat object acting on the free degrees of freedom
    (3N - removed) and the fixed components' momenta kept at zero.

    ASE 3.29's NoseHooverChainNVT itself keeps an unconstrained copy of the momenta (a fixed atom's momentum
    grows under its force and feeds the thermostat), so it cannot be the reference under constraints.
    """
    a = a.copy()
    a.calc = morse().ase_calculator()
    fixed = fixed_mask(a)
    dof = 3 * len(a) - sum(c.get_removed_dof(a) for c in a.constraints)
    m = a.get_masses()[:, None]
    thermostat = NoseHooverChainThermostat(num_atoms_global=dof / 3, masses=m, temperature_K=T,
                                           tdamp=tdamp_fs * units.fs, tchain=tchain, tloop=1)
    dt = dt_fs * units.fs
    q, p = a.get_positions(), np.where(fixed, 0.0, a.get_momenta())

    def forces(q):
        a.set_positions(q, apply_constraint=False)
        return a.get_forces(md=True)

    f = forces(q)
    for _ in range(steps):
        p = thermostat.integrate_nhc(p, dt / 2)
        p = np.where(fixed, 0.0, p + dt / 2 * f)
        q = q + dt * p / m
        f = forces(q)
        p = np.where(fixed, 0.0, p + dt / 2 * f)
        p = thermostat.integrate_nhc(p, dt / 2)
    a.set_positions(q, apply_constraint=False)
    a.set_momenta(p, apply_constraint=False)
    return a


def batch_with_mates(constrained: list[Atoms]) -> list[Atoms]:
    """The constrained inputs interleaved with unconstrained crystals (refills with a small atom budget)."""
    out = []
    for k, c in enumerate(constrained):
        mate = bulk("Cu", "fcc", 3.6) * (1, 1, 2)
        mate.rattle(0.05, seed=10 + k)
        mate.set_momenta(maxwell_boltzmann(mate, 300.0, seed=5, index=k))
        out += [mate, c]
    return out


@pytest.mark.parametrize("make", [slab, crystal_fix_cartesian])
def test_nve_equals_ase_velocity_verlet_alone_and_in_a_batch(make):
    a = make()
    ref = ase_nve(a, STEPS, 2.0)
    kw = dict(ensemble="nve", timestep=2.0, steps=STEPS, progress=False, monitors=False)
    (alone,) = gs.run_md([a], morse(), **kw)
    mixed = gs.run_md(batch_with_mates([a, make(seed=7)]), morse(), max_atoms=16, **kw)
    fixed = fixed_mask(a)
    for r in (alone, mixed[1]):
        assert r.error is None and r.n_steps == STEPS
        assert np.abs(r.final.positions - ref.positions).max() < 1e-8
        assert np.abs(r.final.get_momenta() - ref.get_momenta()).max() < 1e-8
        assert np.array_equal(r.final.positions[fixed], a.positions[fixed])  # not a bit moved
        assert not r.final.get_momenta()[fixed].any()
        assert [type(c) for c in r.final.constraints] == [type(c) for c in a.constraints]
    np.testing.assert_array_equal(alone.final.positions, mixed[1].final.positions)  # batch invariance


@pytest.mark.parametrize("make", [slab, crystal_fix_cartesian])
def test_nhc_equals_ase_thermostat_on_the_free_degrees_of_freedom(make):
    a = make()
    ref = nhc_free_dof_reference(a, STEPS, 1.5, 500.0, 150.0, 3)
    kw = dict(ensemble="nvt_nhc", temperature=500.0, timestep=1.5, steps=STEPS, tdamp=150.0, chain_length=3,
              progress=False, monitors=False)
    (alone,) = gs.run_md([a], morse(), **kw)
    mixed = gs.run_md(batch_with_mates([make(seed=3), a]), morse(), max_atoms=16, **kw)
    for r in (alone, mixed[3]):
        assert r.error is None
        assert np.abs(r.final.positions - ref.positions).max() < 1e-8
        assert np.abs(r.final.get_momenta() - ref.get_momenta()).max() < 1e-8
    # the reported temperature uses 3N - removed degrees of freedom, as ASE's get_temperature
    assert alone.temperature == pytest.approx(alone.final.get_temperature(), rel=1e-12)


@pytest.mark.parametrize("max_atoms", [None, 8])
def test_constrained_and_unconstrained_batch_mates_do_not_change_each_other(max_atoms):
    """Bit for bit the same trajectories alone and together — in one admission, and with the constrained system
    arriving by refill into a batch that started without constraints (max_atoms=8)."""
    free = [bulk("Cu", "fcc", 3.6) * (2, 1, 1), bulk("Cu", "fcc", 3.62)]
    for k, a in enumerate(free):
        a.rattle(0.05, seed=2 + k)
        a.set_momenta(maxwell_boltzmann(a, 400.0, seed=9, index=k))  # momenta independent of the input index
    mate = crystal_fix_cartesian()  # 8 atoms: waits for a slot when max_atoms=8
    kw = dict(ensemble="nvt_nhc", temperature=400.0, timestep=1.5, steps=[30, 60, 40], progress=False,
              monitors=False)
    together = gs.run_md([*free, mate], morse(), max_atoms=max_atoms, **kw)
    for k, a in enumerate([*free, mate]):
        (alone,) = gs.run_md([a], morse(), **{**kw, "steps": kw["steps"][k]})
        assert together[k].n_steps == alone.n_steps
        np.testing.assert_array_equal(alone.final.positions, together[k].final.positions)
        np.testing.assert_array_equal(alone.final.get_momenta(), together[k].final.get_momenta())


@pytest.mark.parametrize("ensemble", ["nvt_langevin", "nvt_bussi"])
def test_stochastic_thermostats_hold_fixed_atoms_and_heat_the_free_ones(ensemble, tmp_path):
    """Fixed components never move; the free ones thermalise to the target by their own degrees of freedom."""
    from geodite_sim.trajectory import read_series

    structs = [slab(seed=k) for k in range(12)]
    T, path = 400.0, tmp_path / "t.h5"
    res = gs.run_md(structs, morse(), ensemble=ensemble, temperature=T, timestep=2.0, steps=400, seed=3,
                    frame_every=10, progress=False, monitors=False, friction=0.02, trajectory=path)
    temps = []
    for k, (a, r) in enumerate(zip(structs, res, strict=True)):
        fixed = fixed_mask(a)
        assert r.error is None
        assert np.array_equal(r.final.positions[fixed], a.positions[fixed])
        assert not r.final.get_momenta()[fixed].any()
        temps += list(read_series(path, "temperature", k)[10:])  # from 200 fs on
    # 12 systems × 24 free dof × ~10 decorrelated frames: σ(<T>) ≈ T sqrt(2/24)/sqrt(120) ≈ 0.03 T. With 3N
    # instead of 3N - removed degrees of freedom <T> would come out at 24/36 of the target.
    assert abs(np.mean(temps) - T) / T < 0.12


def test_restart_with_constraints_is_bit_for_bit(tmp_path):
    from test_md import FailingModel

    structs = [slab(0), crystal_fix_cartesian(), slab(4)]
    kw = dict(ensemble="nvt_langevin", temperature=400, timestep=1.0, steps=40, frame_every=5, checkpoint_every=10,
              max_atoms=20, progress=False, monitors=False)
    ref = gs.run_md(structs, morse(), trajectory=tmp_path / "ref.h5", **kw)
    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError, match="injected"):
        gs.run_md(structs, FailingModel(morse(), 37), trajectory=path, **kw)
    out = gs.run_md(structs, FailingModel(morse()), trajectory=path, restart=True, **kw)
    for a, b in zip(ref, out, strict=True):
        assert a.n_steps == b.n_steps == 40
        np.testing.assert_array_equal(a.final.positions, b.final.positions)
        np.testing.assert_array_equal(a.final.get_momenta(), b.final.get_momenta())


def test_what_md_cannot_honour_is_a_per_structure_error():
    good = slab()
    bond = bulk("Cu", "fcc", 3.6) * (2, 1, 1)
    bond.set_constraint(FixBondLength(0, 1))
    sym = bulk("Cu", "fcc", 3.6) * (2, 1, 1)
    sym.set_constraint(FixSymmetry(sym))
    res = gs.run_md([bond, good, sym], morse(), ensemble="nvt_nhc", temperature=300, steps=5, progress=False)
    assert res[0].status == "invalid_structure" and "FixBondLength" in res[0].error
    assert res[1].error is None and res[1].n_steps == 5
    assert res[2].status == "invalid_structure" and "FixSymmetry" in res[2].error
    (npt,) = gs.run_md([slab()], morse(), ensemble="npt_mtk_iso", temperature=300, steps=5, progress=False)
    assert npt.status == "invalid_structure" and "FixAtoms" in npt.error and "npt_mtk_iso" in npt.error


def test_initial_momenta_follow_ase_under_constraints():
    """Drawn momenta: ASE's MaxwellBoltzmann + Stationary on the constrained atoms (fixed components zero)."""
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    from geodite_sim.dynamics.velocities import structure_rng

    a = slab()
    a.set_momenta(None)
    ours = maxwell_boltzmann(a, 600.0, seed=4, index=2)
    b = a.copy()
    thermalize_momenta(b, 600.0, rng=structure_rng(4, 2))
    Stationary(b, preserve_temperature=True)
    np.testing.assert_array_equal(ours, b.get_momenta())
    assert not ours[fixed_mask(a)].any()
