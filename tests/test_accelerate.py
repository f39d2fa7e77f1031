"""geodite_sim.accelerate: padded static-shape step, torch.compile, CUDA-graph capture (emulated on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from conftest import mixed_structures, tiny_geodite

from geodite_sim.accelerate import (
    MODES,
    StaticStep,
    accelerated,
    bucket,
    cell_volumes,
    choose_mode,
    next_capacity,
)
from geodite_sim.batch import Batch
from geodite_sim.md import run_md
from geodite_sim.neighbors import neighbor_list

KEYS = ("energy", "forces", "stress")


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


def well_conditioned() -> list[Atoms]:
    """Structures with no bond near the ZBL envelope's edge (x = r / (r_cov,i + r_cov,j) ~ 1, where its
    float32 evaluation cancels catastrophically and kernels with other rounding disagree at 1e-4 relative)."""
    s = mixed_structures()
    wire = Atoms("Cu3", positions=[[0, 0, 0], [2.9, 0.3, 0.2], [0.4, 2.9, 1.2]], cell=[10, 10, 4.2],
                 pbc=[False, False, True])
    return [s[0], s[1], s[3], s[7], wire, Atoms("Fe", positions=[[1.0, 2.0, 3.0]])]


def make_batch(structs, dtype=torch.float64):
    batch = Batch.from_atoms(structs, dtype=dtype)
    return batch, neighbor_list(batch, 5.0)


def assert_matches(out, ref, atol=1e-10, rtol=0.0, keys=KEYS):
    for k in keys:
        assert out[k].shape == ref[k].shape, k
        torch.testing.assert_close(out[k], ref[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def model64():
    return tiny_geodite(torch.float64)


# ---------------------------------------------------------------------------------------------- eager
def test_padded_eager_equals_model(model64):
    """Energy, forces, stress and per-atom energies equal the plain model (float64) on mixed systems."""
    batch, edges = make_batch(varied_structures())
    ref = model64(batch, edges=edges, per_atom_energies=True)
    step = StaticStep(model64, "eager")
    out = step(batch, edges, per_atom_energies=True)
    assert_matches(out, ref, keys=KEYS + ("energies",))
    atoms, n_edges, systems = step.shapes
    assert atoms > batch.n_atoms and n_edges >= edges.sender.shape[0] and systems > batch.n_systems
    # atoms without neighbours (the last two systems) have E0 exactly, as in the model
    a = int(batch.offsets[-3])
    head = model64.decoder
    torch.testing.assert_close(out["energies"][a:], head.e0[batch.numbers[a:]] + head.e_shift, atol=0, rtol=0)
    # default neighbour list, energies only
    out2 = step(batch, compute_forces=False, compute_stress=False)
    assert set(out2) == {"energy"}
    torch.testing.assert_close(out2["energy"], ref["energy"], atol=1e-10, rtol=0)


def test_batch_padding_rows_are_ignored(model64):
    """A batch carrying its own padding rows (garbage positions, Z = 0): real rows match, padding rows are 0."""
    batch, edges = make_batch(mixed_structures(3)[:4])
    ref = model64(batch, edges=edges)
    n, pad = batch.n_atoms, 5
    padded = Batch(
        positions=torch.cat([batch.positions, torch.full((pad, 3), float("nan"), dtype=torch.float64)]),
        numbers=torch.cat([batch.numbers, torch.zeros(pad, dtype=torch.long)]),
        cell=batch.cell, pbc=batch.pbc,
        system_index=torch.cat([batch.system_index, torch.full((pad,), batch.n_systems - 1)]),
        offsets=batch.offsets,
        masses=torch.cat([batch.masses, torch.ones(pad, dtype=torch.float64)]),
    )
    out = StaticStep(model64, "eager")(padded, edges)
    assert out["forces"].shape == (n + pad, 3)
    assert torch.equal(out["forces"][n:], torch.zeros(pad, 3, dtype=torch.float64))
    torch.testing.assert_close(out["forces"][:n], ref["forces"], atol=1e-10, rtol=0)
    assert_matches(out, ref, keys=("energy", "stress"))


def test_bucket_changes(model64):
    """Growing and shrinking batches move to new buckets (with hysteresis); every result stays exact."""
    structs = varied_structures()
    step = StaticStep(model64, "eager", max_cached=2)
    shapes = []
    for systems in ([0, 1], [0, 1, 2], list(range(len(structs))), [5], [0, 1, 3]):
        batch, edges = make_batch([structs[i] for i in systems])
        assert_matches(step(batch, edges), model64(batch, edges=edges))
        shapes.append(step.shapes)
    assert shapes[0] == shapes[1]  # a small growth fits the bucket
    assert shapes[2] > shapes[1]  # a large one does not
    assert shapes[3] < shapes[2]  # a large shrink re-buckets
    assert step.n_builds == len(set(shapes)) and len(step._slots) <= 2
    # minimum capacities give one shape for everything
    fixed = StaticStep(model64, "eager", atom_capacity=512, edge_capacity=8192, system_capacity=32)
    for systems in ([0, 1], list(range(len(structs)))):
        batch, edges = make_batch([structs[i] for i in systems])
        assert_matches(fixed(batch, edges), model64(batch, edges=edges))
    assert fixed.n_builds == 1 and fixed.shapes == (512, 8192, 32)


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


def test_cell_volumes():
    cell = torch.randn(6, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(cell_volumes(cell), torch.linalg.det(cell).abs())


# ---------------------------------------------------------------------------------------------- modes
def test_choose_mode_and_cpu_errors(model64, morse):
    assert choose_mode("auto", "cpu") == "off"
    assert choose_mode("auto", "cuda") == "cuda_graph"
    assert choose_mode("compile", "cpu") == "compile" and set(MODES) == {"off", "eager", "compile", "cuda_graph"}
    with pytest.raises(ValueError, match="cuda_graph' needs a CUDA device"):
        choose_mode("cuda_graph", "cpu")
    with pytest.raises(ValueError, match="unknown acceleration mode"):
        choose_mode("fast", "cpu")
    with pytest.raises(ValueError, match="CUDA device"):
        StaticStep(model64, "cuda_graph")
    with pytest.raises(ValueError, match="CUDA device"):
        accelerated(model64, "cuda_graph")
    assert accelerated(model64, "auto") is model64 and accelerated(model64, "off") is model64
    assert isinstance(accelerated(model64, "eager"), StaticStep)
    assert accelerated(morse, "auto") is morse  # only Geodite models are wrapped
    with pytest.raises(TypeError, match="Geodite"):
        accelerated(morse, "eager")
    batch, _ = make_batch([bulk("Si", "diamond", 5.43)], dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        StaticStep(model64, "eager")(batch)
    batch = batch.to(dtype=torch.float64)
    with pytest.raises(ValueError, match="create_graph"):
        StaticStep(model64, "eager")(batch, create_graph=True)
    bad = Batch(**{**batch.__dict__, "numbers": torch.full_like(batch.numbers, 120)})
    with pytest.raises(ValueError, match="outside the model's range"):
        StaticStep(model64, "eager")(bad)


class EmulatedGraph:
    """CPU stand-in for CapturedStep: 'replay' re-runs the captured function on the same static buffers
    and copies its results into the outputs returned at capture, as a CUDA graph would."""

    captures = 0

    def __init__(self, fn, device):
        type(self).captures += 1
        self.fn = fn
        self.outputs = fn()

    def replay(self):
        for k, v in self.fn().items():
            self.outputs[k].copy_(v)


def test_graph_replay_logic_emulated(model64, monkeypatch):
    """The cuda_graph mode's buffer handling (copy_ into static inputs, replay, fresh outputs, re-capture on a
    bucket change) with the capture emulated on the CPU."""
    monkeypatch.setattr(EmulatedGraph, "captures", 0)
    step = StaticStep(model64, "eager")
    step.mode = "cuda_graph"
    step.graph_factory = EmulatedGraph
    structs = varied_structures()
    batch, edges = make_batch(structs[:6])
    first = step(batch, edges)
    assert_matches(first, model64(batch, edges=edges))
    kept = {k: v.clone() for k, v in first.items()}
    moved = batch.with_positions(batch.positions + 0.01 * torch.randn_like(batch.positions))
    second = step(moved, neighbor_list(moved, 5.0))
    assert_matches(second, model64(moved, edges=neighbor_list(moved, 5.0)))
    assert_matches(first, kept, atol=0)  # earlier results are not overwritten by the replay
    assert EmulatedGraph.captures == 1
    big, big_edges = make_batch(structs)
    assert_matches(step(big, big_edges), model64(big, edges=big_edges))
    assert EmulatedGraph.captures == 2
    assert_matches(step(moved, neighbor_list(moved, 5.0), compute_stress=False), second, keys=("energy", "forces"))
    assert EmulatedGraph.captures == 3  # other flags: another capture


def test_auto_falls_back_to_eager_when_capture_fails(model64, caplog):
    def failing(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    step = StaticStep(model64, "eager", fallback=True)
    step.mode = "cuda_graph"
    step.graph_factory = failing
    batch, edges = make_batch(mixed_structures()[:3])
    assert_matches(step(batch, edges), model64(batch, edges=edges))
    assert step.mode == "eager" and "continuing in 'eager' mode" in caplog.text
    strict = StaticStep(model64, "eager")
    strict.mode = "cuda_graph"
    strict.graph_factory = failing
    with pytest.raises(RuntimeError, match="capturing"):
        strict(batch, edges)


def test_compile_traces_and_matches(model64):
    """mode='compile' through dynamo + AOTAutograd (aot_eager backend: no code generation) equals eager."""
    torch._dynamo.reset()
    batch, edges = make_batch(varied_structures()[:6])
    step = StaticStep(model64, "compile", compile_options={"backend": "aot_eager"})
    assert_matches(step(batch, edges), model64(batch, edges=edges))
    moved = batch.with_positions(batch.positions + 0.01)
    assert_matches(step(moved, edges), model64(moved, edges=edges))


@pytest.mark.slow
def test_compile_inductor_cpu_float32():
    """torch.compile (inductor, CPU) of the padded step matches the eager padded step to 1e-5 in float32
    (absolute and relative; energies here are ~10 eV, forces up to ~0.1 eV/Å)."""
    torch._dynamo.reset()
    model = tiny_geodite(torch.float32, channels=8, layers=2)
    batch, edges = make_batch(well_conditioned(), dtype=torch.float32)
    ref = StaticStep(model, "eager")(batch, edges)
    step = StaticStep(model, "compile")
    for _ in range(2):
        out = step(batch, edges)
        assert_matches(out, ref, atol=1e-5, rtol=1e-5)  # eV, eV/Å, eV/Å^3
    assert step.n_builds == 1


# ---------------------------------------------------------------------------------------------- run_md
def test_run_md_accelerate(model64):
    """run_md's accelerate modes on the CPU: 'auto' and 'eager' run the runner's static-shape step (refills from
    the queue and re-packing as systems finish) and agree bit for bit; 'cuda_graph' on the CPU is refused. (The
    whole-step capture and torch.compile of the step are tested in tests/test_runner.py.)"""
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


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager():
    """On CUDA: captured-graph replays equal the eager padded step and the model (float64), across position
    updates and a bucket change, without host synchronisation on replay."""
    model = tiny_geodite(torch.float64).to("cuda")
    structs = varied_structures()
    eager = StaticStep(model, "eager")
    graph = StaticStep(model, "cuda_graph")
    assert accelerated(model, "auto").mode == "cuda_graph"
    batch = Batch.from_atoms(structs[:6], dtype=torch.float64, device="cuda")
    for k in range(3):
        moved = batch.with_positions(batch.positions + 0.01 * k)
        edges = neighbor_list(moved, model.cutoff)
        ref = model(moved, edges=edges)
        assert_matches(graph(moved, edges), eager(moved, edges), atol=1e-9)
        assert_matches(graph(moved, edges), ref, atol=1e-9)
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph(moved, edges)  # bucket known, inputs checked: copy_ + replay only
    finally:
        torch.cuda.set_sync_debug_mode("default")
    big = Batch.from_atoms(structs, dtype=torch.float64, device="cuda")
    edges = neighbor_list(big, model.cutoff)
    assert_matches(graph(big, edges), model(big, edges=edges), atol=1e-9)
    assert graph.n_builds == 2
