"""The model contract (geodite_sim.model.contract), run against every model-like object of the project.

Each model is checked for its attributes, output shapes, forces = -dE/dr and stress = (1/V) dE/dstrain
by central finite differences, batched == one by one, translation invariance and a fingerprint that is
stable and changes with a weight. Independent references: finite differences, ASE's SevenNetCalculator,
torch-sim's own ``validate_model_outputs``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from conftest import tiny_geodite

from geodite_sim.batch import Batch
from geodite_sim.model import load_model
from geodite_sim.model.contract import (
    SimModel,
    check_model,
    implemented_properties,
    model_fingerprint,
    supported_elements,
    unsupported_elements,
    unsupported_elements_message,
    unwrap,
    uses_edges,
)
from geodite_sim.pair_potential import MorsePotential

MODELS = ["tiny_geodite", "default", "morse", "sevennet", "ts_lennard_jones"]


@functools.cache
def _make(name: str):
    if name == "tiny_geodite":
        return tiny_geodite()
    if name == "default":
        return load_model(dtype=torch.float64)
    if name == "morse":
        return MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)
    if name == "sevennet":
        pytest.importorskip("sevenn")
        return load_model("sevennet-0")
    if name == "ts_lennard_jones":
        from torch_sim.models.lennard_jones import LennardJonesModel

        from geodite_sim.model import TorchSimAdapter

        lj = LennardJonesModel(sigma=1.2, epsilon=0.05, cutoff=5.0, dtype=torch.float64, compute_stress=True)
        return TorchSimAdapter(lj, name="lj")
    raise KeyError(name)


@pytest.fixture(params=MODELS)
def model(request):
    return _make(request.param)


def _fp32(model) -> bool:
    return model.dtype == torch.float32


def _structures() -> list[Atoms]:
    """Small periodic cells (one triclinic) plus a molecule, rattled; all elements known to every model."""
    rng = np.random.default_rng(3)
    si = bulk("Si", "diamond", 5.43)
    nacl = bulk("NaCl", "rocksalt", 5.64)
    cu = bulk("Cu", "fcc", 3.61) * (2, 1, 1)
    cu.set_cell(cu.cell[:] @ (np.eye(3) + 0.04 * rng.standard_normal((3, 3))), scale_atoms=True)
    mol = molecule("CH4")
    out = [si, nacl, cu, mol]
    for a in out:
        a.rattle(0.04, seed=int(rng.integers(1 << 30)))
    return out


def _batch(model, atoms_list) -> Batch:
    return Batch.from_atoms(atoms_list, dtype=model.dtype, device=model.device)


def _energy(model, atoms_list) -> np.ndarray:
    return model(_batch(model, atoms_list), compute_forces=False, compute_stress=False)["energy"].double().numpy()


# ------------------------------------------------------------------------------------------ attributes
def test_contract_attributes(model):
    check_model(model)
    assert model.cutoff > 0
    assert supported_elements(model) is None or all(isinstance(z, int) for z in supported_elements(model))
    assert set(implemented_properties(model)) == {"energy", "forces", "stress"}
    assert isinstance(uses_edges(model), bool)
    assert isinstance(model, SimModel)


def test_check_model_names_what_is_missing():
    class Half:
        cutoff = 5.0
        dtype = torch.float64

        def __call__(self, batch, edges=None, compute_forces=True, compute_stress=True):
            return {}

    with pytest.raises(TypeError, match="device.*supported_elements.*implemented_properties"):
        check_model(Half())


def test_output_shapes_and_units(model):
    atoms = _structures()
    batch = _batch(model, atoms)
    out = model(batch)
    n, s = batch.n_atoms, batch.n_systems
    assert out["energy"].shape == (s,) and out["forces"].shape[1:] == (3,) and out["stress"].shape == (s, 3, 3)
    assert out["forces"].shape[0] >= n and torch.all(out["forces"][n:] == 0)
    assert all(torch.isfinite(v[: n if k == "forces" else s]).all() for k, v in out.items())
    assert torch.all(out["stress"][3] == 0)  # the molecule: no stress
    assert not out["energy"].requires_grad and not out["forces"].requires_grad
    # the per-atom energy scale is eV-like (a few eV at most per atom, not Hartree or kJ/mol)
    assert torch.all((out["energy"] / batch.atoms_per_system.to(out["energy"].dtype)).abs() < 50)


# ------------------------------------------------------------------------------------------ physics
def test_forces_are_minus_gradient(model):
    """Central differences of the energy on every coordinate of two structures (displaced copies in one batch)."""
    h, tol = (1e-2, 5e-3) if _fp32(model) else (1e-4, 1e-6)
    for atoms in (_structures()[2], _structures()[3]):
        f = model(_batch(model, [atoms]), compute_stress=False)["forces"][: len(atoms)].double().numpy()
        copies = []
        for i in range(len(atoms)):
            for d in range(3):
                for sign in (1, -1):
                    a = atoms.copy()
                    a.positions[i, d] += sign * h
                    copies.append(a)
        e = _energy(model, copies).reshape(len(atoms), 3, 2)
        fd = -(e[..., 0] - e[..., 1]) / (2 * h)
        scale = max(1.0, np.abs(f).max())
        assert np.abs(fd - f).max() < tol * scale, (np.abs(fd - f).max(), f)


def test_stress_is_strain_derivative(model):
    """sigma = (1/V) dE/d(eps) (ASE sign) by symmetric finite strains of a triclinic cell."""
    h, tol = (1e-3, 2e-4) if _fp32(model) else (1e-5, 1e-8)
    atoms = _structures()[2]
    stress = model(_batch(model, [atoms]))["stress"][0].double().numpy()
    copies = []
    pairs = [(i, j) for i in range(3) for j in range(i, 3)]
    for i, j in pairs:
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[i, j] = eps[j, i] = sign * h / (1 if i == j else 2)
            a = atoms.copy()
            a.set_cell(a.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
            copies.append(a)
    e = _energy(model, copies).reshape(len(pairs), 2)
    vol = atoms.get_volume()
    for k, (i, j) in enumerate(pairs):
        fd = (e[k, 0] - e[k, 1]) / (2 * h) / vol
        assert abs(fd - stress[i, j]) < tol * max(1.0, np.abs(stress).max()), ((i, j), fd, stress[i, j])
    assert np.allclose(stress, stress.T, atol=1e-6 if _fp32(model) else 1e-12)


def test_batched_equals_one_by_one(model):
    atoms = _structures()
    out = model(_batch(model, atoms))
    rtol = 1e-5 if _fp32(model) else 1e-10
    start = 0
    for k, a in enumerate(atoms):
        one = model(_batch(model, [a]))
        n = len(a)
        assert torch.allclose(one["energy"][0], out["energy"][k], rtol=rtol, atol=rtol)
        assert torch.allclose(one["forces"][:n], out["forces"][start:start + n], rtol=rtol, atol=10 * rtol)
        assert torch.allclose(one["stress"][0], out["stress"][k], rtol=rtol, atol=rtol)
        start += n


def test_translation_invariance(model):
    atoms = _structures()
    moved = [a.copy() for a in atoms]
    for a in moved:
        a.positions += np.array([0.37, -1.21, 2.05])
    o1, o2 = model(_batch(model, atoms)), model(_batch(model, moved))
    tol = 2e-4 if _fp32(model) else 1e-9
    assert torch.allclose(o1["energy"], o2["energy"], atol=tol * 10)
    n = sum(len(a) for a in atoms)
    assert torch.allclose(o1["forces"][:n], o2["forces"][:n], atol=tol * 10)
    assert torch.allclose(o1["stress"], o2["stress"], atol=tol)


def test_uses_edges_declared():
    assert all(uses_edges(_make(name)) for name in ("tiny_geodite", "default", "morse"))
    assert not any(uses_edges(_make(name)) for name in ("sevennet", "ts_lennard_jones"))


@pytest.mark.parametrize("name", ["tiny_geodite", "default", "morse"])  # the padded step pads itself
def test_padded_batch_for_edge_models(name):
    """uses_edges models accept padding atoms in a padding system joined only by padding edges."""
    from geodite_sim.neighbors import neighbor_list

    model = _make(name)
    atoms = _structures()[:3]
    real = _batch(model, atoms)
    edges = neighbor_list(real, model.cutoff)
    pad_atoms = Atoms("H3", positions=np.zeros((3, 3)), cell=np.eye(3) * (model.cutoff + 1), pbc=False)
    padded = Batch.concatenate([real, _batch(model, [pad_atoms])])
    n = real.n_atoms
    k = 4
    pad_sender = torch.full((k,), n, dtype=edges.sender.dtype)
    pad_shifts = torch.zeros((k, 3), dtype=edges.shifts.dtype)
    pad_shifts[:, 0] = 1
    all_edges = type(edges)(torch.cat([edges.sender, pad_sender]), torch.cat([edges.receiver, pad_sender]),
                            torch.cat([edges.shifts, pad_shifts]))
    ref = model(real, edges=edges)
    out = model(padded, edges=all_edges)
    assert torch.allclose(out["energy"][:3], ref["energy"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(out["forces"][:n], ref["forces"][:n], rtol=1e-12, atol=1e-12)
    assert torch.allclose(out["stress"][:3], ref["stress"], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ identity
def test_fingerprint_stable_and_changes_with_a_weight(model):
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model) and len(fp) == 16
    from geodite_sim.model.contract import _identity_holder

    holder = _identity_holder(model)
    tensors = [t for t in holder.state_dict().values() if t.is_floating_point() and t.numel() > 1] \
        if isinstance(holder, torch.nn.Module) else []
    if tensors:
        t = tensors[len(tensors) // 2]
        saved = t.clone()
        with torch.no_grad():
            t.view(-1)[0] += 1e-3
        try:
            assert model_fingerprint(model) != fp
        finally:
            with torch.no_grad():
                t.copy_(saved)
        assert model_fingerprint(model) == fp  # same bytes again: same identity
    else:  # parameter-only models (Morse, torch-sim's LJ): a changed parameter is a new model
        inner = unwrap(model)
        saved = inner.epsilon
        inner.epsilon = saved * 1.01
        try:
            assert model_fingerprint(model) != fp
        finally:
            inner.epsilon = saved
        assert model_fingerprint(model) == fp


def test_fingerprint_same_for_same_weights_and_wrappers():
    from geodite_sim.calculators import TorchSimModel

    a, b = load_model(), load_model()
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(TorchSimModel(a))
    assert model_fingerprint(load_model(dtype=torch.float64)) != model_fingerprint(a)
    assert model_fingerprint(tiny_geodite(seed=0)) != model_fingerprint(tiny_geodite(seed=1))
    a.neighbor_backend = "ase"  # engine settings and names are not identity
    a.name = "renamed"
    assert model_fingerprint(a) == model_fingerprint(b)
    a.decoder.e_shift = 0.5  # but the energy head's constants are
    assert model_fingerprint(a) != model_fingerprint(b)


# ------------------------------------------------------------------------------------------ torch-sim
@pytest.mark.parametrize("name", ["tiny_geodite", "default", "morse"])
def test_torchsim_validate_model_outputs(name):
    from torch_sim.models.interface import validate_model_outputs

    from geodite_sim.calculators import TorchSimModel

    model = _make(name)
    validate_model_outputs(TorchSimModel(model), model.device, model.dtype)


def test_sevennet_adapter_matches_ase_calculator():
    pytest.importorskip("sevenn")
    from sevenn.calculator import SevenNetCalculator

    model = _make("sevennet")
    assert len(supported_elements(model)) == 89 and model.cutoff == 5.0 and not uses_edges(model)
    atoms = _structures()
    out = model(_batch(model, atoms))
    calc = SevenNetCalculator("7net-0", device="cpu")
    start = 0
    for k, a in enumerate(atoms):
        a = a.copy()
        a.calc = calc
        n = len(a)
        e = a.get_potential_energy()
        assert abs(e - float(out["energy"][k])) < 2e-6 * max(1.0, abs(e))
        assert np.abs(a.get_forces() - out["forces"][start:start + n].double().numpy()).max() < 2e-5
        if a.pbc.all():
            assert np.abs(a.get_stress(voigt=False) - out["stress"][k].double().numpy()).max() < 1e-6
        start += n
    # and the same model through this package's ASE calculator
    from geodite_sim.calculators import GeoditeCalculator

    a = atoms[1].copy()
    a.calc = GeoditeCalculator(model)
    assert a.get_potential_energy() == pytest.approx(float(out["energy"][1]), abs=1e-5)


def test_sevennet_float64_engine_wraps_float32_network():
    pytest.importorskip("sevenn")
    m64 = load_model("sevennet-0", dtype=torch.float64)
    m32 = _make("sevennet")
    assert m64.dtype == torch.float64
    atoms = _structures()[:2]
    e64 = m64(_batch(m64, atoms))["energy"]
    e32 = m32(_batch(m32, atoms))["energy"]
    assert e64.dtype == torch.float64 and torch.allclose(e64.float(), e32, rtol=1e-6)
    assert model_fingerprint(m64) != model_fingerprint(m32)


# ------------------------------------------------------------------------------------------ elements
def test_supported_elements_of_the_packaged_models():
    from ase.data import atomic_numbers

    # geodite-mini's recipe (the CHGNet-distillation scripts, deleted; in history at 7fe2bc9:
    # workflows/distill/prototypes.py ELEMENTS) trained these 35 elements
    ELEMENTS = ("Li Na K Cs Cu Ag B N O F S Cl Br I P Ge Sn Sb Ga La Ti Nb Bi Pb H C Si Al Mg Ca Zn Fe Ni Co "
                "Mn").split()
    assert len(ELEMENTS) == 35

    default = load_model()
    assert supported_elements(default) == frozenset(atomic_numbers[e] for e in ELEMENTS)
    assert unsupported_elements(default, [42, 26, 43, 26]) == [42, 43]  # Mo, Tc; Fe is known
    msg = unsupported_elements_message(default, [42, 26])
    assert "Mo" in msg and "geodite-mini" in msg and "Fe" not in msg
    assert unsupported_elements_message(default, [26, 8]) is None
    ref = load_model("geodite-reference-random")  # official format: its E0 table (the 89 MPtrj elements)
    assert len(supported_elements(ref)) == 89 and 84 not in supported_elements(ref)
    tiny = tiny_geodite()  # no declared set: its E0 table, non-zero for every Z < max_z
    assert supported_elements(tiny) == frozenset(range(1, 100)) and unsupported_elements(tiny, [42]) == []
    with torch.no_grad():
        tiny.decoder.e0[42] = 0.0  # the table is read live (keyed on the tensor's version)
    assert unsupported_elements(tiny, [42]) == [42]
    tiny.supported_elements = {26, 8}  # a declared set wins
    assert unsupported_elements(tiny, [8, 42, 26, 1]) == [1, 42]
    from geodite_sim.model import Geodite, GeoditeConfig

    assert supported_elements(Geodite(GeoditeConfig(hidden_channels=8, num_layers=1, num_heads=1))) is None
    assert supported_elements(_make("morse")) is None


def test_supported_elements_survive_save_and_training(tmp_path):
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    from geodite_sim.model.checkpoint import load_checkpoint, save_checkpoint
    from geodite_sim.training import Trainer, get_preset, sample_from_atoms

    model = tiny_geodite(dtype=torch.float32)
    model.supported_elements = frozenset({13, 29})
    save_checkpoint(model, tmp_path / "m.ckpt")
    assert load_checkpoint(tmp_path / "m.ckpt").supported_elements == frozenset({13, 29})
    samples = []
    for el in ("Cu", "Ni"):
        a = bulk(el, "fcc", 3.6)
        a.rattle(0.02, seed=1)
        a.calc = EMT()
        a.calc = SinglePointCalculator(a, energy=a.get_potential_energy(), forces=a.get_forces(),
                                       stress=a.get_stress())
        samples.append(sample_from_atoms(a))
    model_cfg, train_cfg = get_preset("tiny", train_overrides={"log_every": 0, "epochs": 1})
    tr = Trainer(samples, model_cfg, train_cfg, workdir=tmp_path / "run", val_samples=[], log=lambda m: None)
    tr.export(tmp_path / "trained.ckpt")
    assert load_model(tmp_path / "trained.ckpt").supported_elements == frozenset({28, 29})
    tr2 = Trainer(samples, config=train_cfg, workdir=tmp_path / "ft", init=tmp_path / "m.ckpt", val_samples=[],
                  log=lambda m: None)  # fine-tuning keeps the initial model's elements
    assert tr2.model.supported_elements == frozenset({13, 28, 29})
