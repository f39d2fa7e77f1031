"""Memory model: fit, prediction and the capacity it implies."""

from __future__ import annotations

import pytest
from geodite_sim.memory import MemoryModel, fit_memory_model


def test_fit_recovers_affine_coefficients():
    truth = MemoryModel(bytes_per_atom=3000.0, bytes_per_edge=20000.0, fixed_bytes=1e6)
    samples = [(n, e, truth.predict(n, e)) for n, e in [(8, 300), (64, 2900), (216, 9900), (100, 1000)]]
    fit = fit_memory_model(samples)
    assert fit.bytes_per_atom == pytest.approx(3000.0, rel=1e-6)
    assert fit.bytes_per_edge == pytest.approx(20000.0, rel=1e-6)
    assert fit.fixed_bytes == pytest.approx(1e6, rel=1e-6)


def test_capacity_never_exceeds_budget():
    model = MemoryModel(bytes_per_atom=3000.0, bytes_per_edge=20000.0, fixed_bytes=1e6)
    for budget in (5e7, 1e8, 1e9, 1.6e10):
        for epa in (10.0, 46.0, 120.0):
            n = model.max_atoms(budget, epa, margin=0.2)
            assert model.predict(n, n * epa) <= 0.8 * budget
            assert model.predict(n + 1, (n + 1) * epa) > 0.8 * budget - 1e-6
    assert model.max_atoms(1e5, 46.0) == 0  # a budget below the fixed cost admits nothing
