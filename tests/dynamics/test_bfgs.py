"""Batched BFGS (:mod:`geodite_sim.dynamics.bfgs`) against ASE's ``BFGS``, float64: the dense layout and its
re-packing, step-by-step traces with non-default parameters, and the size limit (a per-structure error).
``relax_many`` comparisons: tests/frontends/test_quasi_newton.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS
from conftest import evaluate_relax_state, sheared_cu

import geodite_sim as gs
from geodite_sim.batch import Batch
from geodite_sim.dynamics.bfgs import BFGSParams, bfgs_init, bfgs_learn, bfgs_move, dofs, from_dense, to_dense
from geodite_sim.state import concat_states, select_systems

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def test_dense_layout_round_trip_with_padding():
    """Cell rows first, then each system's atoms in order; a system smaller than the batch's largest has zeros
    beyond its 3 n + 9 entries, and atoms that do not fit (the runner's padding system) are dropped."""
    from geodite_sim.runner.edges import padding_cell
    from geodite_sim.runner.slots import Bare, pad_state

    b = Batch.from_atoms([bulk("Cu") * (2, 1, 1), bulk("Cu", "fcc", 3.6, cubic=True)], dtype=F64)
    padded = pad_state(Bare(batch=b), b.n_atoms + 7, 2, padding_cell(3.0, F64, "cpu")).batch  # 7 padding atoms
    d = dofs(4)
    rng = np.random.default_rng(0)
    v_a = torch.tensor(rng.standard_normal((padded.positions.shape[0], 3)))
    v_c = torch.tensor(rng.standard_normal((3, 3, 3)))
    dense = to_dense(padded, v_a, v_c, d)
    assert dense.shape == (3, d)
    np.testing.assert_array_equal(dense[0].numpy(), np.concatenate([v_c[0].reshape(-1), v_a[:2].reshape(-1),
                                                                    np.zeros(6)]))
    np.testing.assert_array_equal(dense[1].numpy(), np.concatenate([v_c[1].reshape(-1), v_a[2:6].reshape(-1)]))
    np.testing.assert_array_equal(dense[2, 9:].numpy(), v_a[6:10].reshape(-1))  # 4 of the 7 padding atoms fit
    back_a, back_c = from_dense(padded, dense)
    np.testing.assert_array_equal(back_a[:10].numpy(), v_a[:10].numpy())
    assert not back_a[10:].any() and torch.equal(back_c, v_c)


def test_hessian_is_trimmed_and_padded_on_repack():
    """Re-packing (the runner's select/concat) keeps each system's Hessian block: a batch sized for a 4-atom system
    pads a 1-atom system's block with zeros; selecting the 1-atom system alone trims it back."""
    small = bfgs_init(Batch.from_atoms([bulk("Cu")], dtype=F64), params=BFGSParams(alpha=3.0))
    large = bfgs_init(Batch.from_atoms([bulk("Cu", "fcc", 3.6, cubic=True)], dtype=F64), params=BFGSParams(alpha=5.0))
    small = replace(small, hessian=small.hessian + torch.arange(dofs(1) ** 2, dtype=F64).view(1, dofs(1), dofs(1)))
    both = concat_states([small, large])
    assert both.hessian.shape == (2, dofs(4), dofs(4))
    assert torch.equal(both.hessian[0, :dofs(1), :dofs(1)], small.hessian[0]) and not both.hessian[0, dofs(1):].any()
    assert torch.equal(both.hessian[1], large.hessian[0])
    alone = select_systems(both, [0])
    assert torch.equal(alone.hessian, small.hessian)
    assert select_systems(both, [1, 0]).hessian.shape == (2, dofs(4), dofs(4))


@pytest.mark.parametrize("cell", [False, True], ids=["atoms", "frechet"])
def test_trace_with_parameters_matches_ase(cell, morse):
    """20 steps with maxstep 0.1 and alpha 40: positions and cell after every step equal ASE's BFGS (on
    FrechetCellFilter for ``cell``), with the Hessian updated from the second step on."""
    params = BFGSParams(maxstep=0.1, alpha=40.0)
    atoms = sheared_cu()
    a = atoms.copy()
    a.calc = morse.ase_calculator()
    opt = BFGS(FrechetCellFilter(a) if cell else a, logfile=None, maxstep=0.1, alpha=40.0)
    state = bfgs_init(Batch.from_atoms([atoms], dtype=F64), relax_cell=cell, params=params)

    def evaluated(s):
        return evaluate_relax_state(morse, s, cell)

    state = evaluated(state)
    for _ in range(20):
        old = state
        state = bfgs_learn(old, evaluated(bfgs_move(old, params, cell=cell)), cell=cell)
        opt.step()
        np.testing.assert_allclose(state.batch.positions.numpy(), a.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(state.batch.cell[0].numpy(), a.cell[:], rtol=0, atol=1e-10)
    # the Hessian (ASE's layout: atoms, then cell rows): ours already holds the update ASE makes at its next step
    opt.prepare_step(opt.optimizable.get_x(), opt.optimizable.get_gradient())
    ours = state.hessian[0].numpy()
    order = np.r_[9:9 + 3 * len(atoms), 0:9]
    ours = ours[np.ix_(order, order)] if cell else ours[9:, 9:]
    np.testing.assert_allclose(ours, opt.H, rtol=1e-8, atol=1e-8)
    assert np.abs(opt.H - 40.0 * np.eye(len(opt.H))).max() > 1.0  # updated


def test_structures_above_the_limit_get_their_own_error(morse):
    """A structure above ``BFGSParams.max_atoms`` gets ``invalid_settings`` naming it and the way out; the others
    relax as they would without it."""
    small = bulk("Cu", "fcc", 3.7)
    big = bulk("Cu", "fcc", 3.7, cubic=True) * (2, 2, 1)  # 16 atoms
    big.rattle(0.02, seed=1)
    kw = dict(fmax=0.05, progress=False, optimizer="bfgs", bfgs=BFGSParams(max_atoms=8))
    res = gs.relax_many([small, big, small], morse, **kw)
    assert [r.status for r in res] == ["converged", "invalid_settings", "converged"]
    assert res[1].error.startswith("1:Cu16: 16 atoms is too large for optimizer='bfgs' (limit 8 atoms")
    assert "optimizer='lbfgs'" in res[1].error and "57x57 Hessian" in res[1].error
    alone = gs.relax_many([small], morse, **kw)[0]
    assert res[0].n_steps == res[2].n_steps == alone.n_steps > 0
    np.testing.assert_array_equal(res[0].structure.cell[:], alone.structure.cell[:])
    assert gs.relax_many([big], morse, fmax=0.05, progress=False, optimizer="bfgs")[0].converged  # default limit 128
