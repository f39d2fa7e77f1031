"""Batched L-BFGS and BFGS through ``relax_many`` against ASE's ``LBFGS`` / ``BFGS`` (alone and on
``FrechetCellFilter``), float64: step counts, positions and cells to 1e-8 Å, energies to 1e-9 eV/atom, for every
structure of mixed batches with refills; batch invariance; constraints; the Geodite model path; the workflows.

Rounding-chaotic paths. Quasi-Newton steps amplify rounding where a relaxation wanders (e.g. a diamond or simple
cubic cell, mechanically unstable under a pair potential, relaxed with its cell): there ASE's own path changes
(another step count, positions off by far more than 1e-8 Å) when one coordinate moves by 1e-14 Å, so no
implementation can follow it to 1e-8 Å. The fast comparisons use inputs without such paths; the slow
``test_larger_batches_match_ase_where_ase_is_reproducible`` takes 48 inputs and checks that every one either
equals ASE or is such a path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.constraints import FixAtoms, FixCartesian
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, LBFGS
from conftest import MORSE, relax_set, tiny_geodite
from test_relax import copper_like

import geodite_sim as gs
from geodite_sim.pair_potential import MorsePotential

pytestmark = pytest.mark.usefixtures("one_thread")

ASE_OPTIMIZERS = {"lbfgs": LBFGS, "bfgs": BFGS}
FMAX, MAX_STEPS = 0.05, 200
#: ``copper_like(n, SEED)``: its first 16 inputs have no rounding-chaotic path (module docstring) with either optimiser
#: at fmax 0.05.
SEED = 2


def relax_cell_flags(n: int) -> list[bool]:
    return [k % 3 != 1 for k in range(n)]


def ase_relax(name: str, atoms, calc, cell: bool, fmax: float = FMAX, steps: int = MAX_STEPS, nudge: float = 0.0):
    a = atoms.copy()
    a.positions[0, 0] += nudge
    a.calc = calc
    opt = ASE_OPTIMIZERS[name](FrechetCellFilter(a) if (cell and a.pbc.all()) else a, logfile=None)
    converged = opt.run(fmax=fmax, steps=steps)
    return a, opt.nsteps, converged


def assert_equal_to_ase(res, ref, steps: int, converged: bool, what: str = "") -> None:
    n = len(ref)
    assert res.error is None, (what, res.error)
    assert (res.n_steps, res.converged) == (steps, converged), what
    assert np.abs(res.structure.positions - ref.positions).max() < 1e-8, what
    assert np.abs(res.structure.cell[:] - ref.cell[:]).max() < 1e-8, what
    assert abs(res.energy - ref.get_potential_energy()) / n < 1e-9, what


@pytest.mark.parametrize("name", ["lbfgs", "bfgs"])
def test_mixed_batch_with_refills_matches_ase_and_is_batch_invariant(name, morse):
    """12 structures of 1-16 atoms (eight bulk prototypes, triclinic cells, a slab; cell relaxed for two in three)
    relaxed in one call with a 24-atom budget (systems retire and are refilled all the time): every one
    equals ASE's optimiser on the same structure; everything in one batch with a coarse check interval gives the
    same results (bit for bit for L-BFGS; BFGS's eigendecomposition is padded to the batch's largest system, so
    to rounding)."""
    inputs, cells = copper_like(12, seed=SEED), relax_cell_flags(12)
    kw = dict(fmax=FMAX, max_steps=MAX_STEPS, relax_cell=cells, progress=False, optimizer=name)
    refill = gs.relax_many(inputs, morse, max_atoms=24, check_interval=1, **kw)
    at_once = gs.relax_many(inputs, morse, max_atoms=100_000, check_interval=7, **kw)
    calc = morse.ase_calculator()
    assert sum(r.relax_cell for r in refill) >= 6 and max(len(a) for a in inputs) >= 8
    for k, (atoms, cell, r, b) in enumerate(zip(inputs, cells, refill, at_once, strict=True)):
        assert r.relax_cell == (cell and bool(atoms.pbc.all()))
        ref, steps, converged = ase_relax(name, atoms, calc, cell)
        assert_equal_to_ase(r, ref, steps, converged, f"input {k}")
        assert b.n_steps == r.n_steps
        tol = 0.0 if name == "lbfgs" else 1e-10
        assert np.abs(b.structure.positions - r.structure.positions).max() <= tol, k
        assert np.abs(b.structure.cell[:] - r.structure.cell[:]).max() <= tol, k
    assert sum(r.n_steps for r in refill) > 5 * len(inputs)  # real relaxations


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lbfgs", "bfgs"])
def test_larger_batches_match_ase_where_ase_is_reproducible(name, morse):
    """36 inputs at fmax 0.01 in one refilled batch: each equals ASE's optimiser, or ASE's own path is
    rounding-chaotic there (a 1e-14 Å nudge of one coordinate changes its step count or moves its result by more
    than 1e-10 Å); at least 30 equal ASE. (ASE's own relaxations are ~80 % of this test's time.)"""
    inputs, cells = copper_like(36, seed=SEED), relax_cell_flags(36)
    res = gs.relax_many(inputs, morse, fmax=0.01, max_steps=300, relax_cell=cells, progress=False, optimizer=name,
                        max_atoms=32)
    calc = morse.ase_calculator()
    exact = 0
    for k, (atoms, cell, r) in enumerate(zip(inputs, cells, res, strict=True)):
        ref, steps, converged = ase_relax(name, atoms, calc, cell, fmax=0.01, steps=300)
        try:
            assert_equal_to_ase(r, ref, steps, converged, f"input {k}")
            exact += 1
        except AssertionError:
            nudged, steps_n, _ = ase_relax(name, atoms, calc, cell, fmax=0.01, steps=300, nudge=1e-14)
            assert steps_n != steps or np.abs(nudged.positions - ref.positions).max() > 1e-10, k
    print(f"{name}: {exact} of {len(inputs)} equal ASE's optimiser")
    assert exact >= 30, exact


@pytest.mark.parametrize("name", ["lbfgs", "bfgs"])
def test_constraints_match_ase(name):
    """FixSymmetry (five space groups), FixAtoms with the cell, a slab with a fixed layer and FixCartesian under the
    Fréchet filter (where a fixed Cartesian component is not a fixed generalised coordinate, so the stored step is
    the one the constraint let through), all in one batch: ASE's optimiser with the same constraints."""
    cases = relax_set()
    cart = bulk("Cu", "fcc", 3.66, cubic=True) * (2, 1, 1)
    cart.rattle(0.05, seed=7)
    cart.set_cell(cart.cell[:] @ np.array([[1.0, 0.02, 0.0], [0.02, 0.98, 0.01], [0.0, 0.01, 1.01]]), scale_atoms=True)
    cart.set_constraint([FixCartesian([0, 3], mask=(False, True, True)), FixAtoms([5])])
    cases.append(("fixcartesian_cell", cart, True))
    model = MorsePotential(**MORSE, dtype=torch.float64)
    res = gs.relax_many([a for _, a, _ in cases], model, fmax=0.01, max_steps=400, relax_cell=[c for *_, c in cases],
                        progress=False, optimizer=name)
    for (case, atoms, cell), r in zip(cases, res, strict=True):
        ref, steps, converged = ase_relax(name, atoms, MorsePotential(**MORSE).ase_calculator(), cell, fmax=0.01,
                                          steps=400)
        assert_equal_to_ase(r, ref, steps, converged, case)
        assert steps > 3, case


@pytest.mark.parametrize("name", ["lbfgs", "bfgs"])
def test_geodite_model_matches_ase(name):
    """The Geodite path: a tiny random Geodite through GeoditeCalculator, Si and a distorted NaCl cell, with the
    cell, in one batch (20 steps: beyond them L-BFGS's path on Si in this random landscape becomes rounding-chaotic,
    ASE's own included)."""
    model = tiny_geodite(torch.float64)
    rng = np.random.default_rng(11)
    structures = []
    for atoms in (bulk("Si", "diamond", 5.43), bulk("NaCl", "rocksalt", 5.64)):
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.02 * rng.standard_normal((3, 3))), scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        structures.append(atoms)
    res = gs.relax_many(structures, model, fmax=0.05, max_steps=20, progress=False, optimizer=name)
    calc = gs.GeoditeCalculator(model)
    for atoms, r in zip(structures, res, strict=True):
        ref, steps, converged = ase_relax(name, atoms, calc, True, steps=20)
        assert_equal_to_ase(r, ref, steps, converged, atoms.get_chemical_formula())


def test_optimizer_choice_and_parameters_are_checked(morse):
    """Unknown optimisers and another optimiser's parameters are refused before anything runs; parameters given as
    a dict reach the optimiser (a smaller maxstep takes more steps, as in ASE)."""
    a = bulk("Cu", "fcc", 3.8)
    with pytest.raises(ValueError, match="unknown optimizer 'newton'"):
        gs.relax_many([a], morse, optimizer="newton", progress=False)
    with pytest.raises(ValueError, match="fire= given but optimizer='lbfgs'"):
        gs.relax_many([a], morse, optimizer="lbfgs", fire={"dt": 0.2}, progress=False)
    with pytest.raises(ValueError, match="maxstep"):
        gs.relax_many([a], morse, optimizer="lbfgs", lbfgs={"maxstep": 1.5}, progress=False)
    slow = gs.relax_many([a], morse, optimizer="lbfgs", lbfgs={"maxstep": 0.01}, progress=False)[0]
    ref = a.copy()
    ref.calc = morse.ase_calculator()
    opt = LBFGS(FrechetCellFilter(ref), logfile=None, maxstep=0.01)
    assert opt.run(fmax=0.05, steps=500)
    default = gs.relax_many([a], morse, optimizer="lbfgs", progress=False)[0]
    assert slow.n_steps == opt.nsteps > default.n_steps


def test_workflows_take_the_optimizer(morse, tmp_path):
    """The property workflows and the screening pass ``optimizer`` to every relaxation: an EOS relaxed first with
    L-BFGS takes ASE's L-BFGS step count; ``screen(optimizer=...)`` hands it to relax_many and records it."""
    from geodite_sim.workflows.properties import run_eos
    from geodite_sim.workflows.stability import screen

    atoms = bulk("Cu", "fcc", 3.7, cubic=True)
    atoms.rattle(0.03, seed=1)
    r = run_eos([atoms], morse, relax=True, relax_ions=False, fmax=0.01, optimizer="lbfgs")[0]
    ref = atoms.copy()
    ref.calc = morse.ase_calculator()
    opt = LBFGS(FrechetCellFilter(ref), logfile=None)
    opt.run(fmax=0.01, steps=500)
    assert r.status == "done" and r.relax_steps == opt.nsteps > 3

    seen = []

    def relax_fn(structures, **kw):
        seen.append(kw.get("optimizer"))
        return gs.relax_many(structures, **kw)

    refs = [bulk("Cu", "fcc", 3.61)]
    res = screen([bulk("Cu", "fcc", 3.65)], refs, out=tmp_path / "s", model=morse, optimizer="bfgs", plots=False,
                 progress=False, relax_fn=relax_fn)
    assert seen == ["bfgs"] and res.rows[0]["status"] == "screened"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from geodite_sim.model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    save_checkpoint(tiny_geodite(torch.float32), path)
    return path


def test_cli_optimizer_option_resumes_and_refuses_another(tmp_path, tiny_checkpoint, capsys):
    """``geodite-sim relax --optimizer lbfgs``: the structures relax with L-BFGS (the steps of ``relax_many``), a
    re-run resumes (nothing new), and a re-run with another optimiser is refused before anything runs."""
    from ase.io import write
    from test_relax import _main

    from geodite_sim.model import load_model

    a, b = tmp_path / "a.cif", tmp_path / "b.cif"
    write(a, bulk("Cu", "fcc", 3.65))
    write(b, bulk("Al", "fcc", 4.1))
    out = tmp_path / "out"
    args = [a, b, "--out", out, "--model", tiny_checkpoint, "--dtype", "float64", "--max-steps", "8", "--no-progress"]
    rc, text = _main(capsys, *args, "--optimizer", "lbfgs")
    assert rc == 0, text
    table = json.loads((out / "results.json").read_text())
    want = gs.relax_many([str(a), str(b)], load_model(str(tiny_checkpoint), dtype=torch.float64), max_steps=8,
                         progress=False, optimizer="lbfgs")
    assert [r["n_steps"] for r in table] == [r.n_steps for r in want]
    assert [r["n_steps"] for r in table] != [r.n_steps for r in gs.relax_many(
        [str(a), str(b)], load_model(str(tiny_checkpoint), dtype=torch.float64), max_steps=8, progress=False)]
    rc, text = _main(capsys, *args, "--optimizer", "lbfgs")
    assert rc == 0 and "relaxed 0 new structure(s)" in text, text
    rc, text = _main(capsys, *args)
    assert rc == 2 and "optimizer" in text, text
