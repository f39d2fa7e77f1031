"""The NPT and Bussi entries of the runner registry through ``run_md``: exact against ASE, batched with refills,
restartable bit for bit (the integrator maths itself: tests/dynamics/test_npt.py, tests/dynamics/test_bussi.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

import geodite_sim as gs
from geodite_sim.pair_potential import MorsePotential

MORSE = dict(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2, dtype=torch.float64)
STEPS = 200


def _inputs():
    rng = np.random.default_rng(4)
    out = []
    for reps, a0 in [((2, 2, 2), 3.6), ((2, 1, 1), 3.65), ((1, 2, 2), 3.58)]:
        a = bulk("Cu", "fcc", a0) * reps
        a.rattle(0.04, seed=int(rng.integers(1 << 30)))
        a.set_momenta(rng.normal(0.0, 0.3, (len(a), 3)))
        out.append(a)
    return out


def _ase(atoms, cls, pressure_gpa):
    a = atoms.copy()
    a.calc = MorsePotential(**MORSE).ase_calculator()
    dyn = cls(a, timestep=1.0 * units.fs, temperature_K=400, pressure_au=pressure_gpa * units.GPa,
              tdamp=100 * units.fs, pdamp=1000 * units.fs, tchain=3, pchain=3)
    dyn.run(STEPS)
    return a


@pytest.mark.parametrize("ensemble,cls", [("npt_mtk_iso", IsotropicMTKNPT), ("npt_mtk", MTKNPT)])
def test_npt_through_run_md_equals_ase_in_a_batch_with_refills(ensemble, cls):
    structs = _inputs()
    pressures = [0.0, 2.0, -1.0]
    res = gs.run_md(structs, MorsePotential(**MORSE), ensemble=ensemble, temperature=400, pressure=pressures,
                    timestep=1.0, steps=STEPS, max_atoms=10, progress=False, monitors=False)
    for a, p, r in zip(structs, pressures, res, strict=True):
        ref = _ase(a, cls, p)
        assert r.error is None and r.n_steps == STEPS
        assert np.abs(r.final.positions - ref.positions).max() < 1e-8
        assert np.abs(r.final.cell[:] - ref.cell[:]).max() < 1e-8


@pytest.mark.parametrize("ensemble", ["npt_mtk", "nvt_bussi"])
def test_restart_after_a_crash_is_bit_for_bit(tmp_path, ensemble):
    """Crash in the middle, restart from the checkpoint: the same final positions, cells and momenta."""
    from test_md import FailingModel

    structs = _inputs()
    kw = dict(ensemble=ensemble, temperature=400, timestep=1.0, steps=40, frame_every=5, checkpoint_every=10,
              max_atoms=20, progress=False, monitors=False)
    if ensemble == "npt_mtk":
        kw["pressure"] = 1.0
    morse = MorsePotential(**MORSE)
    ref = gs.run_md(structs, morse, trajectory=tmp_path / "ref.h5", **kw)
    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError, match="injected"):
        gs.run_md(structs, FailingModel(morse, 37), trajectory=path, **kw)
    out = gs.run_md(structs, FailingModel(morse), trajectory=path, restart=True, **kw)
    for a, b in zip(ref, out, strict=True):
        assert a.n_steps == b.n_steps == 40
        np.testing.assert_array_equal(a.final.positions, b.final.positions)
        np.testing.assert_array_equal(a.final.cell[:], b.final.cell[:])
        np.testing.assert_array_equal(a.final.get_momenta(), b.final.get_momenta())


def test_bussi_runs_batched_and_targets_the_temperature():
    a = bulk("Cu", "fcc", 3.61) * (3, 3, 3)
    res = gs.run_md([a, a.copy()], MorsePotential(**MORSE), ensemble="nvt_bussi", temperature=[300, 600],
                    timestep=2.0, steps=300, progress=False, seed=1)
    assert [r.status for r in res] == ["done", "done"]
    assert res[0].temperature < res[1].temperature
