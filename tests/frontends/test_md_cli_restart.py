"""``geodite-sim md run --checkpoint-every K`` killed with SIGKILL at a random moment and re-run with ``--restart``:
the trajectory equals an uninterrupted run's bit for bit, with the packaged model in float32 (the default) and
float64. (The uninterrupted and the resuming runs go through ``cli.main`` in this process; the killed one is a
subprocess.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.io import write
from test_md import h5_arrays

REPO = Path(__file__).resolve().parents[2]


def _inputs(path: Path) -> Path:
    """Cells of several sizes (continuous batching: some finish and leave, queued ones start)."""
    cells = []
    for k, (reps, a0) in enumerate([((2, 1, 1), 3.61), ((1, 1, 1), 3.6), ((2, 2, 1), 3.63), ((1, 1, 2), 3.58),
                                    ((2, 1, 1), 3.62)]):
        a = bulk("Cu", "fcc", a0, cubic=True) * reps
        a.rattle(0.05, seed=k)
        cells.append(a)
    write(path, cells, format="extxyz")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_md_cli_sigkill_and_restart_is_bit_for_bit(tmp_path, dtype):
    from geodite_sim.cli import main

    inputs = _inputs(tmp_path / "cells.extxyz")

    def cmd(traj: Path) -> list[str]:
        return ["md", "run", str(inputs), "--temperature", "900", "1200", "600", "1500", "800", "--steps", "48",
                "--timestep", "2.0", "--trajectory", str(traj), "--frame-every", "4", "--checkpoint-every", "6",
                "--max-atoms", "40", "--device", "cpu", "--dtype", dtype, "--seed", "7", "--no-progress"]

    ref = tmp_path / "ref.h5"
    assert main(cmd(ref)) == 0
    run = tmp_path / "run.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "geodite_sim", *cmd(run)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = Path(str(run) + ".ckpt")
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    delay = float(np.random.default_rng().uniform(0.0, 1.0))
    time.sleep(delay)
    interrupted = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and interrupted, f"the run finished before it could be killed ({delay:.2f} s)"
    assert main([*cmd(run), "--restart"]) == 0
    a, b = h5_arrays(ref), h5_arrays(run)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), (k, f"killed {delay:.2f} s after the first checkpoint")
