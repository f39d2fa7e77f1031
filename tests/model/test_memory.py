"""Memory model: allocation probe, fit, prediction and the capacity it implies (CPU measurements)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from conftest import tiny_geodite

from geodite_sim.batch import Batch
from geodite_sim.md import _default_max_atoms, run_md
from geodite_sim.memory import (
    AllocationProbe,
    MemoryModel,
    default_probes,
    edges_per_atom,
    fit_memory_model,
    fit_samples,
    measure_samples,
    measure_step_peak,
    memory_capacity,
    mixed_oxide,
    si_diamond,
)
from geodite_sim.model import load_model
from geodite_sim.model.geodite import Edges
from geodite_sim.model.strain import edge_vectors
from geodite_sim.neighbors import neighbor_list
from geodite_sim.relax import estimate_capacity

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def tiny32():
    return tiny_geodite(torch.float32)


@pytest.fixture(scope="module")
def tiny64():
    return tiny_geodite(torch.float64)


def _model(request, dtype):
    return request.getfixturevalue("tiny32" if dtype == torch.float32 else "tiny64")


def _held_out():
    """Structures unlike the fit probes (fcc metal, rocksalt, a molecule in a box), two systems per batch."""
    cu = bulk("Cu", "fcc", 3.61, cubic=True) * (3, 3, 3)  # 108 atoms, ~78 edges/atom at 6 A
    nacl = bulk("NaCl", "rocksalt", 5.64, cubic=True) * (2, 2, 2)  # 64 atoms
    for a in (cu, nacl):
        a.rattle(0.02, seed=3)
    return [[cu, nacl], [mixed_oxide((3, 3, 2), seed=5)], [si_diamond((3, 3, 3))]]


# ---------------------------------------------------------------------------- arithmetic
def test_fit_recovers_affine_coefficients():
    truth = MemoryModel(bytes_per_atom=3000.0, bytes_per_edge=20000.0, fixed_bytes=1e6)
    samples = [(n, e, truth.predict(n, e)) for n, e in [(8, 300), (64, 2900), (216, 9900), (100, 1000)]]
    for fit in (fit_samples(samples), fit_memory_model(samples)):  # the list form is kept for compatibility
        assert fit.bytes_per_atom == pytest.approx(3000.0, rel=1e-6)
        assert fit.bytes_per_edge == pytest.approx(20000.0, rel=1e-6)
        assert fit.fixed_bytes == pytest.approx(1e6, rel=1e-6)


def test_fit_is_non_negative():
    # Unconstrained least squares gives a negative fixed term here; the fit must not.
    samples = [(10, 100, 1.0e6), (20, 200, 2.3e6), (40, 400, 4.9e6)]
    fit = fit_samples(samples)
    assert min(fit.fixed_bytes, fit.bytes_per_atom, fit.bytes_per_edge) >= 0.0
    a = np.array([[1.0, n, e] for n, e, _ in samples])
    assert np.linalg.lstsq(a, [p for *_, p in samples], rcond=None)[0][0] < 0  # the case is a real one


def test_capacity_never_exceeds_budget():
    model = MemoryModel(bytes_per_atom=3000.0, bytes_per_edge=20000.0, fixed_bytes=1e6)
    for budget in (5e7, 1e8, 1e9, 1.6e10):
        for epa in (10.0, 46.0, 120.0):
            n = model.max_atoms(budget, epa, margin=0.2)
            assert model.predict(n, n * epa) <= 0.8 * budget
            assert model.predict(n + 1, (n + 1) * epa) > 0.8 * budget - 1e-6
    assert model.max_atoms(1e5, 46.0) == 0  # a budget below the fixed cost admits nothing


# ---------------------------------------------------------------------------- the probe
def test_probe_counts_storages_exactly():
    x = torch.ones(1000, dtype=torch.float64)  # made before the probe: not counted
    with AllocationProbe() as probe:
        a = x * 2.0  # 8000 B
        v = a[10:]  # a view: nothing
        a.mul_(3.0)  # in place: nothing
        b = torch.empty(500, dtype=torch.float32)  # 2000 B
        assert probe.live_bytes == 10_000
        del a  # the view keeps the storage alive
        assert probe.live_bytes == 10_000
        del v
        assert probe.live_bytes == 2000
        c = (x + 1.0).sum()  # a temporary of 8000 B, freed, and an 8-byte result
        del b, c
    assert probe.live_bytes == 0
    assert probe.peak_bytes == 10_008  # 2000 + the 8000 B temporary + its 8 B sum, all live at once
    assert probe.allocations == 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_sees_backward_allocations(request, dtype):
    model = _model(request, dtype)
    batch = Batch.from_atoms([si_diamond((2, 1, 1))], dtype=dtype)
    edges = Edges(*neighbor_list(batch, model.cutoff))
    full = measure_step_peak(model, batch, edges)
    forward = measure_step_peak(model, batch, edges, compute_forces=False, compute_stress=False)
    assert full > 1.3 * forward
    # The backward pass alone, under the probe: its gradient buffers are seen (CPU autograd runs the
    # backward ops on this thread; the mode reaches autograd workers too).
    vec = edge_vectors(batch.positions, batch.cell, batch.system_index, edges).requires_grad_(True)
    energy = model.atomic_energies(batch.numbers, vec, edges).sum()
    with AllocationProbe() as probe:
        (grad,) = torch.autograd.grad(energy, vec)
    assert probe.allocations > 20
    assert probe.peak_bytes > 10 * grad.numel() * grad.element_size()


# ---------------------------------------------------------------------------- prediction and capacity
@pytest.mark.parametrize("dtype", DTYPES)
def test_fitted_model_predicts_held_out_peaks(request, dtype):
    model = _model(request, dtype)
    mm = fit_memory_model(model)
    assert fit_memory_model(model) is mm  # cached per (model, dtype, device)
    assert mm.bytes_per_atom > 0 and mm.bytes_per_edge > 0
    fit_sizes = {(s.atoms, s.edges) for s in measure_samples(model, default_probes())}
    for sample in measure_samples(model, _held_out()):
        assert (sample.atoms, sample.edges) not in fit_sizes
        predicted = mm.predict(sample.atoms, sample.edges)
        assert abs(predicted / sample.peak_bytes - 1.0) < 0.20, (sample, predicted)


def test_reference_model_prediction_float32():
    model = load_model("geodite-reference-random", dtype=torch.float32)
    mm = fit_memory_model(model)
    (sample,) = measure_samples(model, [[bulk("Cu", "fcc", 3.61, cubic=True) * (2, 2, 3)]])
    assert abs(mm.predict(sample.atoms, sample.edges) / sample.peak_bytes - 1.0) < 0.20


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target_atoms", [48, 160])
def test_capacity_from_budget_holds_in_a_real_step(request, dtype, target_atoms):
    model = _model(request, dtype)
    structures = [bulk("Cu", "fcc", 3.61, cubic=True), si_diamond(), mixed_oxide((1, 1, 1)),
                  bulk("NaCl", "rocksalt", 5.64, cubic=True)]
    # A budget (bytes) meant to admit about target_atoms of the densest structure with the default 20 % margin.
    mm, epa = fit_memory_model(model), edges_per_atom(model, structures)
    budget = mm.predict(target_atoms, target_atoms * epa) / 0.8
    cap = estimate_capacity(model, "cpu", probe=structures, memory_budget_bytes=budget).max_atoms
    assert cap < 256  # the budget is what limits here, not the CPU heuristic
    assert cap == memory_capacity(model, budget, structures)
    # The densest batch of whole structures that the scheduler could form within the capacity.
    dense = sorted(structures, key=lambda a: -edges_per_atom(model, [a]))
    chosen, n = [], 0
    while True:
        a = next((s for s in dense if n + len(s) <= cap), None)
        if a is None:
            break
        chosen.append(a)
        n += len(a)
    batch = Batch.from_atoms(chosen, dtype=dtype)
    peak = measure_step_peak(model, batch)
    assert peak <= budget
    assert peak > 0.5 * budget  # the capacity is not trivially small


def test_budget_caps_explicit_and_default_capacities(tiny32):
    structures = [si_diamond(), mixed_oxide((1, 1, 1))]
    mm, epa = fit_memory_model(tiny32), edges_per_atom(tiny32, structures)
    budget = mm.predict(100.5, 100.5 * epa) / 0.8  # bytes: 100 atoms with the default margin
    capped = estimate_capacity(tiny32, "cpu", max_atoms=100_000, probe=structures, memory_budget_bytes=budget)
    assert capped.max_atoms == memory_capacity(tiny32, budget, structures) == 100
    assert estimate_capacity(tiny32, "cpu", max_atoms=10, memory_budget_bytes=budget).max_atoms == 10
    assert estimate_capacity(tiny32, "cpu").max_atoms > 0  # no budget: CPU behaviour unchanged
    # run_md: CPU default unchanged without a budget; a budget caps it.
    assert _default_max_atoms(tiny32, structures, None, None) == 512
    assert _default_max_atoms(tiny32, structures, None, budget) == 100
    assert _default_max_atoms(tiny32, structures, 40, budget) == 40
    results = run_md(structures, tiny32, ensemble="nve", temperature=300.0, steps=2, progress=False,
                     memory_budget_bytes=budget)
    assert all(r.n_steps == 2 for r in results)


def test_md_restart_without_max_atoms_keeps_the_checkpointed_capacity(tmp_path, morse):
    # The default capacity may depend on free memory (CUDA); a restart must reuse the run's own value.
    structures = [bulk("Cu", "fcc", 3.61, cubic=True) * (2, 1, 1) for _ in range(3)]
    path = tmp_path / "run.h5"
    kw = dict(ensemble="nve", temperature=300.0, steps=6, trajectory=path, checkpoint_every=3, progress=False)
    first = run_md(structures, morse, max_atoms=40, **kw)
    again = run_md(structures, morse, restart=True, **kw)  # max_atoms=None: 512 would not match the checkpoint
    assert [r.n_steps for r in again] == [r.n_steps for r in first] == [6, 6, 6]
