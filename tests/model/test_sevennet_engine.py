"""SevenNet-0 (torch-sim model, through TorchSimAdapter) driven by the engine equals SevenNet-0 under ASE.

Issue 15's acceptance: relax_many == ASE FIRE + FrechetCellFilter (same step counts, energies to float32
round-off) and run_md NVE == ASE VelocityVerlet with SevenNetCalculator over 50 steps.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase.build import bulk

import geodite_sim as gs

pytestmark = pytest.mark.slow
sevenn = pytest.importorskip("sevenn")


@pytest.fixture(scope="module")
def sevennet():
    return gs.load_model("sevennet-0")


@pytest.fixture(scope="module")
def calc():
    from sevenn.calculator import SevenNetCalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SevenNetCalculator("7net-0", device="cpu")


def _cells():
    rng = np.random.default_rng(7)
    out = []
    for a in (bulk("Si", "diamond", 5.43), bulk("NaCl", "rocksalt", 5.64) * (2, 1, 1)):
        strain = 0.02 * rng.standard_normal((3, 3))
        a.set_cell(a.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        a.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(a)
    return out


def test_relax_many_equals_ase_fire_frechet(sevennet, calc):
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    cells = _cells()
    res = gs.relax_many(cells, sevennet, fmax=0.05, max_steps=60, progress=False)
    for a, r in zip(cells, res, strict=True):
        ref = a.copy()
        ref.calc = calc
        opt = FIRE(FrechetCellFilter(ref), logfile=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            conv = opt.run(fmax=0.05, steps=60)
        assert r.error is None and r.converged == conv
        assert r.n_steps == opt.nsteps
        assert abs(r.energy - ref.get_potential_energy()) < 1e-5  # float32 round-off (measured <= 1e-6)
        assert np.abs(r.structure.cell[:] - ref.cell[:]).max() < 1e-5


def test_run_md_nve_equals_ase_velocity_verlet(sevennet, calc):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    cells = _cells()
    rng = np.random.default_rng(3)
    for a in cells:
        p = rng.normal(size=(len(a), 3)) * np.sqrt(a.get_masses()[:, None] * units.kB * 300)
        a.set_momenta(p - p.mean(axis=0) * a.get_masses()[:, None] / a.get_masses().mean())
    res = gs.run_md(cells, sevennet, ensemble="nve", timestep=1.0, steps=50, progress=False)
    for a, r in zip(cells, res, strict=True):
        ref = a.copy()
        ref.calc = calc
        VelocityVerlet(ref, timestep=1.0 * units.fs).run(50)
        assert r.error is None and r.n_steps == 50
        assert np.abs(r.final.positions - ref.positions).max() < 1e-5  # measured <= 5e-7 Å
        assert np.abs(r.final.get_momenta() - ref.get_momenta()).max() < 1e-4  # measured <= 5e-6
        assert abs(r.energy - ref.get_potential_energy()) < 1e-5


def test_dense_small_cells_do_not_overflow(sevennet, calc):
    """SevenNet behind the engine uses the engine's neighbour list (buffers grow), so a compressed 2-atom hcp cell
    with ~270 neighbours per atom evaluates (torch-sim's default nvalchemiops list estimated 112 and raised
    NeighborOverflowError), and a normal cell still equals SevenNetCalculator."""
    dense = bulk("N", "hcp", a=1.5, c=2.4)
    normal = bulk("Si", "diamond", 5.43) * (2, 1, 1)
    normal.rattle(0.05, seed=3)
    out = gs.evaluate([dense, normal], sevennet)
    assert out[0]["error"] is None and np.isfinite(out[0]["energy"])
    from geodite_sim.workflows.stability import model_energy_convention

    assert model_energy_convention(sevennet) == "uncorrected"  # MPtrj raw energies: MP2020 applies once
    ref = normal.copy()
    ref.calc = calc
    assert abs(out[1]["energy"] - ref.get_potential_energy()) < 1e-4
    np.testing.assert_allclose(out[1]["forces"], ref.get_forces(), atol=1e-4)
