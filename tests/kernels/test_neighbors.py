"""Neighbour lists: every backend against ASE, the Triton kernel under the interpreter, edge cases,
the Verlet skin, and model energies independent of the backend that built the edges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from geodite_sim import neighbors as nb
from geodite_sim.batch import Batch
from geodite_sim.model.geodite import Edges

CPU_BACKENDS = ("torch", "alchemiops-naive", "alchemiops-cell")


# ---------------------------------------------------------------------------------------------- helpers
def random_system(rng: np.random.Generator, cutoff: float, max_atoms: int = 300) -> Atoms:
    """A random system: 1..max_atoms atoms, skewed (<= 30 deg) triclinic cell of either handedness,
    often thinner than half the cutoff, mixed pbc, unwrapped positions, vacuum and zero rows along
    non-periodic axes."""
    u = rng.random()
    lo, hi = (1, 5) if u < 0.25 else (5, 61) if u < 0.7 else (61, max_atoms + 1)
    n = int(rng.integers(min(lo, max_atoms), min(hi, max_atoms + 1)))
    u = rng.random()
    if u < 0.45:
        pbc = np.ones(3, bool)
    elif u < 0.6:
        pbc = np.zeros(3, bool)
    else:
        pbc = rng.random(3) < 0.5
        if pbc.all() or not pbc.any():
            a = int(rng.integers(3))
            pbc[a] = not pbc[a]
    lengths = (n * rng.uniform(8.0, 25.0)) ** (1 / 3) * rng.uniform(0.6, 1.6, 3)
    if pbc.any() and rng.random() < 0.4:  # thin cell: width below half the cutoff
        axis = int(rng.choice(np.flatnonzero(pbc)))
        thin = rng.uniform(0.15, 0.5) * cutoff
        others = [a for a in range(3) if a != axis]
        lengths[others] *= np.sqrt(lengths[axis] / thin)
        lengths[axis] = thin
    rows = []
    for a in range(3):
        e = np.eye(3)[a]
        theta = np.deg2rad(rng.uniform(0, 30))
        w = rng.normal(size=3)
        w -= w.dot(e) * e
        rows.append(lengths[a] * (np.cos(theta) * e + np.sin(theta) * w / np.linalg.norm(w)))
    cell = np.array(rows)
    if rng.random() < 0.25:
        cell[rng.integers(3)] *= -1  # left-handed
    if rng.random() < 0.5:
        cell = cell @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
    frac = rng.random((n, 3))
    for a in range(3):
        if pbc[a]:  # unwrapped: atoms up to two cells outside
            jump = rng.random(n) < 0.5
            frac[jump, a] += rng.integers(-2, 3, int(jump.sum()))
        else:  # vacuum: atoms beyond the cell along non-periodic axes
            frac[:, a] = rng.uniform(-0.3, 1.3, n)
    pos = frac @ cell
    if not pbc.any() and rng.random() < 0.4:
        cell = np.zeros((3, 3))
    else:
        for a in range(3):
            if not pbc[a] and rng.random() < 0.3:
                cell[a] = 0.0
    return Atoms(numbers=rng.integers(1, 60, n), positions=pos, cell=cell, pbc=pbc)


def ase_reference(atoms_list: list[Atoms], cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """ASE pairs of all systems as rows (receiver, sender, S0, S1, S2) in batch numbering, and distances."""
    keys, dists, offset = [], [], 0
    for atoms in atoms_list:
        i, j, S, d = ase_neighbor_list("ijSd", atoms, cutoff)
        keys.append(np.column_stack([i + offset, j + offset, S]))
        dists.append(d)
        offset += len(atoms)
    return np.concatenate(keys).astype(np.int64), np.concatenate(dists)


def run_backend(batch: Batch, cutoff: float, backend: str) -> Edges:
    if backend == "alchemiops-cell":
        return nb._alchemiops_backend(nb.wrap_batch(batch, cutoff), cutoff, "batch_cell_list")
    if backend == "alchemiops-naive":
        return nb._alchemiops_backend(nb.wrap_batch(batch, cutoff), cutoff, "batch_naive")
    return nb.neighbor_list(batch, cutoff, backend)


def edge_lengths(batch: Batch, edges: Edges) -> np.ndarray:
    pos = batch.positions.detach().cpu().double().numpy()
    cell = batch.cell.detach().cpu().double().numpy()
    snd, rcv, sh = (t.cpu().numpy() for t in edges)
    sys = batch.system_index.cpu().numpy()[rcv]
    vec = pos[snd] - pos[rcv] + np.einsum("ei,eij->ej", sh.astype(float), cell[sys])
    return np.sqrt((vec * vec).sum(1))


def assert_matches_ase(batch: Batch, edges: Edges, ref: tuple[np.ndarray, np.ndarray]) -> None:
    """Exactly ASE's pair set (i, j, S); distances to 1e-10 Å; int64, on the batch's device, receiver-sorted."""
    for t in edges:
        assert t.dtype == torch.long and t.device == batch.device
    assert edges.shifts.shape == (edges.sender.shape[0], 3)
    rcv = edges.receiver.cpu().numpy()
    assert np.all(np.diff(rcv) >= 0), "edges are not receiver-sorted"
    ours = np.column_stack([rcv, edges.sender.cpu().numpy(), edges.shifts.cpu().numpy()])
    theirs, ref_d = ref
    o1, o2 = np.lexsort(ours.T[::-1]), np.lexsort(theirs.T[::-1])
    if ours.shape != theirs.shape or not np.array_equal(ours[o1], theirs[o2]):
        a = {tuple(r) for r in ours.tolist()}
        b = {tuple(r) for r in theirs.tolist()}
        sysi = batch.system_index.cpu().numpy()
        bad = sorted({int(sysi[r[0]]) for r in (a ^ b)})
        raise AssertionError(f"{len(a - b)} extra and {len(b - a)} missing pairs, in systems {bad[:10]}")
    np.testing.assert_allclose(edge_lengths(batch, edges)[o1], ref_d[o2], rtol=0, atol=1e-10)


def padded(batch: Batch, extra: int) -> Batch:
    """The same batch with ``extra`` padding rows (positions on top of real atoms, so they would pair)."""
    n = batch.n_atoms
    idx = torch.arange(extra) % n
    pad = lambda t, fill: torch.cat([t, fill])  # noqa: E731
    return Batch(
        positions=pad(batch.positions, batch.positions[idx] + 0.1),
        numbers=pad(batch.numbers, torch.zeros(extra, dtype=torch.long)),
        cell=batch.cell,
        pbc=batch.pbc,
        system_index=pad(batch.system_index, torch.full((extra,), batch.n_systems - 1)),
        offsets=batch.offsets,
        masses=pad(batch.masses, torch.ones(extra, dtype=batch.masses.dtype)),
    )


#: The Triton backend on CPU needs Triton's interpreter, which must be on before triton is imported:
#: these tests run in-process when pytest was started with TRITON_INTERPRET=1, otherwise in the
#: subprocess of ``test_triton_tests_under_interpreter``.
INTERPRETED = nb.backend_available("triton", "cpu")
SKIP_REASON = "needs TRITON_INTERPRET=1 before triton is imported; run by test_triton_tests_under_interpreter"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason=SKIP_REASON)


def test_triton_tests_under_interpreter():
    """Run this module's Triton tests in a fresh interpreter with TRITON_INTERPRET=1."""
    if INTERPRETED:
        pytest.skip("Triton's interpreter is active in this process: the Triton tests run here")
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x", "-p", "no:cacheprovider",
           "-k", "triton and not under_interpreter"]
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    summary = res.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "deselected" in summary, tail


# ---------------------------------------------------------------------------------------------- ASE sweep
N_BATCHES, PER_BATCH = 8, 40  # 320 random systems, cutoffs 3..8 Å


@pytest.fixture(scope="module")
def random_batches():
    """(batch, cutoff, ASE reference) for 8 batches of 40 random systems, cutoffs 3 .. 8 Å."""
    rng = np.random.default_rng(20240611)
    out = []
    for cutoff in np.linspace(3.0, 8.0, N_BATCHES):
        atoms = [random_system(rng, cutoff) for _ in range(PER_BATCH)]
        batch = Batch.from_atoms(atoms, dtype=torch.float64)
        out.append((batch, float(cutoff), ase_reference(atoms, cutoff)))
    return out


def test_random_systems_cover_hard_cases(random_batches):
    thin = mixed = unwrapped = left = vacuum = single = 0
    for batch, cutoff, _ in random_batches:
        geo = nb.wrap_batch(batch, cutoff)
        thin += int((geo.n_images > 2).any(1).sum())
        mixed += int((batch.pbc.any(1) & ~batch.pbc.all(1)).sum())
        unwrapped += int((geo.image != 0).any(1).sum())
        left += int((torch.linalg.det(batch.cell) < 0).sum())
        vacuum += int((~batch.pbc.any(1)).sum())
        single += int((batch.atoms_per_system == 1).sum())
    assert N_BATCHES * PER_BATCH >= 300
    assert min(thin, mixed, left, vacuum, single) >= 10 and unwrapped >= 1000


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_ase_on_random_systems(random_batches, backend):
    for batch, cutoff, ref in random_batches:
        assert_matches_ase(batch, run_backend(batch, cutoff, backend), ref)


@needs_interpreter
def test_triton_interpreted_matches_ase():
    """The Triton kernel on CPU (TRITON_INTERPRET=1): thin cells, mixed pbc, unwrapped, non-periodic."""
    rng = np.random.default_rng(7)
    for cutoff in (3.0, 5.5, 8.0):
        atoms = [random_system(rng, cutoff, max_atoms=40) for _ in range(14)]
        batch = Batch.from_atoms(atoms, dtype=torch.float64)
        assert nb.resolve_backend("triton", "cpu") == "triton"
        assert_matches_ase(batch, nb.neighbor_list(batch, cutoff, "triton"), ase_reference(atoms, cutoff))


@pytest.mark.slow
def test_backends_match_ase_sweep():
    """600 more random systems, 10 cutoffs from 3 to 8 Å, every CPU backend."""
    rng = np.random.default_rng(99)
    for cutoff in np.linspace(3.0, 8.0, 10):
        atoms = [random_system(rng, cutoff) for _ in range(60)]
        batch = Batch.from_atoms(atoms, dtype=torch.float64)
        ref = ase_reference(atoms, cutoff)
        for backend in CPU_BACKENDS:
            assert_matches_ase(batch, run_backend(batch, float(cutoff), backend), ref)


def test_kernel_compiles_for_cuda_without_a_gpu():
    """The interpreter is lenient: compile the kernel to an sm_90 cubin too (no GPU needed)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    from geodite_sim.kernels.neighbor_list import BLOCK_I, BLOCK_J, _neighbor_kernel, interpreter_active

    if interpreter_active():
        pytest.skip("Triton's interpreter is active: kernels are not compiled")
    ptrs = ["pos", "cell", "nimg", "image", "offsets", "block_sys", "block_start", "counts", "row_ptr", "sender",
            "receiver", "shift", "cutoff2"]
    types = ["*fp64", "*fp64"] + ["*i64"] * 5 + ["*i32"] + ["*i64"] * 4 + ["*fp64"]
    sig = {f"{p}_ptr": t for p, t in zip(ptrs, types)} | {k: "constexpr" for k in ("FILL", "BLOCK_I", "BLOCK_J")}
    for fill in (False, True):
        src = ASTSource(_neighbor_kernel, sig, constexprs={"FILL": fill, "BLOCK_I": BLOCK_I, "BLOCK_J": BLOCK_J})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert len(compiled.asm["cubin"]) > 0 and "st.local" not in compiled.asm["ptx"]


# ---------------------------------------------------------------------------------------------- edge cases
def edge_case_systems() -> list[Atoms]:
    rng = np.random.default_rng(3)
    return [
        Atoms("Cu", positions=[[0.3, 0.2, 0.1]], cell=np.diag([2.1, 2.4, 2.7]), pbc=True),  # self images
        Atoms("Cu", positions=[[0.3, 0.2, 0.1]], cell=np.zeros((3, 3)), pbc=False),  # no edges
        Atoms("H2", positions=[[0, 0, 0], [9, 0, 0]], pbc=False),  # no neighbours
        Atoms("SiO2", positions=rng.random((3, 3)) * 3, cell=[[3, 0, 0], [0, -3.2, 0], [0.4, 0, 3.1]], pbc=True),
        Atoms("Fe", positions=[[1.0, 5.0, -7.0]], cell=[[1.1, 0, 0], [0, 8, 0], [0, 0, 0]], pbc=[True, False, False]),
        Atoms("C2", positions=[[0, 0, 0], [0.7, 0.7, 0.7]], cell=[[1.5, 0.2, 0], [0, 1.6, 0], [0, 0, 10]],
              pbc=[True, True, False]),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS + ("alchemiops", "triton"))
def test_edge_cases(backend):
    if backend == "triton" and not INTERPRETED:
        pytest.skip(SKIP_REASON)
    atoms = edge_case_systems()
    cutoff = 5.0
    batch = Batch.from_atoms(atoms, dtype=torch.float64)
    edges = run_backend(batch, cutoff, backend)
    assert_matches_ase(batch, edges, ase_reference(atoms, cutoff))
    per_system = torch.bincount(batch.system_index[edges.receiver], minlength=batch.n_systems)
    assert per_system[0] > 0 and (edges.sender[edges.receiver == 0] == 0).all()  # only self images
    assert per_system[1] == 0 and per_system[2] == 0
    assert torch.linalg.det(batch.cell[3]) < 0 and per_system[3] > 0
    assert per_system[4] == 8  # 1D chain of 1.1 Å: its own images +-1..4 within 5 Å
    # padding rows after offsets[-1] are ignored
    padded_edges = run_backend(padded(batch, 7), cutoff, backend)
    for a, b in zip(edges, padded_edges):
        assert torch.equal(a, b)


def test_padding_only_batch_tail_ignored_by_auto():
    atoms = [bulk("Cu", "fcc", a=3.6, cubic=True), molecule("H2O")]
    batch = Batch.from_atoms(atoms, dtype=torch.float64)
    ref = ase_reference(atoms, 4.0)
    assert_matches_ase(batch, nb.neighbor_list(padded(batch, 11), 4.0), ref)


def test_auto_backend_and_errors():
    assert nb.resolve_backend("auto", "cpu") == "alchemiops"
    with pytest.raises(ValueError):
        nb.neighbor_list(Batch.from_atoms([molecule("H2O")]), 3.0, backend="nope")
    with pytest.raises(ValueError, match="degenerate"):
        bad = Atoms("H", positions=[[0, 0, 0]], cell=[[1, 0, 0], [2, 0, 0], [0, 0, 1]], pbc=True)
        nb.neighbor_list(Batch.from_atoms([bad], dtype=torch.float64), 3.0, "torch")


def test_float32_batch():
    atoms = [bulk("NaCl", "rocksalt", a=5.64) * (2, 2, 2), molecule("CH4")]
    batch = Batch.from_atoms(atoms, dtype=torch.float32)
    ref = nb.neighbor_list(batch.to(dtype=torch.float64), 5.0, "torch")
    for backend in ("torch", "alchemiops"):
        e = nb.neighbor_list(batch, 5.0, backend)
        assert e.sender.dtype == torch.long and e.sender.numel() == ref.sender.numel()


def test_alchemiops_regrows_instead_of_truncating(monkeypatch):
    atoms = [bulk("Cu", "fcc", a=3.6) * (3, 3, 3)]
    batch = Batch.from_atoms(atoms, dtype=torch.float64)
    monkeypatch.setattr(nb._AlchemiopsCapacity, "width", {"cpu": 2})
    assert_matches_ase(batch, nb.neighbor_list(batch, 6.0, "alchemiops"), ase_reference(atoms, 6.0))
    assert nb._AlchemiopsCapacity.width["cpu"] >= 78  # fcc Cu has 78 neighbours within 6 Å


@needs_interpreter
def test_triton_edge_buffer_reuse_and_regrow():
    from geodite_sim.kernels.neighbor_list import EdgeBuffer, triton_neighbor_list

    atoms = [bulk("Cu", "fcc", a=3.6) * (2, 2, 2), molecule("H2O")]
    batch = Batch.from_atoms(atoms, dtype=torch.float64)
    buf = EdgeBuffer()
    buf.reserve(10, batch.device)
    geo = nb.wrap_batch(batch, 5.0)
    s1, r1, sh1 = triton_neighbor_list(geo.wrapped, geo.cell, geo.n_images, geo.image, geo.offsets, 5.0, out=buf)
    assert buf.n_regrows == 1 and buf.capacity >= s1.numel() > 10
    s2, r2, sh2 = triton_neighbor_list(geo.wrapped, geo.cell, geo.n_images, geo.image, geo.offsets, 5.0, out=buf)
    assert buf.n_regrows == 1 and torch.equal(s1, s2) and torch.equal(sh1, sh2)  # deterministic order
    assert_matches_ase(batch, Edges(s2, r2, sh2), ase_reference(atoms, 5.0))


# ---------------------------------------------------------------------------------------------- Verlet skin
def _edge_set(edges: Edges) -> set:
    return set(zip(edges.receiver.tolist(), edges.sender.tolist(), map(tuple, edges.shifts.tolist())))


# ---------------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def model_and_batch():
    from geodite_sim.model import load_model

    model = load_model(dtype=torch.float64)
    rng = np.random.default_rng(5)
    nacl = bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)
    nacl.rattle(0.05, rng=rng)
    si = bulk("Si", "diamond", a=5.43)
    si.positions += rng.normal(scale=0.05, size=si.positions.shape) + [6.0, -5.0, 0.0]  # unwrapped
    slab = Atoms("Cu4", positions=rng.random((4, 3)) * [2.5, 2.5, 5], cell=[[2.6, 0, 0], [0.5, 2.6, 0], [0, 0, 0]],
                 pbc=[True, True, False])
    batch = Batch.from_atoms([nacl, si, molecule("CH3CH2OH"), slab], dtype=torch.float64)
    reference = model(batch, edges=nb.neighbor_list(batch, model.cutoff, "torch"))
    return model, batch, reference


def _assert_same_outputs(out: dict, ref: dict) -> None:
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-10, msg=key)


def test_model_energies_do_not_depend_on_backend(model_and_batch):
    model, batch, ref = model_and_batch
    assert torch.isfinite(ref["energy"]).all() and ref["forces"].abs().max() > 0
    _assert_same_outputs(model(batch, edges=run_backend(batch, model.cutoff, "alchemiops-cell")), ref)
    _assert_same_outputs(model(batch), ref)  # the model's own neighbour list: auto = alchemiops on CPU


@needs_interpreter
def test_model_energies_with_triton_edges(model_and_batch):
    model, batch, ref = model_and_batch
    _assert_same_outputs(model(batch, edges=nb.neighbor_list(batch, model.cutoff, "triton")), ref)
