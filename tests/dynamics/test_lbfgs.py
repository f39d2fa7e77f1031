"""Batched L-BFGS (:mod:`geodite_sim.dynamics.lbfgs`) against ASE's ``LBFGS``, float64: the compact form of the
inverse Hessian against ASE's two-loop recursion (``LBFGSMethod``) on random histories that wrap the ring, and
step-by-step traces with non-default parameters. ``relax_many`` comparisons: tests/frontends/test_quasi_newton.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import LBFGS
from conftest import evaluate_relax_state, sheared_cu

from geodite_sim.batch import Batch
from geodite_sim.dynamics.lbfgs import LBFGSParams, inverse_hessian_times, lbfgs_init, lbfgs_learn, lbfgs_move

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def test_compact_form_equals_ase_two_loop_recursion():
    """Two systems (3 and 5 atoms, cell coordinates for both) fed 7 random (s, y) pairs through ``lbfgs_learn`` with
    memory 4 (the ring wraps, the oldest pairs drop out), then H q for random q: ASE's ``LBFGSMethod`` fed the
    same pairs in its own (N + 3) x 3 layout gives the same vector; also after 1, 2 and 4 pairs."""
    from ase._4.optimize.lbfgs import LBFGSMethod  # (after ase.optimize: ASE's own import order)
    from ase._4.optimize.optimizable import initial_inverse_position_hessian

    rng = np.random.default_rng(3)
    atoms = [bulk("Cu", "fcc", 3.6, cubic=True)[:3], bulk("Cu", "fcc", 3.6, cubic=True) * (2, 1, 1)]
    atoms[1] = atoms[1][:5]
    batch = Batch.from_atoms(atoms, dtype=F64)
    sizes = [3, 5]
    memory, alpha = 4, 55.0
    state = lbfgs_init(batch, relax_cell=True, params=LBFGSParams(memory=memory, alpha=alpha))
    state = replace(state, g_atoms=torch.zeros_like(batch.positions), g_cell=torch.zeros_like(batch.cell))
    ase = []
    for n in sizes:
        m = LBFGSMethod(memory=memory, initial_inverse_hessian=initial_inverse_position_hessian(3 * (n + 3), alpha))
        ase.append(m)
    prev = []  # (x, gradient) of the last point, in ASE's layout
    for s, n in enumerate(sizes):
        sl = slice(int(batch.offsets[s]), int(batch.offsets[s + 1]))
        prev.append((np.concatenate([batch.positions[sl].numpy(), np.zeros((3, 3))]).ravel(), np.zeros((n + 3) * 3)))
    for k in range(1, 8):
        pos = state.batch.positions + 0.05 * torch.tensor(rng.standard_normal(batch.positions.shape))
        log = state.cell_log + 0.01 * torch.tensor(rng.standard_normal(batch.cell.shape))
        g_a = torch.tensor(rng.standard_normal(batch.positions.shape))
        g_c = torch.tensor(rng.standard_normal(batch.cell.shape))
        new = replace(state, batch=state.batch.with_positions(pos), cell_log=log, g_atoms=g_a, g_cell=g_c)
        state = lbfgs_learn(state, new, cell=True)
        for s, m in enumerate(ase):
            sl = slice(int(batch.offsets[s]), int(batch.offsets[s + 1]))
            x = np.concatenate([pos[sl].numpy(), (log[s] * state.cell_factor[s]).numpy()]).ravel()
            grad = -np.concatenate([g_a[sl].numpy(), g_c[s].numpy()]).ravel()
            m.iteration = k  # ASE's update sees the number of steps taken so far (it pops beyond memory)
            m.update(x, grad, *prev[s])
            prev[s] = (x, grad)
        if k in (1, 2, 4, 7):
            q_a = torch.tensor(rng.standard_normal(batch.positions.shape))
            q_c = torch.tensor(rng.standard_normal(batch.cell.shape))
            h_a, h_c = inverse_hessian_times(state, q_a, q_c, alpha)
            for s, m in enumerate(ase):
                sl = slice(int(batch.offsets[s]), int(batch.offsets[s + 1]))
                q = np.concatenate([q_a[sl].numpy(), q_c[s].numpy()]).ravel()
                m.iteration = k
                ref = -m.compute_step(q)  # compute_step returns -H q
                got = np.concatenate([h_a[sl].numpy(), h_c[s].numpy()]).ravel()
                np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-13 * np.abs(ref).max())
    assert state.count.tolist() == [memory, memory] and len(ase[0].s) == memory


@pytest.mark.parametrize("cell", [False, True], ids=["atoms", "frechet"])
def test_trace_with_parameters_matches_ase(cell, morse):
    """25 steps with memory 3 (the history wraps), maxstep 0.1, damping 0.8, alpha 40: positions and cell after
    every step equal ASE's LBFGS (on FrechetCellFilter for ``cell``)."""
    params = LBFGSParams(maxstep=0.1, memory=3, damping=0.8, alpha=40.0)
    atoms = sheared_cu()
    a = atoms.copy()
    a.calc = morse.ase_calculator()
    opt = LBFGS(FrechetCellFilter(a) if cell else a, logfile=None, maxstep=0.1, memory=3, damping=0.8, alpha=40.0)
    state = lbfgs_init(Batch.from_atoms([atoms], dtype=F64), relax_cell=cell, params=params)

    def evaluated(s):
        return evaluate_relax_state(morse, s, cell)

    state = evaluated(state)
    for _ in range(25):
        old = state
        state = lbfgs_learn(old, evaluated(lbfgs_move(old, params, cell=cell)), cell=cell)
        opt.step()
        np.testing.assert_allclose(state.batch.positions.numpy(), a.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(state.batch.cell[0].numpy(), a.cell[:], rtol=0, atol=1e-10)
    assert int(state.count[0]) == 3 and int(state.n_steps[0]) == 25
    assert np.abs(state.batch.positions.numpy() - atoms.positions).max() > 0.05  # it moved


def test_parameters_are_checked_like_ase():
    with pytest.raises(ValueError, match="maxstep"):
        LBFGSParams(maxstep=1.5)
    with pytest.raises(ValueError):
        LBFGS(bulk("Cu"), maxstep=1.5, logfile=None)  # ASE refuses it too
    with pytest.raises(ValueError, match="memory"):
        LBFGSParams(memory=0)
