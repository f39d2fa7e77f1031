"""Ctrl-C: one line, exit status 130, checkpoint first; ``md info`` shows the run as interrupted at its last step;
re-running the same command resumes (issue 27, item 6)."""

from __future__ import annotations

import os
import re
import signal

import pytest
from ase.build import bulk
from ase.io import write

from geodite_sim.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _cu(seed):
    a = bulk("Cu", "fcc", 3.61, cubic=True)
    a.rattle(0.05, seed=seed)
    return a


def test_md_run_ctrl_c_checkpoints_then_resumes(tmp_path, monkeypatch, capsys):
    import geodite_sim.md as md

    monkeypatch.chdir(tmp_path)
    write("a.extxyz", _cu(0))
    write("b.extxyz", _cu(1))
    argv = ["md", "run", "a.extxyz", "b.extxyz", "--temperature", "300", "--steps", "30", "--timestep", "1.0",
            "--trajectory", "run.h5", "--frame-every", "5", "--checkpoint-every", "5", "--restart", "--no-progress",
            "--max-atoms", "64", "--threads", "1"]
    at_check = md._MDJob.at_check
    calls = []

    def ctrl_c_at_the_12th_check(self, runner, host):
        calls.append(1)
        if len(calls) == 12:
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, delivered to this (main) thread
        return at_check(self, runner, host)

    monkeypatch.setattr(md._MDJob, "at_check", ctrl_c_at_the_12th_check)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    m = re.fullmatch(r"interrupted after (\d+) of 60 steps; re-run the same command to resume from the checkpoint",
                     lines[0]) if len(lines) == 1 else None
    assert m, err
    assert os.path.exists("run.h5.ckpt")

    assert main(["md", "info", "run.h5"]) == 0
    rows = [ln.split("\t") for ln in capsys.readouterr().out.splitlines() if "\t" in ln]
    assert [r[5] for r in rows] == ["interrupted", "interrupted"]
    steps = int(m.group(1)) // 2  # both systems stopped at the same step, the one of the last check
    assert 5 < steps < 30 and [r[3] for r in rows] == [f"{steps} steps"] * 2

    monkeypatch.setattr(md._MDJob, "at_check", at_check)
    assert main(argv) == 0  # the same command resumes from the checkpoint and finishes
    out = capsys.readouterr().out
    assert "2 input(s): 2 done, 0 failed" in out
    main(["md", "info", "run.h5"])
    rows = [ln.split("\t") for ln in capsys.readouterr().out.splitlines() if "\t" in ln]
    assert [r[3] for r in rows] == ["30 steps", "30 steps"] and [r[5] for r in rows] == ["done", "done"]


def test_md_run_without_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    import geodite_sim.md as md

    monkeypatch.chdir(tmp_path)
    write("a.extxyz", _cu(0))
    at_check = md._MDJob.at_check

    def ctrl_c(self, runner, host):
        os.kill(os.getpid(), signal.SIGINT)
        return at_check(self, runner, host)

    monkeypatch.setattr(md._MDJob, "at_check", ctrl_c)
    rc = main(["md", "run", "a.extxyz", "--temperature", "300", "--steps", "10", "--no-progress",
               "--max-atoms", "64", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err
    assert "cannot be resumed" in err and "--checkpoint-every" in err


def test_relax_ctrl_c_one_line_and_resume(tmp_path, monkeypatch, capsys):
    from geodite_sim.store import ResultStore

    monkeypatch.chdir(tmp_path)
    for k in range(4):
        write(f"s{k}.extxyz", _cu(k))
    argv = ["relax", *[f"s{k}.extxyz" for k in range(4)], "--out", "out", "--max-steps", "5", "--threads", "1",
            "--no-progress"]
    put = ResultStore.put
    puts = []

    def ctrl_c_after_two(self, *a, **k):
        done = put(self, *a, **k)
        puts.append(1)
        if len(puts) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the others relax
        return done

    monkeypatch.setattr(ResultStore, "put", ctrl_c_after_two)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("interrupted")] == [
        "interrupted after 2 of 4 structures; re-run the same command to resume"], err
    monkeypatch.setattr(ResultStore, "put", put)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "relaxed 2 new structure(s)" in out and "skipped 2 already done" in out
