"""Shared fixtures: models (reference checkpoint, tiny random Geodite, Morse) and structures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from threadpoolctl import threadpool_limits

from geodite_sim.model import Geodite, GeoditeConfig, load_model
from geodite_sim.model.checkpoint import prepare_for_inference
from geodite_sim.pair_potential import MorsePotential

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread (torch and BLAS) for a module of small problems, restored afterwards: on a shared
    2-core machine tiny matrices run fastest on one thread, with no spin contention. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


def tiny_geodite(dtype: torch.dtype = torch.float64, seed: int = 0, channels: int = 16, layers: int = 2) -> Geodite:
    """A small randomly initialised Geodite (fast; smooth; for engine tests, not physics)."""
    torch.manual_seed(seed)
    model = Geodite(GeoditeConfig(hidden_channels=channels, num_layers=layers, num_heads=2, cutoff=5.0))
    with torch.no_grad():
        model.decoder.e0.uniform_(-3.0, -1.0)
    return prepare_for_inference(model, "cpu", dtype)


@pytest.fixture(scope="session")
def reference_model_fp64() -> Geodite:
    """The official-format conformance checkpoint (random weights), float64."""
    return load_model("geodite-reference-random", dtype=torch.float64)


@pytest.fixture(scope="session")
def reference_model_fp32() -> Geodite:
    return load_model("geodite-reference-random", dtype=torch.float32)


@pytest.fixture()
def tiny_model() -> Geodite:
    return tiny_geodite()


@pytest.fixture()
def morse() -> MorsePotential:
    """Morse potential roughly fitted to Cu (r0 = 2.55 Å)."""
    return MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)


@pytest.fixture(scope="session")
def reference_outputs() -> dict:
    return json.loads((DATA / "reference_outputs.json").read_text())["results"]


def reference_atoms(entry: dict) -> Atoms:
    return Atoms(numbers=entry["numbers"], positions=entry["positions"], cell=entry["cell"], pbc=entry["pbc"])


def mixed_structures(seed: int = 0) -> list[Atoms]:
    """A handful of small, varied structures (bulk, triclinic, molecule, slab-like), rattled."""
    rng = np.random.default_rng(seed)
    structs = [
        bulk("Si", "diamond", 5.43),
        bulk("NaCl", "rocksalt", 5.64),
        bulk("Cu", "fcc", 3.61) * (2, 1, 1),
        bulk("Mg", "hcp", 3.21),
        bulk("CsCl", "cesiumchloride", 4.12),
        molecule("H2O"),
        molecule("CH4"),
    ]
    tri = bulk("Al", "fcc", 4.05)
    tri.set_cell(tri.cell[:] @ (np.eye(3) + 0.05 * rng.standard_normal((3, 3))), scale_atoms=True)
    structs.append(tri)
    for a in structs:
        a.rattle(0.03, seed=int(rng.integers(1 << 30)))
    return structs
