"""Batched constraints (FixAtoms, FixCartesian, FixSymmetry) against ASE 3.29, float64.

Each adjust_* is compared with the ASE constraint's own method on random forces, stresses, cells
and steps, one system alone and many in one batch; a batched FIRE + Fréchet loop with the
constraints wired in as documented in :mod:`geodite_sim.dynamics.constraints` reproduces ASE's
``FIRE(FrechetCellFilter(atoms))`` (same step count, positions and cell to 1e-8 Å) and keeps the
space group of every structure of a test set.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import spglib
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from ase.constraints import FixAtoms, FixBondLength, FixCartesian, FixedLine, FixSymmetry
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from ase.spacegroup import crystal
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress
from conftest import MORSE, relax_set

from geodite_sim.batch import Batch
from geodite_sim.dynamics.constraints import (
    MAX_OPS,
    AtomConstraints,
    BatchConstraints,
    constraints_from_atoms,
)
from geodite_sim.dynamics.fire import fire_init, fire_step
from geodite_sim.neighbors import neighbor_list
from geodite_sim.pair_potential import MorsePotential

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def symmetric_crystals() -> dict[str, Atoms]:
    """Crystals of several symmetries (point groups of order 2 to 48, with and without pure translations)."""
    rng = np.random.default_rng(3)
    general = [tuple(rng.uniform(0.05, 0.45, 3))]
    return {
        "fcc_conv": bulk("Cu", "fcc", 3.61, cubic=True),  # Fm-3m, 4 pure translations
        "hcp": bulk("Mg", "hcp", 3.21),  # P6_3/mmc
        "rutile": crystal(["Ti", "O"], basis=[(0, 0, 0), (0.305, 0.305, 0)], spacegroup=136,
                          cellpar=[4.59, 4.59, 2.96, 90, 90, 90]),
        "monoclinic": crystal(["Al"], basis=general, spacegroup=14, cellpar=[5.1, 5.9, 6.3, 90, 103, 90]),
        "triclinic": crystal(["Si", "Ge"], basis=[general[0], (0.7, 0.2, 0.6)], spacegroup=2,
                             cellpar=[4.1, 4.6, 5.2, 81, 97, 112]),
        # random general positions of Pnma, doubled: "rattled but symmetric" with pure translations
        "pnma_supercell": crystal(["Cu"], basis=general, spacegroup=62, cellpar=[5.3, 3.6, 6.9, 90, 90, 90])
        * (1, 2, 1),
    }


def with_symmetry(atoms: Atoms) -> Atoms:
    a = atoms.copy()
    a.set_constraint(FixSymmetry(a))  # refines a in place, as users do
    return a


def pack(atoms_list: list[Atoms]) -> tuple[Batch, BatchConstraints, list[AtomConstraints]]:
    items = [constraints_from_atoms(a) for a in atoms_list]
    for c in items:
        assert isinstance(c, AtomConstraints), c
    return Batch.from_atoms(atoms_list, dtype=F64), BatchConstraints.from_list(items), items


def ase_forces(a: Atoms, f: np.ndarray) -> np.ndarray:
    f = f.copy()
    for c in a.constraints:
        c.adjust_forces(a, f)
    return f


def ase_stress(a: Atoms, s: np.ndarray) -> np.ndarray:
    v = full_3x3_to_voigt_6_stress(s)
    for c in a.constraints:
        if hasattr(c, "adjust_stress"):
            c.adjust_stress(a, v)
    return voigt_6_to_full_3x3_stress(v)


def ase_move(a: Atoms, new_pos: np.ndarray, new_cell: np.ndarray | None) -> Atoms:
    """What FrechetCellFilter.set_positions does to the atoms: set_cell(scale_atoms) then set_positions."""
    a = a.copy()
    if new_cell is not None:
        a.set_cell(new_cell, scale_atoms=True)
    a.set_positions(new_pos)
    return a


# ---------------------------------------------------------------------------------------------- admission
def test_admission_reads_fixsymmetry_and_factorises_the_group():
    expected = {"fcc_conv": (225, 48, 4), "hcp": (194, 24, 1), "rutile": (136, 16, 1),
                "monoclinic": (14, 4, 1), "triclinic": (2, 2, 1), "pnma_supercell": (62, 8, 2)}
    for name, atoms in symmetric_crystals().items():
        a = with_symmetry(atoms)
        c = constraints_from_atoms(a)
        assert isinstance(c, AtomConstraints), (name, c)
        assert (c.spacegroup, len(c.rotations), c.n_translations) == expected[name], name
        assert len(a.constraints[0].rotations) == len(c.rotations) * c.n_translations
        assert c.positions is None and not c.fixed_pre.any() and c.removed_dof == 0


def test_admission_fix_symmetry_option_refines_like_ase():
    atoms = bulk("Cu", "fcc", 3.61, cubic=True) * (1, 1, 2)
    atoms.rattle(1e-3, seed=1)  # below symprec: ASE's refine_symmetry snaps it back
    c = constraints_from_atoms(atoms, fix_symmetry=True)
    ref = atoms.copy()
    fs = FixSymmetry(ref, symprec=0.01)
    assert isinstance(c, AtomConstraints) and c.spacegroup == 225
    assert len(c.rotations) * c.n_translations == len(fs.rotations)
    np.testing.assert_allclose(c.positions, ref.positions, atol=1e-12)
    np.testing.assert_allclose(c.cell, ref.cell[:], atol=1e-12)
    assert np.abs(atoms.positions - ref.positions).max() > 1e-4  # the input itself is left alone
    # no constraints at all: empty
    assert constraints_from_atoms(bulk("Cu")).is_empty


def test_admission_fixatoms_and_fixcartesian():
    a = bulk("Cu", "fcc", 3.61, cubic=True) * (2, 1, 1)
    a.set_constraint([FixAtoms(indices=[0, -1]), FixCartesian([2, 3], mask=(True, False, True))])
    c = constraints_from_atoms(a)
    assert isinstance(c, AtomConstraints)
    assert c.fixed_pre[[0, 7]].all() and c.fixed_pre[[2, 3]].tolist() == [[True, False, True]] * 2
    assert c.fixed_pre.sum() == 10 and not c.has_symmetry
    assert c.removed_dof == sum(k.get_removed_dof(a) for k in a.constraints) == 10


@pytest.mark.parametrize("constraint, name", [
    (lambda a: FixBondLength(0, 1), "FixBondLength"),
    (lambda a: FixedLine(0, (0, 0, 1)), "FixedLine"),
    (lambda a: [FixAtoms([0]), FixBondLength(0, 1)], "FixBondLength"),
])
def test_admission_rejects_unsupported_constraints_by_name(constraint, name):
    a = bulk("Cu", "fcc", 3.61, cubic=True)
    a.set_constraint(constraint(a))
    msg = constraints_from_atoms(a)
    assert isinstance(msg, str) and name in msg and "unsupported" in msg


def test_admission_rejects_subclasses_and_two_fixsymmetry():
    class MyFix(FixAtoms):
        pass

    a = bulk("Cu", "fcc", 3.61, cubic=True)
    a.set_constraint(MyFix([0]))
    assert "MyFix" in constraints_from_atoms(a)
    b = bulk("Cu", "fcc", 3.61, cubic=True)
    b.set_constraint([FixSymmetry(b), FixSymmetry(b)])
    assert "more than one FixSymmetry" in constraints_from_atoms(b)
    m = Atoms("Cu2", positions=[(0, 0, 0), (0, 0, 2.5)])  # no cell
    assert "cell" in constraints_from_atoms(m, fix_symmetry=True)


# ---------------------------------------------------------------------------------------------- adjust_* vs ASE
def _random_cell_step(cell: np.ndarray, rng, size: float = 0.03) -> np.ndarray:
    return cell @ (np.eye(3) + size * rng.standard_normal((3, 3))).T


@pytest.mark.parametrize("together", [False, True])
def test_symmetry_adjustments_equal_ase(together):
    rng = np.random.default_rng(11)
    atoms = [with_symmetry(a) for a in symmetric_crystals().values()]
    groups = [atoms] if together else [[a] for a in atoms]
    for group in groups:
        batch, bc, _ = pack(group)
        n = batch.n_atoms
        f = rng.standard_normal((n, 3))
        s = rng.standard_normal((len(group), 3, 3))
        new_cell = np.stack([_random_cell_step(a.cell[:], rng) for a in group])
        new_pos = batch.positions.numpy() + 0.05 * rng.standard_normal((n, 3))
        got_f = bc.adjust_forces(torch.tensor(f), batch).numpy()
        got_s = bc.adjust_stress(torch.tensor(s), batch).numpy()
        cell_t, too_large = bc.adjust_cell(batch.cell, torch.tensor(new_cell))
        got_p = bc.adjust_positions(batch, torch.tensor(new_pos), cell_t).numpy()
        assert not too_large.any()
        for k, a in enumerate(group):
            sl = slice(int(batch.offsets[k]), int(batch.offsets[k + 1]))
            np.testing.assert_allclose(got_f[sl], ase_forces(a, f[sl]), atol=1e-12)
            np.testing.assert_allclose(got_s[k], ase_stress(a, s[k]), atol=1e-12)
            moved = ase_move(a, new_pos[sl], new_cell[k])
            np.testing.assert_allclose(cell_t[k].numpy(), moved.cell[:], atol=1e-12)
            np.testing.assert_allclose(got_p[sl], moved.positions, atol=1e-12)
            # the adjusted quantities are symmetric: adjusting again changes nothing
            np.testing.assert_allclose(ase_forces(a, got_f[sl]), got_f[sl], atol=1e-12)


def test_symmetry_positions_without_cell_change_equal_ase():
    """Plain FIRE on the atoms (no cell filter): the displacement is symmetrised, the cell untouched."""
    rng = np.random.default_rng(5)
    atoms = [with_symmetry(a) for a in symmetric_crystals().values()]
    batch, bc, _ = pack(atoms)
    new_pos = batch.positions.numpy() + 0.05 * rng.standard_normal((batch.n_atoms, 3))
    cell, _ = bc.adjust_cell(batch.cell, batch.cell)
    assert torch.equal(cell, batch.cell)
    got = bc.adjust_positions(batch, torch.tensor(new_pos), cell).numpy()
    for k, a in enumerate(atoms):
        sl = slice(int(batch.offsets[k]), int(batch.offsets[k + 1]))
        np.testing.assert_allclose(got[sl], ase_move(a, new_pos[sl], None).positions, atol=1e-12)
    # an unmoved batch (frozen systems) comes back bit for bit
    assert torch.equal(bc.adjust_positions(batch, batch.positions, batch.cell), batch.positions)


def test_fixatoms_adjustments_equal_ase_and_mix_with_symmetry_in_order():
    rng = np.random.default_rng(2)
    slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    slab.set_constraint(FixAtoms(mask=slab.positions[:, 2] < slab.positions[:, 2].min() + 0.1))
    bulk8 = bulk("Cu", "fcc", 3.61, cubic=True) * (2, 1, 1)
    bulk8.set_constraint([FixAtoms([1, 5]), FixCartesian([2], mask=(False, True, True))])
    rut_pre = crystal(["Ti", "O"], basis=[(0, 0, 0), (0.305, 0.305, 0)], spacegroup=136,
                      cellpar=[4.59, 4.59, 2.96, 90, 90, 90])
    rut_post = rut_pre.copy()
    rut_pre.set_constraint([FixAtoms([2]), FixSymmetry(rut_pre)])  # fix first, then symmetrise
    rut_post.set_constraint([FixSymmetry(rut_post), FixAtoms([2])])  # symmetrise, then fix
    plain = bulk("Cu", "hcp", 2.55)
    atoms = [slab, bulk8, rut_pre, rut_post, plain]
    batch, bc, _ = pack(atoms)
    n = batch.n_atoms
    f = rng.standard_normal((n, 3))
    new_cell = np.stack([a.cell[:] if not a.pbc.all() else _random_cell_step(a.cell[:], rng) for a in atoms])
    new_pos = batch.positions.numpy() + 0.05 * rng.standard_normal((n, 3))
    got_f = bc.adjust_forces(torch.tensor(f), batch).numpy()
    got_m = bc.adjust_momenta(torch.tensor(f), batch).numpy()
    cell_t, _ = bc.adjust_cell(batch.cell, torch.tensor(new_cell))
    got_p = bc.adjust_positions(batch, torch.tensor(new_pos), cell_t).numpy()
    for k, a in enumerate(atoms):
        sl = slice(int(batch.offsets[k]), int(batch.offsets[k + 1]))
        np.testing.assert_allclose(got_f[sl], ase_forces(a, f[sl]), atol=1e-12)
        mom = a.copy()
        mom.set_momenta(f[sl])
        np.testing.assert_allclose(got_m[sl], mom.get_momenta(), atol=1e-12)
        moved = ase_move(a, new_pos[sl], new_cell[k] if a.pbc.all() else None)
        np.testing.assert_allclose(got_p[sl], moved.positions, atol=1e-12)
        np.testing.assert_allclose(cell_t[k].numpy(), moved.cell[:], atol=1e-12)
    # the two orders really differ (fixed atom 2 of rutile gets a force back in the first)
    pre, post = slice(int(batch.offsets[2]), int(batch.offsets[3])), slice(int(batch.offsets[3]), int(batch.offsets[4]))
    assert np.abs(got_f[pre][2]).max() > 1e-3 and np.abs(got_f[post][2]).max() == 0.0
    # unconstrained system: bit for bit unchanged
    last = slice(int(batch.offsets[4]), n)
    assert np.array_equal(got_f[last], f[last]) and np.array_equal(got_p[last], new_pos[last])
    assert bc.removed_dof.tolist() == [3 * 4, 3 * 2 + 2, 3, 3, 0]


def test_adjust_cell_flags_large_steps_like_ase():
    a = with_symmetry(bulk("Cu", "fcc", 3.61, cubic=True))
    batch, bc, _ = pack([a])
    big = a.cell[:] * 1.3
    _, too_large = bc.adjust_cell(batch.cell, torch.tensor(big[None]))
    assert too_large.tolist() == [True]
    with pytest.raises(RuntimeError, match="large deformation"):
        a.copy().set_cell(big, scale_atoms=True)


def test_select_and_concat_repack_like_the_batch():
    atoms = [with_symmetry(a) for a in symmetric_crystals().values()]
    atoms[1].set_constraint([FixAtoms([0]), *atoms[1].constraints])
    batch, bc, items = pack(atoms)
    assert bc.perm.shape == (batch.n_atoms, MAX_OPS) and bc.rot.shape == (len(atoms), MAX_OPS, 3, 3)
    order = [4, 1, 0]
    sub_b, sub_c = batch.select(order), bc.select(order)
    ref_c = BatchConstraints.from_list([items[k] for k in order])
    for f in ("fixed_pre", "fixed_post", "perm", "orbit", "rot", "weight", "n_trans", "has_sym", "removed_dof"):
        assert torch.equal(getattr(sub_c, f), getattr(ref_c, f)), f
    rest = [2, 3, 5]
    joined_b = Batch.concatenate([sub_b, batch.select(rest)])
    joined_c = BatchConstraints.concat([sub_c, bc.select(rest)])
    rng = np.random.default_rng(0)
    f = torch.tensor(rng.standard_normal((joined_b.n_atoms, 3)))
    got = joined_c.adjust_forces(f, joined_b)
    again = BatchConstraints.from_list([items[k] for k in order + rest]).adjust_forces(f, joined_b)
    assert torch.equal(got, again)


# ---------------------------------------------------------------------------------------------- FIRE + filter
FMAX, MAX_STEPS = 0.01, 400


def ase_relax(atoms: Atoms, cell: bool) -> tuple[Atoms, int]:
    a = atoms.copy()
    a.calc = MorsePotential(**MORSE).ase_calculator()
    opt = FIRE(FrechetCellFilter(a) if cell else a, logfile=None)
    opt.run(fmax=FMAX, steps=MAX_STEPS)
    return a, opt.nsteps


def constrained_relax(atoms_list: list[Atoms], relax_cell: list[bool], items: list[AtomConstraints] | None = None):
    """The reference wiring: FIRE + Fréchet filter with constraints applied where ASE applies them."""
    model = MorsePotential(**MORSE, dtype=F64)
    if items is None:
        batch, bc, _ = pack(atoms_list)
    else:
        batch, bc = Batch.from_atoms(atoms_list, dtype=F64), BatchConstraints.from_list(items)
    state = fire_init(batch, torch.tensor(relax_cell))
    for _ in range(MAX_STEPS + 2):
        b = state.batch
        out = model(b, edges=neighbor_list(b, model.cutoff, "torch"), compute_forces=True, compute_stress=True)
        state = replace(state, energy=out["energy"], forces=bc.adjust_forces(out["forces"], b),
                        stress=bc.adjust_stress(out["stress"], b))
        state = fire_step(state, FMAX, MAX_STEPS)
        cell, too_large = bc.adjust_cell(b.cell, state.batch.cell)
        assert not too_large.any()
        positions = bc.adjust_positions(b, state.batch.positions, cell)
        state = replace(state, batch=state.batch.with_positions(positions, cell))
        if bool(state.done.all()):
            break
    return state


def test_constrained_fire_matches_ase_alone_and_batched():
    cases = relax_set()
    refs = [ase_relax(a, cell) for _, a, cell in cases]
    batched = constrained_relax([a for _, a, _ in cases], [c for _, _, c in cases])
    for k, ((name, atoms, cell), (ref, steps)) in enumerate(zip(cases, refs, strict=True)):
        alone = constrained_relax([atoms], [cell])
        for st, idx in ((alone, 0), (batched, k)):
            b = st.batch
            sl = slice(int(b.offsets[idx]), int(b.offsets[idx + 1]))
            assert int(st.n_steps[idx]) == steps, name
            assert bool(st.converged[idx]) == (steps < MAX_STEPS), name
            assert np.abs(b.positions[sl].numpy() - ref.positions).max() < 1e-8, name
            assert np.abs(b.cell[idx].numpy() - ref.cell[:]).max() < 1e-8, name
        if name.endswith("_sym"):
            assert steps > 5, name  # a real relaxation, not a no-op
    # FixAtoms: fixed atoms keep their fractional (cell) / Cartesian (slab) positions
    fixed = batched.batch.positions[int(batched.batch.offsets[6]):int(batched.batch.offsets[7])][:4]
    slab = cases[6][1]
    np.testing.assert_array_equal(fixed.numpy(), slab.positions[:4])


def _spacegroup(a: Atoms, symprec: float = 1e-5) -> int | None:
    data = spglib.get_symmetry_dataset((a.cell[:], a.get_scaled_positions(), a.numbers), symprec=symprec)
    return None if data is None else int(data.number)


def test_symmetrised_relaxation_keeps_the_space_group():
    """Rattled (below symprec) structures admitted with ``fix_symmetry=True`` start from the refined
    structure and keep their space group through the relaxation (spglib at 1e-5 Å); the same rattled
    structures relaxed without the constraint lose it (so the test can fail)."""
    rng = np.random.default_rng(1)
    starts, items, rattled, groups = [], [], [], []
    for name, a, _ in relax_set():
        if not name.endswith("_sym"):
            continue
        groups.append(_spacegroup(a))
        r = Atoms(a.numbers, a.positions + 5e-4 * rng.standard_normal(a.positions.shape), cell=a.cell, pbc=True)
        c = constraints_from_atoms(r, fix_symmetry=True)
        assert isinstance(c, AtomConstraints) and c.spacegroup == groups[-1], name
        assert _spacegroup(r) != groups[-1]  # the rattle breaks the symmetry at 1e-5
        starts.append(Atoms(a.numbers, c.positions, cell=c.cell, pbc=True))
        items.append(c)
        rattled.append(r)
    state = constrained_relax(starts, [True] * len(starts), items)
    free = constrained_relax(rattled, [True] * len(rattled))
    for k, group in enumerate(groups):
        assert bool(state.converged[k]) and bool(free.converged[k])
        assert _spacegroup(state.batch.to_atoms(k)) == group
        assert _spacegroup(free.batch.to_atoms(k)) != group


# ---------------------------------------------------------------------------------------------- MD (FixAtoms)
def test_fixatoms_velocity_verlet_matches_ase():
    """The documented MD recipe (momenta adjusted after each kick and at the start, positions after the
    drift, 3n - removed_dof degrees of freedom) on the lead's Verlet pieces equals ASE's VelocityVerlet."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from geodite_sim.dynamics.verlet import MDState, drift, evaluate, half_kick, kinetic_energy

    rng = np.random.default_rng(4)
    slab = fcc111("Cu", (2, 2, 3), a=3.66, vacuum=5.0)
    slab.set_constraint(FixAtoms(mask=slab.positions[:, 2] < slab.positions[:, 2].min() + 0.1))
    cube = bulk("Cu", "fcc", 3.62, cubic=True) * (2, 1, 1)
    cube.set_constraint([FixAtoms([0]), FixCartesian([3, 4], mask=(True, False, False))])
    free = bulk("Cu", "fcc", 3.62, cubic=True)
    atoms = [slab, cube, free]
    p0 = [0.3 * rng.standard_normal((len(a), 3)) * a.get_masses()[:, None] ** 0.5 for a in atoms]
    dt, n_steps = 2.0 * units.fs, 60
    refs = []
    for a, p in zip(atoms, p0, strict=True):
        a = a.copy()
        a.calc = MorsePotential(**MORSE).ase_calculator()
        a.set_momenta(p)  # applies the constraints
        VelocityVerlet(a, timestep=dt, logfile=None).run(n_steps)
        refs.append(a)
    model = MorsePotential(**MORSE, dtype=F64)

    def force_fn(b):
        out = model(b, edges=neighbor_list(b, model.cutoff, "torch"), compute_forces=True, compute_stress=False)
        return out["energy"], out["forces"]

    batch, bc, _ = pack(atoms)
    state = MDState(batch=batch, momenta=bc.adjust_momenta(torch.tensor(np.concatenate(p0)), batch))
    evaluate(state, force_fn)
    for _ in range(n_steps):
        half_kick(state, dt)
        old = state.batch
        drift(state, dt)
        state.batch = old.with_positions(bc.adjust_positions(old, state.batch.positions, old.cell))
        state.momenta = bc.adjust_momenta(state.momenta, state.batch)
        evaluate(state, force_fn)
        half_kick(state, dt)
        state.momenta = bc.adjust_momenta(state.momenta, state.batch)
    dof = 3 * batch.atoms_per_system - bc.removed_dof
    temps = (2 * kinetic_energy(state) / (dof * units.kB)).numpy()
    for k, ref in enumerate(refs):
        sl = slice(int(batch.offsets[k]), int(batch.offsets[k + 1]))
        assert np.abs(state.batch.positions[sl].numpy() - ref.positions).max() < 1e-8
        assert np.abs(state.momenta[sl].numpy() - ref.get_momenta()).max() < 1e-8
        assert abs(temps[k] - ref.get_temperature()) < 1e-6 * ref.get_temperature()
    np.testing.assert_array_equal(state.batch.positions[:4].numpy(), slab.positions[:4])  # fixed layer
    assert np.abs(state.batch.positions[sl].numpy() - free.positions).max() > 0.01  # things moved


def test_vectorised_prep_symmetry_equals_ase():
    from ase.spacegroup.symmetrize import prep_symmetry as ase_prep

    from geodite_sim.dynamics.constraints import prep_symmetry

    for name, atoms in symmetric_crystals().items():
        a = with_symmetry(atoms)
        rot, trans, maps = ase_prep(a, 0.01)
        r2, t2, m2 = prep_symmetry(a, 0.01)
        assert np.array_equal(rot, r2) and np.array_equal(trans, t2), name
        assert np.array_equal(np.asarray(maps), m2), name


def test_fixsymmetry_without_position_or_cell_adjustment_equals_ase():
    rng = np.random.default_rng(8)
    atoms = []
    for flags in ((False, True), (True, False), (False, False)):
        a = symmetric_crystals()["rutile"]
        a.set_constraint(FixSymmetry(a, adjust_positions=flags[0], adjust_cell=flags[1]))
        atoms.append(a)
    batch, bc, _ = pack(atoms)
    new_cell = np.stack([_random_cell_step(a.cell[:], rng) for a in atoms])
    new_pos = batch.positions.numpy() + 0.05 * rng.standard_normal((batch.n_atoms, 3))
    cell, _ = bc.adjust_cell(batch.cell, torch.tensor(new_cell))
    got = bc.adjust_positions(batch, torch.tensor(new_pos), cell).numpy()
    for k, a in enumerate(atoms):
        sl = slice(int(batch.offsets[k]), int(batch.offsets[k + 1]))
        moved = ase_move(a, new_pos[sl], new_cell[k])
        np.testing.assert_allclose(cell[k].numpy(), moved.cell[:], atol=1e-12)
        np.testing.assert_allclose(got[sl], moved.positions, atol=1e-12)


def test_relax_many_honours_input_constraints_like_ase():
    """The runner's FIRE entry applies the inputs' FixSymmetry/FixAtoms where ASE does: same step counts and
    positions/cells as ASE's FIRE(FrechetCellFilter) with the constraint, in one mixed batch."""
    import geodite_sim as gs

    cases = relax_set()
    refs = [ase_relax(a, cell) for _, a, cell in cases]
    res = gs.relax_many([a for _, a, _ in cases], MorsePotential(**MORSE, dtype=F64), fmax=FMAX,
                        max_steps=MAX_STEPS, relax_cell=[c for _, _, c in cases], progress=False)
    for (name, _, _), (ref, steps), r in zip(cases, refs, res, strict=True):
        assert r.error is None, (name, r.error)
        assert r.n_steps == steps, name
        assert np.abs(r.structure.positions - ref.positions).max() < 1e-8, name
        assert np.abs(r.structure.cell[:] - ref.cell[:]).max() < 1e-8, name


def test_relax_many_fix_symmetry_and_unsupported_constraints():
    """``fix_symmetry=True`` keeps the space group; an unsupported constraint is that structure's error only."""
    import geodite_sim as gs

    rng = np.random.default_rng(2)
    name, a, _ = relax_set()[0]
    group = _spacegroup(a)
    r = Atoms(a.numbers, a.positions + 5e-4 * rng.standard_normal(a.positions.shape), cell=a.cell, pbc=True)
    bad = bulk("Cu", "fcc", 3.6, cubic=True)
    bad.set_constraint(FixBondLength(0, 1))
    res = gs.relax_many([r, bad], MorsePotential(**MORSE, dtype=F64), fmax=FMAX, progress=False, fix_symmetry=True)
    assert res[0].error is None and _spacegroup(res[0].structure) == group
    assert res[1].status == "invalid_structure" and "FixBondLength" in res[1].error
    md = gs.run_md([bad], MorsePotential(**MORSE, dtype=F64), temperature=300, steps=2, progress=False)
    assert md[0].status == "invalid_structure" and "FixBondLength" in md[0].error
