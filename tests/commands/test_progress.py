"""Progress bars with totals and an ETA wherever the total is known (issue 27, item 5): relax (structures), md run
(systems x steps), evaluate (structures; it had no bar)."""

from __future__ import annotations

import re

import pytest
from ase.build import bulk
from ase.io import write

from geodite_sim.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def three_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = []
    for k in range(3):
        a = bulk("Cu", "fcc", 3.61, cubic=True)
        a.rattle(0.02, seed=k)
        write(f"c{k}.extxyz", a)
        names.append(f"c{k}.extxyz")
    return names


def _bar(err: str, desc: str) -> str:
    """The last refresh of the tqdm bar labelled ``desc`` on stderr."""
    frames = [f for f in re.split(r"[\r\n]", err) if f.startswith(desc)]
    assert frames, err
    return frames[-1]


def test_relax_bar_has_total_and_eta(three_files, capsys):
    assert main(["relax", *three_files, "--out", "out", "--max-steps", "3"]) == 0
    bar = _bar(capsys.readouterr().err, "relax")
    assert "3/3" in bar and "<" in bar, bar  # done/total and tqdm's elapsed<remaining


def test_md_run_bar_counts_system_steps_of_all_inputs(three_files, capsys):
    assert main(["md", "run", *three_files, "--temperature", "300", "--steps", "4", "--max-atoms", "64"]) == 0
    bar = _bar(capsys.readouterr().err, "md nvt_nhc")
    assert "12/12" in bar and "<" in bar, bar


def test_evaluate_has_a_bar(three_files, capsys):
    assert main(["evaluate", *three_files]) == 0
    bar = _bar(capsys.readouterr().err, "evaluate")
    assert "3/3" in bar, bar
    main(["evaluate", *three_files, "--no-progress"])
    assert "evaluate:" not in capsys.readouterr().err
