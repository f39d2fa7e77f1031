"""The result store (geodite_sim.store): keys by input position, resume, no-op re-runs, fingerprints,
reading while a job writes, and what a SIGKILL in the middle of a write leaves behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from ase.build import bulk
from ase.io import read

from geodite_sim.pair_potential import MorsePotential
from geodite_sim.store import ResultStore, StoreLocked, StoreMismatch, model_fingerprint, read_records


@dataclass
class Rec:
    index: int
    name: str
    energy: float | None = None


def snapshot(d: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir()) if p.is_file()}


def test_duplicates_are_distinct_records_and_round_trip(tmp_path):
    a = bulk("Cu", "fcc", 3.6)
    with ResultStore(tmp_path, Rec, {"fmax": 0.05}) as store:
        for i, name in enumerate(["a.cif", "a.cif", "a.cif", "b.cif"]):  # same file three times
            assert store.put(Rec(i, name, -1.0 * i), "relax", a if i != 2 else None)
        assert not store.put(Rec(1, "again", 5.0), "relax", a)  # a stored key is never written twice
        assert store.put(Rec(1, "other stream", 0.0), "candidate")  # keys are (kind, index)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 5
    store = ResultStore.open_readonly(tmp_path, Rec)
    assert [r.name for r in store.records("relax")] == ["a.cif", "a.cif", "a.cif", "b.cif"]
    assert store.records("relax")[1].energy == -1.0 and store.done("relax") == {0, 1, 2, 3}
    assert store.get("candidate", 1).name == "other stream"
    assert len(read(tmp_path / "structures.extxyz", ":")) == 3
    s = store.structure("relax", 3)
    assert (s.positions == a.positions).all() and store.structure("relax", 2) is None


def test_rerun_of_a_finished_job_is_a_noop(tmp_path):
    with ResultStore(tmp_path, Rec, {"fmax": 0.05}) as store:
        for i in range(3):
            store.put(Rec(i, f"s{i}"), "relax", bulk("Cu", "fcc", 3.6 + 0.1 * i))
    before = snapshot(tmp_path)
    time.sleep(0.01)
    with ResultStore(tmp_path, Rec, {"fmax": 0.05}) as store:
        assert store.done("relax") == {0, 1, 2}
        for i in range(3):  # a re-run offers the same results again
            assert not store.put(Rec(i, f"s{i}"), "relax", bulk("Cu", "fcc", 3.6 + 0.1 * i))
    assert snapshot(tmp_path) == before  # nothing rewritten, truncated or touched


def test_fingerprint_mismatch_is_refused(tmp_path, morse):
    with ResultStore(tmp_path, Rec, {"fmax": 0.05, "max_steps": 500}, model=morse) as store:
        store.put(Rec(0, "x"), "relax")
    with pytest.raises(StoreMismatch, match=r"fmax: 0\.05 -> 0\.02"):
        ResultStore(tmp_path, Rec, {"fmax": 0.02, "max_steps": 500}, model=morse)
    other = MorsePotential(epsilon=0.4, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)
    assert model_fingerprint(other) != model_fingerprint(morse)
    with pytest.raises(StoreMismatch, match="model: "):
        ResultStore(tmp_path, Rec, {"fmax": 0.05, "max_steps": 500}, model=other)
    with ResultStore(tmp_path, Rec, {"max_steps": 500, "fmax": 0.05}, model=morse) as store:  # key order is irrelevant
        assert store.done("relax") == {0}


def test_one_writer_at_a_time(tmp_path):
    with ResultStore(tmp_path, Rec, {}):
        with pytest.raises(StoreLocked):
            ResultStore(tmp_path, Rec, {})
        assert ResultStore.open_readonly(tmp_path, Rec).records() == []  # readers are always welcome


def test_truncated_last_line_is_ignored_by_readers_and_repaired_by_the_writer(tmp_path):
    with ResultStore(tmp_path, Rec, {}) as store:
        store.put(Rec(0, "a"), "relax", bulk("Cu", "fcc", 3.6))
        store.put(Rec(1, "b"), "relax")
    good_records = (tmp_path / "records.jsonl").stat().st_size
    good_xyz = (tmp_path / "structures.extxyz").stat().st_size
    with open(tmp_path / "structures.extxyz", "a") as f:  # a structure written just before the kill
        f.write('1\nLattice="3 0 0 0 3 0 0 0 3" Properties=species:S:1:pos:R:3\nCu 0 0')
    with open(tmp_path / "records.jsonl", "a") as f:  # its record cut mid-write
        f.write('{"kind":"relax","index":2,"na')
    assert [r["index"] for r in read_records(tmp_path / "records.jsonl")] == [0, 1]  # reader: no change to files
    assert (tmp_path / "records.jsonl").stat().st_size > good_records
    with ResultStore(tmp_path, Rec, {}) as store:
        assert store.done("relax") == {0, 1}
        assert (tmp_path / "records.jsonl").stat().st_size == good_records
        assert (tmp_path / "structures.extxyz").stat().st_size == good_xyz
        store.put(Rec(2, "c"), "relax", bulk("Al", "fcc", 4.05))
    assert len(read(tmp_path / "structures.extxyz", ":")) == 2
    assert [r["index"] for r in read_records(tmp_path / "records.jsonl")] == [0, 1, 2]


WRITER = """
import sys, time
from dataclasses import dataclass
from ase.build import bulk
from geodite_sim.store import ResultStore

@dataclass
class Rec:
    index: int
    name: str
    energy: float | None = None

store = ResultStore(sys.argv[1], Rec, {"job": "kill-test"})
i = len(store)
while True:
    store.put(Rec(i, "x" * 2000, float(i)), "relax", bulk("Cu", "fcc", 3.6) * (3, 3, 3))
    i += 1
"""


def test_reading_while_writing_and_sigkill_mid_write(tmp_path):
    """A writer appends as fast as it can; a reader follows it; SIGKILL at a random moment; the store opens,
    drops at most the cut tail, and the writer continues from the next index."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env)
    seen = []
    deadline = time.time() + 60
    try:
        while time.time() < deadline and len(seen) < 40:
            recs = read_records(tmp_path / "records.jsonl")  # while the writer runs
            assert [r["index"] for r in recs] == list(range(len(recs)))
            assert len(recs) >= len(seen)
            seen = recs
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(seen) >= 40
    with ResultStore(tmp_path, Rec, {"job": "kill-test"}) as store:
        n = len(store)
        assert n >= len(seen) and store.done("relax") == set(range(n))
        assert store.structure("relax", n - 1).get_chemical_formula() == "Cu27"
        store.put(Rec(n, "after", 1.0), "relax", bulk("Al", "fcc", 4.05))
    frames = read(tmp_path / "structures.extxyz", ":")
    assert len(frames) == n + 1 and frames[-1].get_chemical_formula() == "Al"
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == list(range(n + 1))


def test_importing_the_package_and_executors_does_not_import_ray():
    code = ("import sys, geodite_sim, geodite_sim.store, geodite_sim.executors, geodite_sim.commands.relax; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
