"""relax_many: batch invariance, continuous batching, failure handling, streaming, the CLI and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.io import read, write
from conftest import tiny_geodite

import geodite_sim as gs
from geodite_sim.pair_potential import MorsePotential
from geodite_sim.progress import Progress
from geodite_sim.relax import estimate_capacity

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def copper_like(n: int, seed: int = 0) -> list[Atoms]:
    """``n`` varied small structures (1-16 atoms) with nearest neighbours near the Morse fixture's r0 = 2.55 Å.

    Prototypes fcc/bcc/hcp/sc/diamond/rocksalt/CsCl, supercells, random strain (some triclinic) and
    rattles; every 8th is a slab (pbc T, T, F) and every 16th a small cluster, which never relax the cell.
    """
    rng = np.random.default_rng(seed)
    nn = 2.55
    protos = [
        lambda: bulk("Cu", "fcc", nn * 2**0.5),
        lambda: bulk("Cu", "fcc", nn * 2**0.5, cubic=True),
        lambda: bulk("Fe", "bcc", nn * 2 / 3**0.5, cubic=True),
        lambda: bulk("Mg", "hcp", nn),
        lambda: bulk("Po", "sc", nn) * (2, 1, 1),
        lambda: bulk("Si", "diamond", nn * 4 / 3**0.5),
        lambda: bulk("NaCl", "rocksalt", 2 * nn),
        lambda: bulk("CsCl", "cesiumchloride", nn * 2 / 3**0.5) * (1, 1, 2),
    ]
    out = []
    for k in range(n):
        atoms = protos[k % len(protos)]()
        if rng.random() < 0.3 and len(atoms) <= 4:
            atoms = atoms * (2, 1, 1)
        strain = 0.02 * rng.standard_normal((3, 3))
        if k % 5 == 0:
            strain += 0.03 * rng.standard_normal((3, 3))  # triclinic
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        if k % 8 == 7:
            atoms = atoms * (1, 1, 2)
            atoms.pbc = (True, True, False)
            atoms.center(vacuum=3.0, axis=2)
        if k % 16 == 15:
            atoms = Atoms("Cu4", positions=nn * np.array([[0, 0, 0], [1, 0, 0], [0.5, 0.87, 0], [0.5, 0.29, 0.82]]))
        atoms.numbers[:] = 29  # one species: the contact check uses covalent radii
        atoms.rattle(0.04, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def compare(a: gs.RelaxResult, b: gs.RelaxResult) -> None:
    n = len(a.structure)
    assert a.error == b.error, (a.error, b.error)
    assert a.n_steps == b.n_steps, (a.label, a.n_steps, b.n_steps)
    assert a.converged == b.converged
    assert a.relax_cell == b.relax_cell
    assert abs(a.energy - b.energy) / n < 1e-6
    assert np.abs(a.structure.positions - b.structure.positions).max() < 1e-4
    assert np.abs(a.structure.cell[:] - b.structure.cell[:]).max() < 1e-4


# ---------------------------------------------------------------------------------------------- batching
def test_batch_invariance_64_structures(morse):
    """64 structures relaxed together (small capacity with many refills; everything at once with a coarse
    check interval) give each the result of relaxing it alone; cell relaxation mixed per structure."""
    structures = copper_like(64)
    relax_cell = [k % 3 != 1 for k in range(64)]
    kw = dict(fmax=0.05, max_steps=200, relax_cell=relax_cell, progress=False)
    alone = gs.relax_many(structures, morse, max_systems=1, **kw)
    refill = gs.relax_many(structures, morse, max_atoms=40, check_interval=1, **kw)
    at_once = gs.relax_many(structures, morse, max_atoms=100_000, check_interval=7, **kw)
    assert [r.index for r in refill] == list(range(64)) == [r.index for r in at_once]
    assert sum(r.converged for r in alone) >= 56
    assert sum(r.relax_cell for r in alone) > 20
    for a, b, c, s, rc in zip(alone, refill, at_once, structures, relax_cell):
        assert a.relax_cell == (rc and bool(s.pbc.all()))
        compare(a, b)
        compare(a, c)
        if not a.relax_cell:
            assert np.array_equal(a.structure.cell[:], s.cell[:])


def test_oversized_structure_runs_alone(morse):
    """A structure larger than max_atoms still runs (alone) instead of failing."""
    big = bulk("Cu", "fcc", 3.6, cubic=True) * (2, 2, 1)
    big.rattle(0.03, seed=1)
    small = bulk("Cu", "fcc", 3.6)
    res = gs.relax_many([small, big, small], morse, max_atoms=8, progress=False, relax_cell=False)
    assert [r.error for r in res] == [None] * 3 and all(r.converged for r in res)


def test_stream_yields_in_completion_order_and_consumes_lazily(morse):
    consumed = []

    def gen() -> Iterator[Atoms]:
        for k in range(200):
            consumed.append(k)
            a = bulk("Cu", "fcc", 3.6) * (2, 1, 1)
            a.rattle(0.02 * (1 + k % 3), seed=k)
            yield a

    results = gs.relax_many(gen(), morse, max_atoms=8, stream=True, progress=False)
    assert isinstance(results, Iterator)
    first = next(results)
    assert len(consumed) <= 6  # 4 systems in flight + the one waiting for a place
    results.close()
    assert first.index < 5

    big = bulk("Cu", "fcc", 3.6, cubic=True) * (2, 2, 2)
    big.rattle(0.05, seed=0)
    out = list(gs.relax_many([big, bulk("Cu", "fcc", 3.6)], morse, stream=True, progress=False, relax_cell=False,
                             max_atoms=64))
    assert sorted(r.index for r in out) == [0, 1]
    assert out[0].index == 1  # the 1-atom cell has zero force and finishes first


def test_output_types_follow_input(morse, tmp_path):
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = bulk("Cu", "fcc", 3.65)
    path = tmp_path / "cu.cif"
    write(path, atoms)
    structure = AseAtomsAdaptor.get_structure(bulk("Cu", "fcc", 3.55))
    res = gs.relax_many([atoms, str(path), structure], morse, progress=False)
    assert isinstance(res[0].structure, Atoms) and isinstance(res[1].structure, Atoms)
    assert type(res[2].structure).__name__ == "Structure"
    assert all(r.converged for r in res)
    assert res[1].label == str(path)
    # the relaxed Atoms carry the final energy, forces and stress
    assert res[0].structure.get_potential_energy() == pytest.approx(res[0].energy)
    assert res[0].stress.shape == (3, 3) and res[0].forces.shape == (1, 3)
    # a cell relaxation lowers the stress below the fmax-equivalent scale
    assert np.abs(res[0].stress).max() * res[0].structure.get_volume() < 0.05 * 3


def test_relax_cell_callable_and_molecules(morse):
    mol = Atoms("Cu3", positions=[[0, 0, 0], [2.6, 0, 0], [1.2, 2.1, 0]], cell=[8, 8, 8], pbc=False)
    crystal = bulk("Cu", "fcc", 3.7)
    res = gs.relax_many([mol, crystal, crystal], morse, relax_cell=lambda a: a.get_volume() < 100, progress=False)
    assert [r.relax_cell for r in res] == [False, True, True]
    assert np.array_equal(res[0].structure.cell[:], mol.cell[:])
    assert res[1].structure.get_volume() != pytest.approx(crystal.get_volume())
    res = gs.relax_many([crystal], morse, relax_cell=False, progress=False)
    assert np.array_equal(res[0].structure.cell[:], crystal.cell[:]) and res[0].n_steps == 0


# ---------------------------------------------------------------------------------------------- failures
class FaultyModel(torch.nn.Module):
    """Morse, except: NaN output for systems containing Xe, an exception for any batch containing Rn."""

    def __init__(self, inner: MorsePotential):
        super().__init__()
        self.inner = inner
        self.cutoff, self.dtype, self.device = inner.cutoff, inner.dtype, inner.device
        self.calls = 0

    def forward(self, batch, edges=None, compute_forces=True, compute_stress=True):
        self.calls += 1
        z = batch.numbers[: batch.n_atoms]
        if (z == 86).any():
            raise RuntimeError("radon is not supported by this potential")
        out = self.inner(batch, edges=edges, compute_forces=compute_forces, compute_stress=compute_stress)
        xe_sys = torch.zeros(batch.n_systems, dtype=torch.bool).index_fill_(
            0, batch.system_index[: batch.n_atoms][z == 54], True)
        out["energy"] = torch.where(xe_sys, float("nan"), out["energy"])
        out["forces"] = torch.where(xe_sys[batch.system_index[: batch.n_atoms], None], float("nan"), out["forces"])
        return out


def test_failures_are_isolated_and_reported(morse, tmp_path):
    good = []
    for k in range(4):
        a = bulk("Cu", "fcc", 3.6, cubic=True)
        a.rattle(0.05, seed=k)
        good.append(a)
    nan_struct = bulk("Cu", "fcc", 3.6, cubic=True)
    nan_struct.numbers[1] = 54
    raising = bulk("Cu", "fcc", 3.6, cubic=True)
    raising.numbers[2] = 86
    close = Atoms("Cu2", positions=[[0, 0, 0], [0.5, 0, 0]], cell=[4, 4, 4], pbc=True)
    blow_up = bulk("Cu", "fcc", 2.3, cubic=True)  # nearest neighbours 1.63 Å: expands past 3 V0
    unsupported = Atoms("Og2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[5, 5, 5], pbc=True)
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("this is not a CIF file\n")
    inputs = [good[0], nan_struct, good[1], raising, close, blow_up, Atoms(), good[2], unsupported,
              str(garbage), str(tmp_path / "missing.cif"), 42, good[3]]
    model = FaultyModel(morse)
    res = gs.relax_many(inputs, model, max_steps=200, max_atoms=16, progress=False)
    assert len(res) == len(inputs) and [r.index for r in res] == list(range(len(inputs)))
    expected = {1: "non-finite", 3: "radon is not supported", 4: "atoms too close", 5: "volume blow-up",
                6: "empty structure", 8: "unsupported element", 9: "could not read", 10: "file not found",
                11: "unsupported input type"}
    for i, r in enumerate(res):
        if i in expected:
            assert r.error is not None and expected[i] in r.error, (i, r.error)
            assert not r.converged and r.failed and not r.status.ok
        else:
            assert r.error is None and r.converged, (i, r.error)
    assert "atoms 0 (Cu) and 1 (Cu) are 0.500 Å apart" in res[4].error
    # the good structures are unaffected by their neighbours (same as relaxed alone)
    for g, r in zip(good, (res[0], res[2], res[7], res[12])):
        compare(r, gs.relax_many([g], morse, max_steps=200, progress=False)[0])


def test_volume_collapse_and_disabled_checks(morse):
    stretched = bulk("Cu", "fcc", 4.4, cubic=True)
    res = gs.relax_many([stretched], morse, max_volume_ratio=1.5, progress=False)[0]
    assert res.error is not None and "volume collapse" in res.error
    res = gs.relax_many([stretched], morse, max_volume_ratio=None, progress=False)[0]
    assert res.error is None and res.converged
    close = Atoms("Cu2", positions=[[0, 0, 0], [1.0, 0, 0]], cell=[6, 6, 6], pbc=False)
    res = gs.relax_many([close], morse, min_distance_factor=None, max_steps=5, progress=False)[0]
    assert res.error is None


def test_not_converged_is_not_an_error(morse):
    a = bulk("Cu", "fcc", 3.6, cubic=True) * (2, 1, 1)
    a.rattle(0.1, seed=0)
    r = gs.relax_many([a], morse, max_steps=3, progress=False)[0]
    assert r.error is None and not r.converged and r.n_steps == 3 and r.status == "not_converged"


# ---------------------------------------------------------------------------------------------- helpers
def test_progress_counts_and_summary(capsys):
    bar = Progress(total=3, desc="relax", unit="structure", enabled=True, outcomes=("converged", "failed"))
    bar.set_active(2)
    bar.finish("converged")
    bar.finish("converged")
    bar.finish("failed")
    bar.close()
    assert bar.done == 3 and bar.counts["converged"] == 2 and bar.counts["failed"] == 1
    assert "3 structures" in bar.summary() and "2 converged, 1 failed" in bar.summary()
    off = Progress(enabled=False)
    off.finish("x")
    assert off.as_dict()["x"] == 1


def test_estimate_capacity_cpu(morse):
    assert estimate_capacity(morse, "cpu", max_atoms=123).max_atoms == 123
    assert estimate_capacity(morse, "cpu").max_atoms > 0


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from geodite_sim.model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    save_checkpoint(tiny_geodite(torch.float32), path)
    return path


def _cli(*args, **kw) -> subprocess.Popen:
    """``geodite-sim relax ARGS`` in a new process (for the tests that kill it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "geodite_sim", "relax", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _main(capsys, *args) -> tuple[int, str]:
    """``geodite-sim relax ARGS`` through ``geodite_sim.cli.main`` in this process (no interpreter start-up):
    the exit code and stdout + stderr."""
    from geodite_sim.cli import main

    capsys.readouterr()
    try:
        rc = main(["relax", *map(str, args)])
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_cli_duplicate_inputs_are_kept_and_a_rerun_is_a_noop(tmp_path, tiny_checkpoint, capsys):
    """``relax a.cif a.cif b.cif``: three rows and three structures; the re-run keeps all of them and
    rewrites nothing (this used to lose a row and cut relaxed.extxyz from 3 structures to 1)."""
    a, b = tmp_path / "a.cif", tmp_path / "b.cif"
    write(a, bulk("Cu", "fcc", 3.65))
    write(b, bulk("Al", "fcc", 4.0))
    out = tmp_path / "out"
    args = [a, a, b, "--out", out, "--model", tiny_checkpoint, "--dtype", "float64", "--max-steps", "3",
            "--no-progress"]
    rc, stdout = _main(capsys, *args)
    assert rc == 0 and "3 structures:" in stdout, stdout
    table = json.loads((out / "results.json").read_text())
    assert [r["input"] for r in table] == [0, 1, 2] and [r["path"] for r in table] == [str(a), str(a), str(b)]
    assert len(read(out / "relaxed.extxyz", ":")) == 3
    assert table[0]["energy"] == table[1]["energy"]
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}
    rc, stdout = _main(capsys, *args)
    assert rc == 0 and "relaxed 0 new structure(s)" in stdout and "skipped 3 already done" in stdout, stdout
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()} == files
    assert len(read(out / "relaxed.extxyz", ":")) == 3
    # other settings or other inputs at a stored position are refused, and nothing is touched
    rc, stdout = _main(capsys, *args[:-1], "--fmax", "0.01", "--no-progress")
    assert rc == 2 and "fmax: 0.05 -> 0.01" in stdout, stdout
    rc, stdout = _main(capsys, b, a, *args[2:])
    assert rc == 2 and "inputs differ" in stdout, stdout
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()} == files


def test_cli_kill_and_resume(tmp_path, tiny_checkpoint, capsys):
    """Kill the CLI process mid-run (SIGKILL), run it again: every input exactly once, no duplicate structures.
    (The resuming run goes through ``cli.main`` in this process: the same code, one start-up less.)"""
    inputs = tmp_path / "in"
    inputs.mkdir()
    n_expected = 0
    for k in range(10):
        a = bulk(["Cu", "Al", "Ni", "Ag", "Pd"][k % 5], "fcc", 3.6 + 0.05 * k, cubic=k % 2 == 0)
        a.rattle(0.05, seed=k)
        write(inputs / f"s{k:02d}.cif", a)
        n_expected += 1
    frames = [bulk("NaCl", "rocksalt", 5.5 + 0.1 * k) for k in range(3)]
    for f in frames:
        f.rattle(0.05, seed=1)
    write(inputs / "multi.extxyz", frames)
    n_expected += 3
    (inputs / "bad.cif").write_text("garbage\n")
    n_expected += 1
    out = tmp_path / "out"
    args = [inputs, "--out", out, "--model", tiny_checkpoint, "--dtype", "float64", "--max-atoms", "8",
            "--max-steps", "60", "--no-progress"]
    proc = _cli(*args)
    records = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and records.read_text().count("\n") >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the first run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_first = records.read_text().count("\n")
    assert 4 <= done_first < n_expected

    rc, stdout = _main(capsys, *args)
    assert rc == 1, stdout  # bad.cif failed (reported), the others ran: exit code 1
    assert f"skipped {done_first} already done" in stdout
    table = json.loads((out / "results.json").read_text())
    keys = [r["key"] for r in table]
    assert len(keys) == n_expected == len(set(keys))
    assert [r["input"] for r in table] == list(range(n_expected))
    assert sum(r["error"] is not None for r in table) == 1
    frames_out = read(out / "relaxed.extxyz", ":")
    frame_keys = [f.info["key"] for f in frames_out]
    assert len(frame_keys) == len(set(frame_keys)) == n_expected - 1
    assert set(frame_keys) == {r["key"] for r in table if r["error"] is None}
    csv_rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == n_expected + 1
    assert "converged" in stdout and "failed" in stdout


def test_cli_example_structures(tmp_path, tiny_checkpoint, capsys):
    """Every example structure reads and runs; the table lists them all."""
    files = sorted((REPO / "examples" / "structures").iterdir())
    assert 30 <= len(files) <= 60
    rc, stdout = _main(capsys, *files, "--out", tmp_path / "demo", "--model", tiny_checkpoint, "--max-steps", "2",
                       "--no-progress")
    assert rc == 0, stdout
    table = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert len(table) == len(files)
    assert all(r["error"] is None for r in table), [r["error"] for r in table if r["error"]]
    assert all(2 <= r["n_atoms"] <= 40 for r in table)
    assert f"{len(files)} structures:" in stdout
