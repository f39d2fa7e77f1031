"""Shared fixtures: models (reference checkpoint, tiny random Geodite, Morse) and structures."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.constraints import FixAtoms, FixSymmetry
from ase.spacegroup import crystal
from threadpoolctl import threadpool_limits

from geodite_sim.model import Geodite, GeoditeConfig, load_model
from geodite_sim.model.checkpoint import prepare_for_inference
from geodite_sim.pair_potential import MorsePotential

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
SSE = REPO / "workflows" / "sse"


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core, at most 4): one intra-op thread per worker
    (torch, BLAS and the subprocesses tests start), so N workers on N cores do not oversubscribe them. An
    explicit ``OMP_NUM_THREADS`` is respected."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        threadpool_limits(1)


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


# ------------------------------------------------------------------- shared by tests in several folders
# Cu-like Morse parameters (FIRE+constraints comparisons, the SSE campaign's cheap model).
MORSE = dict(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)


def relax_set() -> list[tuple[str, Atoms, bool]]:
    """(name, Atoms with constraints, relax_cell) for the FIRE comparison (Cu-like Morse)."""
    rng = np.random.default_rng(9)
    out = []
    fcc = bulk("Cu", "fcc", 3.75, cubic=True)
    fcc.set_cell(fcc.cell[:] @ np.diag([1.0, 1.0, 1.04]), scale_atoms=True)  # tetragonal, I4/mmm
    hcp = bulk("Cu", "hcp", 2.6, c=4.6)
    bct = Atoms("Cu2", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5)], cell=np.diag([2.9, 2.9, 3.3]), pbc=True)
    rut = crystal(["Cu", "Cu"], basis=[(0, 0, 0), (0.28, 0.28, 0)], spacegroup=136,
                  cellpar=[4.3, 4.3, 2.7, 90, 90, 90])
    pnma = crystal(["Cu"], basis=[(0.12, 0.25, 0.08)], spacegroup=62, cellpar=[4.6, 2.6, 4.4, 90, 90, 90])
    for name, a in [("fcc_tetragonal", fcc), ("hcp", hcp), ("bct", bct), ("rutile_Cu", rut), ("pnma_Cu", pnma)]:
        a = a.copy()
        a.set_constraint(FixSymmetry(a))
        out.append((name + "_sym", a, True))
    sup = bulk("Cu", "fcc", 3.66, cubic=True) * (2, 1, 1)
    sup.rattle(0.05, seed=int(rng.integers(1 << 30)))
    sup.set_constraint(FixAtoms([0, 3]))
    out.append(("fcc_fixatoms_cell", sup, True))
    slab = fcc111("Cu", (2, 2, 3), a=3.66, vacuum=5.0)
    slab.rattle(0.05, seed=3)
    slab.set_constraint(FixAtoms(mask=slab.positions[:, 2] < slab.positions[:, 2].min() + 0.1))
    out.append(("slab_fixatoms", slab, False))
    free = bulk("Cu", "fcc", 3.7, cubic=True)
    free.rattle(0.05, seed=4)
    out.append(("free", free, True))
    return out


def builder():
    """The SSE example's structure builder (workflows/sse/build_structures.py) as a module."""
    spec = importlib.util.spec_from_file_location("sse_build_structures", SSE / "build_structures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quiet(_msg: str) -> None:
    pass


def tiny_spec(tmp_path: Path, steps: int = 60, **md) -> dict:
    """Three Morse runs on 8- and 10-atom cells; max_atoms = 18 makes the third run wait for a free slot."""
    from ase.io import write

    b = builder()
    write(tmp_path / "CuI_8.extxyz", b.build("CuI", (1, 1, 1)))
    write(tmp_path / "Bi2O3_10.extxyz", b.build("Bi2O3", (1, 1, 1)))
    return {
        "campaign": {"name": "tiny", "model": "morse", "model_options": MORSE, "dtype": "float64", "seed": 3},
        "md": {"steps": steps, "checkpoint_every": 20, "max_atoms": 18, **md},
        "analysis": {"discard_fs": 15.0},
        "material": [
            {"name": "CuI", "structure": "CuI_8.extxyz", "temperatures": [500, 900], "mobile": "Cu"},
            {"name": "Bi2O3", "structure": "Bi2O3_10.extxyz", "temperatures": [600], "mobile": "O"},
        ],
    }


def sheared_cu() -> Atoms:
    """A sheared, strained, rattled 4-atom fcc Cu cell (the optimisers' step-by-step traces against ASE)."""
    atoms = bulk("Cu", "fcc", 3.7, cubic=True) * (2, 1, 1)
    atoms.set_cell(atoms.cell[:] @ np.array([[1.0, 0.03, 0.0], [0.03, 0.97, 0.0], [0.0, 0.0, 1.02]]), scale_atoms=True)
    atoms.rattle(0.08, seed=5)
    return atoms


def evaluate_relax_state(model, state, cell: bool):
    """An optimiser state with the model's energy, forces and stress at its positions, convergence flags set
    (fmax 1e-9: nothing converges, so a trace runs every step)."""
    from dataclasses import replace

    from geodite_sim.dynamics.optimizer import relax_converged
    from geodite_sim.neighbors import neighbor_list

    b = state.batch
    out = model(b, edges=neighbor_list(b, model.cutoff, "torch"), compute_forces=True, compute_stress=True)
    return relax_converged(replace(state, energy=out["energy"], forces=out["forces"], stress=out["stress"]),
                           fmax=1e-9, max_steps=1000, cell=cell)
