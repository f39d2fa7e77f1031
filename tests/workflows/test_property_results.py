"""Property workflow results (issue 27, item 8): failures name the user's input, thermal properties without the
three Γ acoustic modes, elastic tensors in the IEEE setting with Born tests on it, NaN moduli (and a warning) for an
unstable tensor, numpy arrays in results. Float64; references by hand or from an independently built cell."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from ase.build import bulk
from conftest import tiny_geodite
from geodite_sim.workflows.properties import run_elastic, run_eos, run_phonons
from geodite_sim.workflows.properties.phonons import make_phonopy, phonopy_to_ase

from geodite_sim.pair_potential import MorsePotential

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def cu_morse():
    return MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)


class NaNForAu(MorsePotential):
    """Morse, with non-finite energies for every system holding gold (its relaxation fails, the others run)."""

    def forward(self, batch, edges=None, **kw):
        out = super().forward(batch, edges=edges, **kw)
        has_au = torch.zeros(out["energy"].shape[0], dtype=torch.bool)
        n = batch.n_atoms
        has_au.index_fill_(0, batch.system_index[:n][batch.numbers[:n] == 79], True)
        out["energy"] = torch.where(has_au, torch.nan, out["energy"])
        return out


def test_relaxation_failure_names_the_input(tmp_path):
    """Input 2 (Au) fails its relaxation after input 0 failed admission: its message says ``2:Au``, not ``1:Au``
    (labels counted only the survivors)."""
    model = NaNForAu(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)
    res = run_eos([str(tmp_path / "missing.cif"), bulk("Cu", "fcc", 3.61), bulk("Au", "fcc", 4.08)], model,
                  relax=True, relax_ions=False, max_steps=20)
    assert [r.status for r in res] == ["failed", "done", "failed"]
    assert "missing.cif" in res[0].error
    assert res[2].error.startswith("relaxation failed: 2:Au:"), res[2].error


def _entropy_by_hand(ph, temperature: float) -> float:
    """S (J/K/mol of the cell) from the mesh, quantum harmonic oscillators, the three Γ acoustic modes left out
    (phonopy's physical constants, so that CODATA editions do not differ)."""
    from phonopy.physical_units import get_physical_units

    units = get_physical_units()
    freqs = np.array(ph.mesh.frequencies, dtype=float)  # [q, band] THz
    weights = np.array(ph.mesh.weights, dtype=float)
    gamma = int(np.flatnonzero(np.all(np.abs(ph.mesh.qpoints) < 1e-12, axis=1))[0])
    keep = np.ones_like(freqs, dtype=bool)
    keep[gamma, np.argsort(np.abs(freqs[gamma]))[:3]] = False
    x = freqs * units.THzToEv / (units.KB * temperature)
    ok = keep & (freqs > 0)
    s = np.where(ok, x / np.expm1(np.where(ok, x, 1.0)) - np.log(-np.expm1(-np.where(ok, x, 1.0))), 0.0)
    r_gas = units.KB * units.EvTokJmol * 1000.0  # J/K/mol
    return float(r_gas * (s * weights[:, None]).sum() / weights.sum())


def test_thermal_properties_without_gamma_acoustic_modes(cu_morse):
    """Forces that differ by round-off (1e-10 eV/Å) flip the signs of the ~0 Γ acoustic frequencies; the entropy
    must not notice (it moved by ~0.1 J/K/mol when they entered the sums) and equals the sum by hand."""
    from geodite_sim.workflows.properties.common import Material
    from geodite_sim.workflows.properties.phonons import PhononResult, _postprocess

    atoms = bulk("Cu", "fcc", 3.40)
    calc = cu_morse.ase_calculator()
    base = []
    ph0 = make_phonopy(atoms, np.diag([2, 2, 2]), 0.01)
    for sc in ph0.supercells_with_displacements:
        a = phonopy_to_ase(sc)
        a.calc = calc
        base.append(a.get_forces())
    entropies = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        forces = [f + 1e-10 * rng.standard_normal(f.shape) for f in base]
        res = PhononResult(index=0, label="Cu")
        ph = make_phonopy(atoms, np.diag([2, 2, 2]), 0.01)
        _postprocess(res, Material(0, "Cu", atoms), ph, forces, (6, 6, 6), 300.0, 0.1)
        assert res.entropy_J_per_K_mol == pytest.approx(_entropy_by_hand(ph, 300.0), abs=1e-8)
        entropies.append(res.entropy_J_per_K_mol)
    assert max(entropies) - min(entropies) < 1e-6


def test_phonopy_warnings_are_shown_not_filtered(cu_morse):
    """A warning phonopy raises reaches the caller and the result (it was filtered with every UserWarning)."""
    from phonopy.phonon import thermal_properties as tp

    warned = []
    original = tp.ThermalProperties.run

    def run_and_warn(self, *a, **k):
        warnings.warn("phonopy says something", UserWarning, stacklevel=1)
        return original(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tp.ThermalProperties, "run", run_and_warn)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = run_phonons([bulk("Cu", "fcc", 3.40)], cu_morse, supercell=(2, 2, 2), relax=False, mesh=(4, 4, 4),
                            plots=False)[0]
        warned = [str(w.message) for w in caught]
    assert r.status == "done"
    assert "phonopy says something" in warned
    assert "phonopy: phonopy says something" in r.warnings


def _rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_elastic_tensor_in_ieee_setting():
    """A primitive rock-salt cell in an arbitrary orientation gives the tensor of the axis-aligned cubic cell:
    cubic form (C14 = 0, ...), same numbers, cubic Born criteria on it (was: the input's Cartesian frame)."""
    model = tiny_geodite(torch.float64)
    ref_atoms = bulk("MgO", "rocksalt", 4.21, cubic=True)  # x, y, z along the cubic axes: the IEEE frame
    prim = bulk("MgO", "rocksalt", 4.21)
    rot = _rotation(3)
    prim.set_cell(prim.cell[:] @ rot.T, scale_atoms=True)  # the same crystal, rotated
    ref, r = run_elastic([ref_atoms, prim], model, strain=1e-3, relax=False, relax_ions=False)  # ~linear
    assert ref.status == r.status == "done"
    c, c_ref = r.C_GPa, ref.C_GPa
    assert isinstance(c, np.ndarray) and c.shape == (6, 6)
    np.testing.assert_allclose(c, c_ref, rtol=0, atol=1e-3 * np.abs(c_ref).max())
    assert np.abs(c[:3, 3:]).max() < 1e-3 * c[0, 0]  # C14 and friends vanish in the cubic axes
    np.testing.assert_allclose(r.ieee_rotation @ r.ieee_rotation.T, np.eye(3), atol=1e-8)
    assert r.cubic_born is not None and r.cubic_born == ref.cubic_born


def test_born_unstable_tensor_has_nan_moduli_and_a_warning(cu_morse):
    """bcc copper with a Morse potential is Born-unstable (C11 < C12): no moduli (was: finite averages)."""
    with pytest.warns(RuntimeWarning, match="Born-unstable"):
        r = run_elastic([bulk("Cu", "bcc", 2.87)], cu_morse, relax=False, relax_ions=False)[0]
    assert r.status == "done" and r.born_stable is False
    assert r.eigenvalues_GPa.min() < 0
    for key in ("bulk_voigt_GPa", "bulk_reuss_GPa", "bulk_hill_GPa", "shear_voigt_GPa", "shear_reuss_GPa",
                "shear_hill_GPa"):
        assert math.isnan(getattr(r, key)), key
    assert any("Born-unstable" in w for w in r.warnings)


def test_results_hold_numpy_arrays(cu_morse, tmp_path):
    eos = run_eos([bulk("Cu", "fcc", 3.40)], cu_morse, relax=False, relax_ions=False, out_dir=tmp_path)[0]
    assert all(isinstance(getattr(eos, k), np.ndarray) for k in ("volumes_A3", "energies_eV", "volume_strains"))
    ph = run_phonons([bulk("Cu", "fcc", 3.40)], cu_morse, supercell=(2, 2, 2), relax=False, mesh=(4, 4, 4),
                     plots=False)[0]
    assert isinstance(ph.gamma_frequencies_THz, np.ndarray) and ph.gamma_frequencies_THz.shape == (3,)
    el = run_elastic([bulk("Cu", "fcc", 3.40)], cu_morse, relax=False, relax_ions=False)[0]
    assert all(isinstance(getattr(el, k), np.ndarray) for k in ("C_GPa", "C_clamped_GPa", "eigenvalues_GPa",
                                                                 "residual_stress_GPa", "strains"))
    import json

    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["volumes_A3"] == pytest.approx(eos.volumes_A3.tolist())  # JSON still holds plain lists
