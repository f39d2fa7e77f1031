"""Geodite model: conformance with the reference implementation, stage by stage, and physics checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from conftest import DATA, reference_atoms, tiny_geodite

import geodite_sim as gs
from geodite_sim.batch import Batch
from geodite_sim.model.geodite import Edges
from geodite_sim.model.radial import polynomial_cutoff, spherical_harmonics_l12

TOL_FP64 = {"energy": 1e-8, "forces": 1e-7, "stress": 1e-9}
TOL_FP32 = {"energy": 1e-4, "forces": 1e-4, "stress": 1e-6}


def _check(out: dict, k: int, a: int, b: int, ref: dict, tol: dict) -> None:
    assert abs(float(out["energy"][k]) - ref["energy"]) <= tol["energy"]
    assert np.abs(out["forces"][a:b].numpy() - np.array(ref["forces"])).max() <= tol["forces"]
    assert np.abs(out["stress"][k].numpy() - np.array(ref["stress_3x3"])).max() <= tol["stress"]


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_reference_outputs_one_by_one(precision, reference_outputs, reference_model_fp64, reference_model_fp32):
    model = reference_model_fp64 if precision == "fp64" else reference_model_fp32
    tol = TOL_FP64 if precision == "fp64" else TOL_FP32
    for _name, entry in reference_outputs.items():
        batch = Batch.from_atoms([reference_atoms(entry)], dtype=model.dtype)
        out = model(batch)
        _check(out, 0, 0, batch.n_atoms, entry[precision], tol)


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_reference_outputs_all_in_one_batch(precision, reference_outputs, reference_model_fp64, reference_model_fp32):
    model = reference_model_fp64 if precision == "fp64" else reference_model_fp32
    tol = TOL_FP64 if precision == "fp64" else TOL_FP32
    entries = list(reference_outputs.values())
    batch = Batch.from_atoms([reference_atoms(e) for e in entries], dtype=model.dtype)
    out = model(batch)
    offs = batch.offsets.tolist()
    for k, entry in enumerate(entries):
        _check(out, k, offs[k], offs[k + 1], entry[precision], tol)


def test_parameter_count_geodite_mp(reference_model_fp64):
    assert reference_model_fp64.n_parameters() == 3_623_112


def test_intermediates_stage_by_stage(reference_model_fp64):
    """Feed the reference's own edges; compare every stage (real and vacuum nodes)."""
    ref = torch.load(DATA / "intermediates_NaCl_fp64.pt", weights_only=True)
    m = reference_model_fp64
    enc = m.encoder
    z = ref["z"]
    src, dst = ref["edge_index"][0], ref["edge_index"][1]
    vec = ref["edge_vec"]
    dist = torch.linalg.vector_norm(vec, dim=-1)
    torch.testing.assert_close(dist, ref["edge_distance"], rtol=0, atol=1e-12)
    torch.testing.assert_close(enc.radial_basis(dist), ref["bessel_raw"], rtol=0, atol=1e-12)
    u = polynomial_cutoff(dist, m.cutoff)
    torch.testing.assert_close(u, ref["poly_cutoff_u"].squeeze(-1), rtol=0, atol=1e-12)
    y = enc.distance_weighting_fn(dist, z[dst], z[src])
    torch.testing.assert_close(y, ref["attenuation_y"], rtol=0, atol=1e-12)
    Y = spherical_harmonics_l12(vec / dist.unsqueeze(-1))
    torch.testing.assert_close(Y, ref["sphere_out_rl"], rtol=0, atol=1e-12)

    # The reference appends one vacuum node per unique Z (no edges) after the real atoms.
    z_all = torch.cat([z, torch.unique(z, sorted=True)])
    phi = enc.radial_features(dist, z[dst], z[src])
    h = enc.node_init(enc.A_na(z_all), z_all, phi, src, dst)
    torch.testing.assert_close(h, ref["node_init_out_h0"], rtol=0, atol=1e-10)
    t = enc.edge_init(h, phi, src, dst)
    torch.testing.assert_close(t, ref["edge_init_out_t0"], rtol=0, atol=1e-10)
    X = h.new_zeros(h.shape[0], 8, h.shape[1])
    for k, (inter, ec) in enumerate(zip(enc.interaction_list, enc.ec_list)):
        h, X, t = inter(h, X, t, Y, phi, src, dst)
        rh, rX, rt = ref[f"interaction{k}_out_h_X_t"]
        torch.testing.assert_close(h, rh.squeeze(1), rtol=0, atol=1e-9)
        torch.testing.assert_close(X, rX, rtol=0, atol=1e-9)
        torch.testing.assert_close(t, rt, rtol=0, atol=1e-9)
        h, X = ec(h, X)
        rh, rX = ref[f"ec{k}_out_h_X"]
        torch.testing.assert_close(h, rh.squeeze(1), rtol=0, atol=1e-9)
        torch.testing.assert_close(X, rX, rtol=0, atol=1e-9)

    # Energy head: vacuum-subtracted readout and ZBL per atom, then totals.
    edges = Edges(src, dst, torch.zeros(src.shape[0], 3))
    vac = m.vacuum_features(z)
    hs_real = torch.stack([ref[f"ec{k}_out_h_X"][0].squeeze(1)[: z.shape[0]] for k in range(4)], dim=1)
    emb = (hs_real - vac).permute(0, 2, 1).unsqueeze(2)  # [N, C, 1, L] as in the reference
    torch.testing.assert_close(emb, ref["embedding_0"], rtol=0, atol=1e-9)
    e_res = m.decoder.readout(list((hs_real - vac).unbind(1)))
    torch.testing.assert_close(e_res, ref["node_e_res"], rtol=0, atol=1e-9)
    v_zbl = m.decoder.repulsion_term(z, dist, src, dst)
    torch.testing.assert_close(v_zbl, ref["node_e_zbl"], rtol=0, atol=1e-10)
    e_atoms = m.atomic_energies(z, vec, edges)
    torch.testing.assert_close(e_atoms.sum().reshape(1), ref["total_energy"], rtol=0, atol=1e-8)


def test_float32_and_float64_agree(reference_outputs, reference_model_fp64, reference_model_fp32):
    atoms = [reference_atoms(e) for e in reference_outputs.values()]
    e64 = [r["energy"] for r in gs.evaluate(atoms, reference_model_fp64)]
    e32 = [r["energy"] for r in gs.evaluate(atoms, reference_model_fp32)]
    np.testing.assert_allclose(e32, e64, atol=2e-4)


# ---------------------------------------------------------------- physics
def _energy(model, atoms: Atoms) -> float:
    return gs.evaluate([atoms], model)[0]["energy"]


@pytest.mark.parametrize("which", ["reference", "tiny"])
def test_forces_are_finite_difference_of_energy(which, reference_model_fp64):
    model = reference_model_fp64 if which == "reference" else tiny_geodite()
    atoms = bulk("NaCl", "rocksalt", 5.0) if which == "reference" else bulk("Si", "diamond", 5.43)
    atoms.rattle(0.1, seed=3)
    f = gs.evaluate([atoms], model)[0]["forces"]
    h = 1e-5
    for i in range(len(atoms)):
        for d in range(3):
            p, m = atoms.copy(), atoms.copy()
            p.positions[i, d] += h
            m.positions[i, d] -= h
            fd = -(_energy(model, p) - _energy(model, m)) / (2 * h)
            assert abs(fd - f[i, d]) < 1e-7, (i, d, fd, f[i, d])


def test_stress_is_finite_difference_strain_derivative(reference_model_fp64):
    atoms = bulk("NaCl", "rocksalt", 5.2)
    atoms.set_cell(atoms.cell[:] @ np.array([[1.0, 0.03, 0.0], [0.0, 0.98, 0.02], [0.01, 0.0, 1.02]]), scale_atoms=True)
    atoms.rattle(0.05, seed=1)
    stress = gs.evaluate([atoms], reference_model_fp64)[0]["stress"]
    vol = atoms.get_volume()
    h = 1e-6
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = eps[b, a] = h / (1 if a == b else 2)
            vals = []
            for sign in (1, -1):
                s = atoms.copy()
                s.set_cell(atoms.cell[:] @ (np.eye(3) + sign * eps), scale_atoms=True)
                vals.append(_energy(reference_model_fp64, s))
            fd = (vals[0] - vals[1]) / (2 * h) / vol
            assert abs(fd - stress[a, b]) < 1e-8, (a, b, fd, stress[a, b])


def _random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def test_invariance_and_equivariance(reference_model_fp64):
    base = [bulk("NaCl", "rocksalt", 5.3), molecule("CH3CH2OH")]
    for atoms in base:
        atoms.rattle(0.05, seed=7)
        ref = gs.evaluate([atoms], reference_model_fp64)[0]
        rot = _random_rotation(11)
        moved = atoms.copy()
        moved.positions = atoms.positions @ rot.T + np.array([0.3, -1.1, 2.0])
        moved.set_cell(atoms.cell[:] @ rot.T, scale_atoms=False)
        out = gs.evaluate([moved], reference_model_fp64)[0]
        assert abs(out["energy"] - ref["energy"]) < 1e-9
        np.testing.assert_allclose(out["forces"], ref["forces"] @ rot.T, atol=1e-9)
        np.testing.assert_allclose(out["stress"], rot @ ref["stress"] @ rot.T, atol=1e-10)
        perm = np.random.default_rng(0).permutation(len(atoms))
        shuffled = atoms[perm]
        out = gs.evaluate([shuffled], reference_model_fp64)[0]
        assert abs(out["energy"] - ref["energy"]) < 1e-9
        np.testing.assert_allclose(out["forces"], ref["forces"][perm], atol=1e-9)


def test_isolated_atom_returns_exactly_e0(reference_model_fp64):
    e0 = reference_model_fp64.decoder.e0
    symbols = ["H", "Li", "O", "Fe", "Cu", "I"]
    atoms = [Atoms(s, positions=[[0.0, 0.0, 0.0]]) for s in symbols]
    # Also an atom far from a molecule inside the same system, and inside a batch.
    far = molecule("H2O")
    far += Atoms("Fe", positions=[[20.0, 0.0, 0.0]])
    out = gs.evaluate(atoms + [far], reference_model_fp64, per_atom_energies=True)
    for s, a, r in zip(symbols, atoms, out):
        assert r["energy"] == float(e0[a.numbers[0]]), s
        assert np.all(r["forces"] == 0.0)
    assert out[-1]["energies"][-1] == float(e0[26])


def test_supercell_extensivity(reference_model_fp64):
    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    atoms.rattle(0.02, seed=2)
    e1 = _energy(reference_model_fp64, atoms)
    e8 = _energy(reference_model_fp64, atoms * (2, 2, 2))
    assert abs(e8 - 8 * e1) < 1e-8 * len(atoms) * 8


def test_slab_pbc_per_axis_matches_vacuum_padded_bulk(reference_model_fp64):
    slab = bulk("Cu", "fcc", 3.6, cubic=True) * (1, 1, 2)
    slab.rattle(0.05, seed=4)
    slab.cell[2, 2] = 40.0
    slab.pbc = [True, True, False]
    padded = slab.copy()
    padded.pbc = True
    a, b = gs.evaluate([slab, padded], reference_model_fp64)
    assert abs(a["energy"] - b["energy"]) < 1e-10
    np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-10)
    assert np.all(a["stress"] == 0.0)


def test_vacuum_cache_equals_live_computation(reference_model_fp64):
    z = torch.tensor([1, 3, 8, 26, 26, 53])
    cached = reference_model_fp64.vacuum_features(z)
    live = reference_model_fp64._compute_vacuum(torch.unique(z))[torch.unique(z, return_inverse=True)[1]]
    torch.testing.assert_close(cached, live, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- torch-sim
def test_torch_sim_static_and_optimize_match_evaluate(reference_model_fp64):
    import torch_sim as ts

    model = tiny_geodite()
    tsm = gs.TorchSimModel(model)
    structs = [bulk("Si", "diamond", 5.43), bulk("NaCl", "rocksalt", 5.6) * (2, 1, 1)]
    for s in structs:
        s.rattle(0.05, seed=5)
    static = ts.static(system=structs, model=tsm)
    ours = gs.evaluate(structs, model)
    for st, r in zip(static, ours):
        assert abs(float(st["potential_energy"][0]) - r["energy"]) < 1e-10
        np.testing.assert_allclose(st["forces"].numpy(), r["forces"], atol=1e-10)
        np.testing.assert_allclose(st["stress"][0].numpy(), r["stress"], atol=1e-10)
    final = ts.optimize(system=structs, model=tsm, optimizer=ts.Optimizer.fire, max_steps=5)
    final_atoms = final.to_atoms()
    again = gs.evaluate(final_atoms, model)
    np.testing.assert_allclose(final.energy.numpy(), [r["energy"] for r in again], atol=1e-10)


def test_torch_sim_validate_model_outputs():
    from torch_sim.models.interface import validate_model_outputs

    validate_model_outputs(gs.TorchSimModel(tiny_geodite()), torch.device("cpu"), torch.float64)


def test_ase_calculator_matches_evaluate(reference_model_fp64):
    atoms = bulk("NaCl", "rocksalt", 5.4)
    atoms.rattle(0.05, seed=9)
    ref = gs.evaluate([atoms], reference_model_fp64)[0]
    atoms.calc = gs.GeoditeCalculator(reference_model_fp64)
    assert abs(atoms.get_potential_energy() - ref["energy"]) < 1e-12
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"], atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), ref["stress"], atol=1e-12)


def test_pymatgen_input(reference_model_fp64):
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = bulk("NaCl", "rocksalt", 5.4)
    structure = AseAtomsAdaptor.get_structure(atoms)
    a, b = gs.evaluate([atoms, structure], reference_model_fp64)
    assert abs(a["energy"] - b["energy"]) < 1e-10
