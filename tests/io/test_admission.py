"""Admission checks (geodite_sim.io.admission): every bad input gets a status and a message naming it."""

from __future__ import annotations

import itertools
import os
import re

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.data import covalent_radii

from geodite_sim.io.admission import admit, closest_pair, input_label, model_elements, safe_formula
from geodite_sim.io.structures import StructureError, iter_inputs, validate_atoms
from geodite_sim.status import Status


def _brute_force_min_ratio(atoms: Atoms, factor: float, reps: int = 2) -> float:
    """min over pairs (images within ``reps`` cells) of d / (factor (r_i + r_j)), by enumeration."""
    pos, z, cell = atoms.positions, atoms.numbers, atoms.cell[:]
    ranges = [range(-reps, reps + 1) if p else range(1) for p in atoms.pbc]
    best = np.inf
    for shift in itertools.product(*ranges):
        t = np.asarray(shift) @ cell
        for i in range(len(atoms)):
            for j in range(len(atoms)):
                if i == j and not any(shift):
                    continue
                d = np.linalg.norm(pos[j] + t - pos[i])
                best = min(best, d / (factor * (covalent_radii[z[i]] + covalent_radii[z[j]])))
    return best


def test_good_structures_are_admitted():
    for atoms in (bulk("Si", "diamond", 5.43), bulk("NaCl", "rocksalt", 5.64), molecule("H2O"),
                  fcc111("Cu", (2, 2, 3), vacuum=6.0)):
        adm = admit(atoms, index=0)
        assert adm.ok and adm.status is None and adm.message is None and adm.warnings == []
        assert adm.atoms is not atoms and len(adm.atoms) == len(atoms)  # a copy


@pytest.mark.parametrize("z", [0, -1, 119, 200])
def test_unknown_atomic_numbers_never_crash(z):
    atoms = Atoms(numbers=[z, 14], positions=[[0, 0, 0], [2, 2, 2]], cell=[5, 5, 5], pbc=True)
    adm = admit(atoms, index=7)
    formula = f"[Z={z}]Si" if z < 14 else f"Si[Z={z}]"  # elements in order of Z
    assert adm.status is Status.UNSUPPORTED_ELEMENT
    assert adm.message == f"7:{formula}: unknown element Z={z} (atomic numbers run 1-118)"
    item = next(iter_inputs([atoms]))  # the stream's label construction used to raise IndexError here
    assert item.atoms is None and item.status is Status.UNSUPPORTED_ELEMENT and item.label == f"0:{formula}"
    with pytest.raises(StructureError, match=f"unknown element Z={z}") as info:
        validate_atoms(atoms)
    assert info.value.status is Status.UNSUPPORTED_ELEMENT


def test_safe_formula_and_labels():
    assert safe_formula(Atoms()) == "empty"
    assert safe_formula(Atoms(numbers=[119, 119, 8])) == "O[Z=119]2"
    assert safe_formula(bulk("NaCl", "rocksalt", 5.6)) == "ClNa"  # ASE's own when all elements are known
    assert input_label("dir/a.cif") == "dir/a.cif"
    assert input_label(5, None, 3) == "3:int"
    assert input_label(bulk("Cu"), None, 2) == "2:Cu"


def test_supported_elements_reject_or_warn():
    atoms = bulk("NaCl", "rocksalt", 5.64)
    adm = admit(atoms, supported_elements={11, 17}, index=0)
    assert adm.ok
    adm = admit(atoms, supported_elements={"Na"}, model_name="mini", index=0)
    assert adm.status is Status.UNSUPPORTED_ELEMENT
    assert adm.message == "0:ClNa: unsupported element Cl: not supported by model 'mini'"
    adm = admit(atoms, supported_elements={"Na"}, model_name="mini", allow_unsupported_elements=True, index=0)
    assert adm.ok and len(adm.warnings) == 1
    assert "unsupported element Cl: not supported by model 'mini'" in adm.warnings[0]


def test_model_elements():
    from conftest import tiny_geodite

    from geodite_sim.pair_potential import MorsePotential

    tiny = tiny_geodite()
    allowed, name = model_elements(tiny)
    assert allowed == set(range(1, tiny.config.max_z)) and name == "Geodite"
    tiny.supported_elements = frozenset({1, 8})
    assert model_elements(tiny)[0] == {1, 8}
    assert model_elements(MorsePotential())[0] is None
    assert model_elements(None) == (None, None)


@pytest.mark.parametrize("what,value,pattern", [
    ("positions", np.nan, r"positions contain NaN or Inf \(atom 1\)"),
    ("positions", np.inf, r"positions contain NaN or Inf \(atom 1\)"),
    ("cell", np.nan, "cell contains NaN or Inf"),
    ("momenta", np.nan, r"momenta contain NaN or Inf \(atom 1\)"),
    ("momenta", -np.inf, r"momenta contain NaN or Inf \(atom 1\)"),
])
def test_non_finite(what, value, pattern):
    atoms = bulk("Si", "diamond", 5.43)
    if what == "positions":
        atoms.positions[1, 2] = value
    elif what == "cell":
        cell = atoms.cell[:].copy()
        cell[2, 2] = value
        atoms.set_cell(cell)
    else:
        mom = np.zeros((2, 3))
        mom[1, 0] = value
        atoms.set_momenta(mom)
    adm = admit(atoms, index=4)
    assert adm.status is Status.INVALID_STRUCTURE and adm.message.startswith("4:Si2: ")
    assert re.search(pattern, adm.message)
    if what == "momenta":
        assert admit(atoms, require_momenta_finite=False).ok


def test_singular_cells_per_axis_pbc():
    flat = Atoms("Cu", cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]], pbc=True)
    adm = admit(flat, index=0)
    assert adm.status is Status.INVALID_STRUCTURE and "cell volume is zero" in adm.message
    # a slab: only the two periodic vectors must be independent; a zero c vector is fine
    slab = Atoms("Cu", cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=[True, True, False])
    assert admit(slab).ok
    bad_slab = Atoms("Cu", cell=[[3, 0, 0], [6, 0, 0], [0, 0, 10]], pbc=[True, True, False])
    adm = admit(bad_slab, index=0)
    assert adm.status is Status.INVALID_STRUCTURE and "periodic lattice vectors a, b are not independent" in adm.message
    wire = Atoms("Cu", cell=[[0, 0, 0], [0, 0, 0], [0, 0, 2.5]], pbc=[False, False, True])
    assert admit(wire).ok
    zero = Atoms("Cu", cell=[[0, 0, 0], [0, 0, 0], [0, 0, 0]], pbc=[False, False, True])
    assert "has zero length" in admit(zero).message
    assert admit(molecule("CH4")).ok  # no periodic axis: no cell needed


def test_close_atoms_message_and_threshold():
    for d, rejected in ((0.0, True), (0.1, True), (1.3, True), (1.33, False)):
        atoms = Atoms("Cu2", positions=[[1, 1, 1], [1, 1, 1 + d]], cell=[8, 8, 8], pbc=True)
        adm = admit(atoms, index=2)
        assert (adm.status is Status.ATOMS_TOO_CLOSE) == rejected, d
        if rejected:
            t = 0.5 * 2 * covalent_radii[29]
            assert adm.message == (f"2:Cu2: atoms too close: atoms 0 (Cu) and 1 (Cu) are {d:.3f} Å apart, "
                                   f"closer than 0.5 x the sum of their covalent radii ({t:.3f} Å)")
    atoms = Atoms("Cu2", positions=[[1, 1, 1], [1, 1, 1.1]], cell=[8, 8, 8], pbc=True)
    assert admit(atoms, min_distance_factor=None).ok
    assert admit(atoms, min_distance_factor=0.03).ok  # threshold 0.079 Å < 0.1 Å


def test_close_atoms_across_the_boundary_and_own_image():
    across = Atoms("Cu2", positions=[[0.05, 1, 1], [7.95, 1, 1]], cell=[8, 8, 8], pbc=True)
    adm = admit(across, index=0)
    assert adm.status is Status.ATOMS_TOO_CLOSE and "are 0.100 Å apart" in adm.message
    across.pbc = False  # without periodicity they are 7.9 Å apart
    assert admit(across).ok
    tiny_cell = Atoms("Cu", cell=[0.5, 5, 5], pbc=True)
    adm = admit(tiny_cell, index=0)
    assert adm.status is Status.ATOMS_TOO_CLOSE
    assert "atom 0 (Cu) and its periodic image are 0.500 Å apart" in adm.message


@pytest.mark.parametrize("max_work", [100_000, 0])  # the numpy enumeration and ASE's cell list
def test_closest_pair_matches_brute_force(max_work):
    rng = np.random.default_rng(3)
    for trial in range(12):
        n = int(rng.integers(2, 7))
        cell = np.diag(rng.uniform(2.5, 5.0, 3)) + rng.uniform(-0.6, 0.6, (3, 3))
        pbc = rng.integers(0, 2, 3).astype(bool) if trial % 3 else np.ones(3, bool)
        atoms = Atoms(numbers=rng.choice([1, 8, 14, 29], n), cell=cell, pbc=pbc,
                      scaled_positions=rng.uniform(-0.5, 1.5, (n, 3)))  # not wrapped into the cell
        factor = 0.8
        ratio = _brute_force_min_ratio(atoms, factor, reps=3)
        pair = closest_pair(atoms, factor, max_work=max_work)
        if ratio < 1 - 1e-9:
            assert pair is not None
            _, _, d, t = pair
            assert d / t == pytest.approx(ratio, rel=1e-9)
        else:
            assert pair is None


def test_files(tmp_path):
    good = tmp_path / "Si.extxyz"
    bulk("Si", "diamond", 5.43).write(good)
    empty = tmp_path / "empty.cif"
    empty.write_text("")
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("data_x\n_cell_length_a nonsense\n")
    cases = {
        str(good): None,
        str(tmp_path / "missing.cif"): "file not found",
        str(empty): "file is empty",
        str(garbage): "could not read the file",
        str(tmp_path): "is a directory",
    }
    for path, expected in cases.items():
        adm = admit(path)
        if expected is None:
            assert adm.ok and adm.label == path
        else:
            assert adm.status is Status.UNREADABLE and adm.message.startswith(f"{path}: ") and expected in adm.message
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.extxyz"
        bulk("Si", "diamond", 5.43).write(locked)
        locked.chmod(0)
        assert "permission denied" in admit(str(locked)).message


def test_wrong_types_and_empty():
    for obj in (5, {"a": 1}, None, np.zeros((2, 3))):
        adm = admit(obj, index=1)
        assert adm.status is Status.UNREADABLE and "unsupported input type" in adm.message
    adm = admit(Atoms(), index=0)
    assert adm.status is Status.INVALID_STRUCTURE and adm.message == "0:empty: empty structure (0 atoms)"


def test_iter_inputs_keeps_order_and_count():
    items = list(iter_inputs([bulk("Cu"), 5, Atoms(numbers=[119], positions=[[0, 0, 0]]), "/no/such.cif",
                              bulk("Si", "diamond", 5.43)]))
    assert [it.index for it in items] == [0, 1, 2, 3, 4]
    assert [it.status for it in items] == [None, Status.UNREADABLE, Status.UNSUPPORTED_ELEMENT, Status.UNREADABLE,
                                          None]
    assert items[3].error == "/no/such.cif: file not found"


def test_validate_atoms_keeps_its_contract():
    validate_atoms(bulk("Cu"))
    with pytest.raises(StructureError, match=r"unsupported element Fm: not supported"):
        validate_atoms(Atoms(numbers=[100], positions=[[0, 0, 0]]))  # Geodite's embedding stops at Z = 99
    with pytest.raises(StructureError, match="empty structure"):
        validate_atoms(Atoms())
    close = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0.1]])
    validate_atoms(close)  # distance check is opt-in here (the model's own callers)
    with pytest.raises(StructureError, match="0.100 Å apart") as info:
        validate_atoms(close, min_distance_factor=0.5)
    assert info.value.status is Status.ATOMS_TOO_CLOSE
