"""FIRE and the Fréchet cell filter against ASE (``FIRE``, ``FIRE`` + ``FrechetCellFilter``), float64.

The oracle is ASE itself driving the same potential: the Morse twin (``MorsePotential.ase_calculator``,
r0 at each crystal's nearest-neighbour distance, so every structure has a sound minimum) for a dozen
structures, and the Geodite model through ``GeoditeCalculator`` for a couple.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from ase.build import bulk, fcc100, molecule
from ase.filters import FrechetCellFilter
from ase.neighborlist import neighbor_list as ase_neighbor_list
from ase.optimize import FIRE
from ase.spacegroup import crystal
from conftest import tiny_geodite

import geodite_sim as gs
from geodite_sim.batch import Batch
from geodite_sim.dynamics.cell_filter import expm, expm_frechet_adjoint
from geodite_sim.dynamics.fire import FireParams, fire_init, fire_step
from geodite_sim.pair_potential import MorsePotential

FMAX = 0.05
MAX_STEPS = 300


pytestmark = pytest.mark.usefixtures("one_thread")


def morse_cases(seed: int = 7) -> list[tuple[str, object, MorsePotential]]:
    """(name, rattled/strained Atoms, Morse with r0 = its nearest-neighbour distance): 13 structures, 2-8 atoms."""
    rng = np.random.default_rng(seed)
    structures = {
        "Cu_fcc_conv": bulk("Cu", "fcc", 3.61, cubic=True),
        "Fe_bcc_2x1x1": bulk("Fe", "bcc", 2.87, cubic=True) * (2, 1, 1),
        "Mg_hcp": bulk("Mg", "hcp", 3.21),
        "Si_diamond_conv": bulk("Si", "diamond", 5.43, cubic=True),
        "NaCl_rocksalt": bulk("NaCl", "rocksalt", 5.64),
        "ZnS_zincblende": bulk("ZnS", "zincblende", 5.41),
        "ZnO_wurtzite": bulk("ZnO", "wurtzite", a=3.25, c=5.21),
        "CaF2_fluorite": bulk("CaF2", "fluorite", 5.46),
        "TiO2_rutile": crystal(["Ti", "O"], basis=[(0, 0, 0), (0.305, 0.305, 0)], spacegroup=136,
                               cellpar=[4.59, 4.59, 2.96, 90, 90, 90]),
        "Al_triclinic": bulk("Al", "fcc", 4.05, cubic=True),
        "Cu_fcc_2x2x2": bulk("Cu", "fcc", 3.61) * (2, 2, 2),
        "CH4": molecule("CH4"),
        "Cu_slab": fcc100("Cu", (2, 2, 2), vacuum=4.0),
    }
    cases = []
    for name, atoms in structures.items():
        if name == "Al_triclinic":
            atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.05 * rng.standard_normal((3, 3))), scale_atoms=True)
        if name == "Cu_slab":
            atoms.pbc = (True, True, False)
        r0 = float(ase_neighbor_list("d", atoms, 4.0).min())
        strain = 0.02 * rng.standard_normal((3, 3))
        if atoms.pbc.all():
            atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.rattle(0.04, seed=int(rng.integers(1 << 30)))
        cases.append((name, atoms, MorsePotential(epsilon=0.5, rho0=5.0, r0=r0, rcut1=1.5, rcut2=2.0)))
    return cases


def ase_relax(atoms, calc, cell: bool, fmax: float = FMAX, steps: int = MAX_STEPS):
    a = atoms.copy()
    a.calc = calc
    opt = FIRE(FrechetCellFilter(a) if (cell and a.pbc.all()) else a, logfile=None)
    converged = opt.run(fmax=fmax, steps=steps)
    return a, opt.nsteps, converged


def ase_relax_to_each(atoms, calc, cell: bool, fmaxes, steps: int = MAX_STEPS) -> dict:
    """One ASE run to the tightest of ``fmaxes``, read at each: ``{fmax: (atoms, n_steps, converged)}`` as
    ``ase_relax(..., fmax=fmax)`` returns them. FIRE's steps do not depend on fmax (only the stopping test
    does), so the run to a looser fmax is the first part of the run to a tighter one."""
    from ase.calculators.singlepoint import SinglePointCalculator

    a = atoms.copy()
    a.calc = calc
    opt = FIRE(FrechetCellFilter(a) if (cell and a.pbc.all()) else a, logfile=None)
    todo = sorted(fmaxes, reverse=True)
    out = {}

    def snapshot():
        snap = a.copy()
        snap.calc = SinglePointCalculator(snap, energy=a.get_potential_energy())
        return snap

    for _ in opt.irun(fmax=min(fmaxes), steps=steps):
        gradient = opt.optimizable.get_gradient()
        while todo and opt.optimizable.converged(gradient, todo[0]):
            out[todo.pop(0)] = (snapshot(), opt.nsteps, True)
    for fmax in todo:  # not converged within ``steps``
        out[fmax] = (snapshot(), opt.nsteps, False)
    return out


def assert_same(res, ref_atoms, ref_steps, ref_converged):
    n = len(ref_atoms)
    assert res.error is None
    assert res.n_steps == ref_steps
    assert res.converged == ref_converged
    assert abs(res.energy - ref_atoms.get_potential_energy()) / n < 1e-6
    assert np.abs(res.structure.positions - ref_atoms.positions).max() < 1e-4
    assert np.abs(res.structure.cell[:] - ref_atoms.cell[:]).max() < 1e-4


# ---------------------------------------------------------------------------------------------- math
def test_expm_matches_scipy():
    rng = np.random.default_rng(0)
    mats = [0.01 * rng.standard_normal((3, 3)), 0.3 * rng.standard_normal((3, 3)), 3.0 * rng.standard_normal((3, 3)),
            np.zeros((3, 3)), np.diag([0.5, -0.2, 0.1])]
    got = expm(torch.tensor(np.stack(mats)))
    for m, g in zip(mats, got):
        ref = scipy.linalg.expm(m)
        assert np.allclose(g.numpy(), ref, rtol=1e-13, atol=1e-14 * np.abs(ref).max())


def test_frechet_adjoint_matches_ase_directional_derivatives():
    """L(Xᵀ, G) equals ASE's nine expm_frechet(X, E_μν) contractions with G."""
    rng = np.random.default_rng(1)
    x = 0.2 * rng.standard_normal((4, 3, 3))
    g = 50.0 * rng.standard_normal((4, 3, 3))
    got = expm_frechet_adjoint(torch.tensor(x), torch.tensor(g)).numpy()
    for k in range(4):
        ref = np.zeros((3, 3))
        for mu in range(3):
            for nu in range(3):
                e = np.zeros((3, 3))
                e[mu, nu] = 1.0
                ref[mu, nu] = np.sum(scipy.linalg.expm_frechet(x[k], e, compute_expm=False) * g[k])
        assert np.allclose(got[k], ref, rtol=1e-11, atol=1e-11 * np.abs(ref).max())


def test_generalized_forces_match_frechet_filter(morse):
    """Atom and cell rows of the filter's forces after a cell change equal ASE's get_forces()."""
    atoms = bulk("Cu", "fcc", 3.7, cubic=True)
    atoms.rattle(0.05, seed=3)
    calc = morse.ase_calculator()
    a = atoms.copy()
    a.calc = calc
    filt = FrechetCellFilter(a)
    x = filt.get_positions()
    x[len(a):] += 0.3 * np.array([[0.1, 0.02, 0.0], [0.02, -0.05, 0.01], [0.0, 0.01, 0.03]])
    filt.set_positions(x)
    ref = filt.get_forces()

    state = fire_init(Batch.from_atoms([atoms], dtype=torch.float64), relax_cell=True)
    x_log = torch.tensor(x[len(a):] / len(a) - np.log(len(a)) * np.eye(3))[None]
    from geodite_sim.dynamics.cell_filter import generalized_forces

    out = morse(Batch.from_atoms([a], dtype=torch.float64))
    g_a, g_c = generalized_forces(out["forces"], out["stress"], torch.tensor(a.cell[:])[None], x_log,
                                  expm(x_log), state.cell_factor, state.relax_cell, state.batch.system_index)
    assert np.allclose(g_a.numpy(), ref[: len(a)], atol=1e-10)
    assert np.allclose(g_c[0].numpy(), ref[len(a):], atol=1e-10)


def test_fire_first_step_and_parameters_match_ase(morse):
    """Per-step trace (positions after each step) with non-default FIRE parameters."""
    params = FireParams(dt=0.05, maxstep=0.1, dtmax=0.5, Nmin=3, finc=1.2, fdec=0.4, astart=0.2, fa=0.95, a=0.15)
    atoms = bulk("Cu", "fcc", 3.61, cubic=True) * (2, 1, 1)
    atoms.rattle(0.1, seed=5)
    a = atoms.copy()
    a.calc = morse.ase_calculator()
    opt = FIRE(a, logfile=None, dt=0.05, maxstep=0.1, dtmax=0.5, Nmin=3, finc=1.2, fdec=0.4, astart=0.2,
               fa=0.95, a=0.15)
    state = fire_init(Batch.from_atoms([atoms], dtype=torch.float64), relax_cell=False, params=params)
    for _ in range(25):
        out = morse(state.batch)
        state.energy, state.forces, state.stress = out["energy"], out["forces"], out["stress"]
        state = fire_step(state, fmax=1e-9, max_steps=1000, params=params)
        opt.step()
        assert np.abs(state.batch.positions.numpy() - a.positions).max() < 1e-12
    assert float(state.dt[0]) == pytest.approx(opt.dt, rel=1e-12)
    assert float(state.alpha[0]) == pytest.approx(opt.a, rel=1e-12)
    assert int(state.n_pos[0]) == opt.Nsteps


# ---------------------------------------------------------------------------------------------- vs ASE
CASES = morse_cases()
#: The default run covers 11 of them (the two slowest paths run with the slow tests).
QUICK = [c for c in CASES if c[0] not in ("Si_diamond_conv", "Cu_fcc_2x2x2")]


@pytest.mark.parametrize("cell", [False, True], ids=["fixed_cell", "frechet_cell"])
def test_single_structure_matches_ase_morse(cell):
    """11 structures (2-8 atoms; bulk of 9 prototypes incl. a triclinic cell, a molecule, a slab), each alone."""
    for name, atoms, model in QUICK:
        ref, steps, conv = ase_relax(atoms, model.ase_calculator(), cell)
        res = gs.relax_many([atoms], model, fmax=FMAX, max_steps=MAX_STEPS, relax_cell=cell, progress=False)[0]
        assert res.relax_cell == (cell and bool(atoms.pbc.all())), name
        try:
            assert_same(res, ref, steps, conv)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


@pytest.mark.parametrize("cell", [False, True], ids=["fixed_cell", "frechet_cell"])
def test_single_structure_matches_ase_geodite(cell):
    """The Geodite model path: tiny random Geodite through GeoditeCalculator, Si and a distorted NaCl cell."""
    model = tiny_geodite(torch.float64)
    calc = gs.GeoditeCalculator(model)
    rng = np.random.default_rng(11)
    for atoms in (bulk("Si", "diamond", 5.43), bulk("NaCl", "rocksalt", 5.64)):
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.02 * rng.standard_normal((3, 3))), scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        ref, steps, conv = ase_relax(atoms, calc, cell, fmax=0.05, steps=30)
        res = gs.relax_many([atoms], model, fmax=0.05, max_steps=30, relax_cell=cell, progress=False)[0]
        assert_same(res, ref, steps, conv)


@pytest.mark.slow
def test_single_structure_matches_ase_reference_geodite(reference_model_fp64):
    """The Geodite-MP configuration (packaged random reference checkpoint), cell relaxation."""
    atoms = bulk("NaCl", "rocksalt", 5.64)
    atoms.rattle(0.05, seed=2)
    ref, steps, conv = ase_relax(atoms, gs.GeoditeCalculator(reference_model_fp64), True, steps=20)
    res = gs.relax_many([atoms], reference_model_fp64, max_steps=20, progress=False)[0]
    assert_same(res, ref, steps, conv)


@pytest.mark.slow
def test_tight_fmax_matches_ase_morse():
    """All 13 structures, longer paths (tighter fmax 0.01 and 0.002): rounding differences must not change the
    step count. One ASE run per structure and cell mode, read at both thresholds, is the reference of both."""
    for name, atoms, model in CASES:
        for cell in (False, True):
            refs = ase_relax_to_each(atoms, model.ase_calculator(), cell, (0.01, 0.002), steps=600)
            for fmax, (ref, steps, conv) in refs.items():
                res = gs.relax_many([atoms], model, fmax=fmax, max_steps=600, relax_cell=cell, progress=False,
                                    min_distance_factor=None, max_volume_ratio=None)[0]
                try:
                    assert_same(res, ref, steps, conv)
                except AssertionError as exc:
                    raise AssertionError(f"{name} cell={cell} fmax={fmax}: {exc}") from exc
