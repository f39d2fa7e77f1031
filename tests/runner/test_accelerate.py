"""geodite_sim.accelerate (capacity buckets) and the runner's acceleration modes through run_md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import fcc111
from conftest import mixed_structures, tiny_geodite

from geodite_sim.accelerate import bucket, next_capacity
from geodite_sim.md import run_md


def varied_structures() -> list[Atoms]:
    """Bulk, triclinic, molecules, a slab (pbc T T F), a wire (F F T), an isolated atom, a split pair."""
    structs = mixed_structures()
    slab = fcc111("Al", (2, 2, 2), vacuum=4.0)  # pbc (True, True, False)
    slab.rattle(0.02, seed=1)
    wire = Atoms("Cu3", positions=[[0, 0, 0], [2.4, 0.3, 0.2], [0.4, 2.3, 1.2]], cell=[10, 10, 3.7],
                 pbc=[False, False, True])
    isolated = Atoms("Fe", positions=[[1.0, 2.0, 3.0]])
    pair = Atoms("NaCl", positions=[[0, 0, 0], [9.0, 0, 0]])  # farther apart than the cutoff: two lone atoms
    return structs + [slab, wire, isolated, pair]


@pytest.fixture(scope="module")
def model64():
    return tiny_geodite(torch.float64)


def test_bucket_arithmetic():
    prev = 0
    for n in range(1, 5000, 7):
        b = bucket(n)
        assert n <= b <= max(16, n * 1.125 + 1) and b >= prev
        prev = b
    assert bucket(3, minimum=256) == 256 and bucket(1024) == 1024 and bucket(1025) == 1152
    assert next_capacity(900, 1024, 1, 1 / 16, 0.5) == 1024  # fits: kept
    assert next_capacity(1030, 1024, 1, 1 / 16, 0.5) == bucket(1095) == 1152  # grows with headroom
    assert next_capacity(300, 1024, 1, 1 / 16, 0.5) == bucket(319)  # shrinks


# ---------------------------------------------------------------------------------------------- run_md
def test_run_md_accelerate(model64):
    """run_md's accelerate modes on the CPU: 'auto' and 'eager' run the runner's static-shape step (refills from
    the queue and re-packing as systems finish) and agree bit for bit; 'cuda_graph' on the CPU is refused. (The
    whole-step capture and torch.compile of the step are tested in tests/runner/test_runner.py.)"""
    structs = varied_structures()[:8]
    kw = dict(ensemble="nve", temperature=300.0, timestep=1.0, steps=[3, 5, 4, 6, 3, 5, 6, 4], max_atoms=10,
              progress=False, monitors=False)
    ref = run_md(structs, model64, accelerate="auto", **kw)
    out = run_md(structs, model64, accelerate="eager", **kw)
    for a, b in zip(ref, out):
        assert a.error is None and b.n_steps == a.n_steps
        np.testing.assert_array_equal(b.final.positions, a.final.positions)
        np.testing.assert_array_equal(b.final.get_momenta(), a.final.get_momenta())
    with pytest.raises(ValueError, match="CUDA device"):
        run_md(structs[:1], model64, accelerate="cuda_graph", **{**kw, "steps": 1})
