"""Per-run lists (temperatures, steps, pressures) vs structures: one to one, a sweep of one structure, or refused
before anything runs (issue 27, item 1)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.io import write

from geodite_sim import run_md
from geodite_sim.trajectory import trajectory_systems

pytestmark = pytest.mark.usefixtures("one_thread")


def cu(seed: int = 0):
    a = bulk("Cu", "fcc", 3.61, cubic=True)
    a.rattle(0.02, seed=seed)
    return a


def test_match_runs_rules():
    from geodite_sim.io.runs import match_runs

    a, b = cu(0), cu(1)
    assert match_runs([a, b], {"temperature": 300.0}) == ([a, b], None)
    assert match_runs([a, b], {"temperature": [300, 600]})[1] == 2
    runs, n = match_runs(a, {"temperature": [300, 600, 900]})  # one structure, three temperatures: a sweep
    assert n == 3 and runs == [a, a, a]
    runs, n = match_runs(iter([a]), {"temperature": np.array([300.0, 600.0])})  # a lazy stream of one
    assert n == 2 and len(runs) == 2
    runs, n = match_runs((x for x in [a, b]), {"temperature": [300, 600]})
    assert n == 2 and runs == [a, b]
    with pytest.raises(ValueError, match="temperature has 3 values but 2 structures were given"):
        match_runs([a, b], {"temperature": [300, 600, 900]})
    with pytest.raises(ValueError, match="temperature has 2 values but 3 structures"):
        match_runs([a, b, a], {"temperature": [300, 600]})
    with pytest.raises(ValueError, match="more than 2 structures"):
        match_runs((x for x in [a, b, a, b]), {"temperature": [300, 600]})
    with pytest.raises(ValueError, match="different lengths"):
        match_runs([a], {"temperature": [300, 600], "steps": [10, 20, 30]})


def test_run_md_sweeps_one_structure(morse, tmp_path):
    """N temperatures x 1 structure = N runs, each at its temperature (was: one run at the first value)."""
    path = tmp_path / "sweep.h5"
    res = run_md(cu(), morse, temperature=[300.0, 600.0, 900.0], steps=4, timestep=1.0, trajectory=path,
                 frame_every=2, progress=False)
    assert [r.index for r in res] == [0, 1, 2] and all(r.error is None for r in res)
    assert [r.n_steps for r in res] == [4, 4, 4]
    targets = [round(d["temperature_K"]) for d in trajectory_systems(path)]
    assert targets == [300, 600, 900]


def test_run_md_refuses_mismatch_before_running(morse):
    """Fewer (or more) temperatures than structures: refused before any system runs (was: the missing ones failed
    after the others had run)."""
    seen = []

    def stream():
        for k in range(3):
            seen.append(k)
            yield cu(k)

    with pytest.raises(ValueError, match="temperature has 2 values but 3 structures"):
        run_md([cu(0), cu(1), cu(2)], morse, temperature=[300.0, 600.0], steps=3, progress=False)
    with pytest.raises(ValueError, match="steps has 2 values"):
        run_md([cu(0), cu(1), cu(2)], morse, temperature=300.0, steps=[3, 4], progress=False)
    with pytest.raises(ValueError, match="more than 2 structures"):
        run_md(stream(), morse, temperature=[300.0, 600.0], steps=3, progress=False)
    assert seen == [0, 1, 2]  # read ahead to count, nothing simulated


def test_cli_temperature_sweep_and_refusal(tmp_path, capsys, monkeypatch):
    """``md run CuI.extxyz --temperature 500 700 900`` (the --help example) runs three systems; two files with
    three temperatures are a usage error before the model is even loaded."""
    from geodite_sim.cli import main

    monkeypatch.chdir(tmp_path)
    write("one.extxyz", cu(0))
    write("two.extxyz", cu(1))
    common = ["--model", "geodite-mini", "--steps", "2", "--timestep", "1.0", "--no-progress", "--max-atoms", "64"]
    assert main(["md", "run", "one.extxyz", "--temperature", "500", "700", "900", *common]) == 0
    out = capsys.readouterr().out
    lines = [ln.split("\t") for ln in out.splitlines() if "\t" in ln]
    assert [ln[1] for ln in lines] == ["one.extxyz"] * 3
    assert [ln[0] for ln in lines] == ["0", "1", "2"] and all(ln[2].startswith("2 steps") for ln in lines)
    assert "3 input(s): 3 done, 0 failed" in out

    import geodite_sim.model as model_module

    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exc:
        main(["md", "run", "one.extxyz", "two.extxyz", "--temperature", "500", "700", "900", *common])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: geodite-sim md run" in err and "temperature has 3 values but 2 structures" in err
