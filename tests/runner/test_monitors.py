"""The MD stability monitors stop what blows up and not what fluctuates (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from scipy.stats import chi2

import geodite_sim as gs
from geodite_sim.monitors import RUNAWAY_TAIL_PROBABILITY, Monitors, temperature_limit_factor


def test_temperature_limit_follows_the_chi_square_law():
    """3N T/T0 ~ χ²(3N) in equilibrium: the limit is the 1 - 1e-12 quantile, never below the fixed factor."""
    m = Monitors()
    for n in (1, 2, 8, 64, 1000):
        dof = 3 * n
        expected = max(4.0, chi2.isf(RUNAWAY_TAIL_PROBABILITY, dof) / dof)
        assert temperature_limit_factor(m, n) == pytest.approx(expected)
    assert temperature_limit_factor(m, 2) > 10  # a two-atom cell may legitimately reach 4 x T0
    assert temperature_limit_factor(m, 500) == 4.0
    assert temperature_limit_factor(Monitors(max_temperature_factor=None), 2) == float("inf")


@pytest.mark.slow
def test_small_cells_are_not_stopped_by_fluctuations_but_explosions_are():
    """64 two-atom NaCl cells, NHC 600 K, 2,000 steps, default model: no false stop; a cell given ~10^6 K in the
    same call is stopped."""
    cells = [bulk("NaCl", "rocksalt", 5.64) for _ in range(64)]
    hot = bulk("NaCl", "rocksalt", 5.64)
    hot.set_momenta(np.random.default_rng(0).normal(0.0, 300.0, (2, 3)))
    res = gs.run_md(cells + [hot], gs.load_model(), ensemble="nvt_nhc", temperature=600, timestep=1.5, steps=2000,
                    progress=False, seed=7)
    stopped = [r for r in res[:64] if r.error is not None]
    assert not stopped, [r.error for r in stopped]
    assert all(r.n_steps == 2000 for r in res[:64])
    # stopped early (the runaway limit is relative to its own hot start, so the drift monitor catches it first)
    assert res[64].status in ("temperature_runaway", "conserved_drift", "non_finite") and res[64].n_steps < 2000
