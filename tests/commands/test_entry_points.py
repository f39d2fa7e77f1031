"""Python API and command-line edges a new user hits (issue 27, items 10 and 11): ``load_model(device="auto")``,
a missing CUDA device, torch-sim models passed as they are, abbreviated and mistyped options, one quiet flag, and
messages that name the user's file."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io import write

import geodite_sim as gs
from geodite_sim.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _leaves(parser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaves(child)


# ------------------------------------------------------------------------------------------- item 10: devices
def test_load_model_auto_device():
    model = gs.load_model(device="auto")
    assert torch.device(model.device).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    from geodite_sim.devices import DeviceError

    with pytest.raises(DeviceError, match="CUDA is not available on this machine"):
        gs.load_model(device="cuda")
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        gs.load_model(device="gpu")


# ------------------------------------------------------------------------------------------- item 10: arguments
def test_abbreviations_refused_typos_get_the_subcommand_usage(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:  # --temp is not --temperature
        main(["md", "run", "x.cif", "--temp", "300", "--steps", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: geodite-sim md run" in err and "--temp" in err
    with pytest.raises(SystemExit) as exc:  # a typo: the relax usage, not the top-level one
        main(["relax", "x.cif", "--out", "o", "--fmx", "0.1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "usage: geodite-sim relax" in err and "unrecognized arguments: --fmx 0.1" in err
    with pytest.raises(SystemExit):
        main(["phonons", "x.cif", "--out", "o", "--super", "2", "2", "2"])
    assert "usage: geodite-sim phonons" in capsys.readouterr().err


def test_one_quiet_flag_everywhere():
    """Every sub-command that draws a progress bar takes --no-progress (screen's old --quiet still works)."""
    from geodite_sim.cli import build_parser

    parser = build_parser()
    with_bars = {"evaluate", "relax", "run", "screen", "phonons", "eos", "elastic", "diatomics", "campaign", "demo"}
    for p in _leaves(parser):
        name = p.prog.split()[-1]
        if name in with_bars:
            assert "--no-progress" in p._option_string_actions, p.prog
        assert "--quiet" not in p.format_help(), p.prog
    args = parser.parse_args(["screen", "c.cif", "--references", "r.cif", "--out", "o", "--quiet"])
    assert args.no_progress


def test_cli_messages_name_the_file(tmp_path, monkeypatch, capsys):
    """A bad frame read from a file is reported with the file's name, not ``0:Cu2``."""
    from ase import Atoms

    monkeypatch.chdir(tmp_path)
    write("close.extxyz", Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0.3]], cell=[5, 5, 5], pbc=True))
    write("good.extxyz", bulk("Cu", "fcc", 3.61, cubic=True))
    rc = main(["relax", "good.extxyz", "close.extxyz", "--out", "out", "--max-steps", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    line = next(ln for ln in out.splitlines() if "atoms too close" in ln)
    assert "close.extxyz: atoms too close" in line and "1:Cu2" not in line
    rc = main(["md", "run", "good.extxyz", "close.extxyz", "--temperature", "300", "--steps", "2",
               "--no-progress", "--max-atoms", "64"])
    out = capsys.readouterr().out
    assert rc == 1
    line = next(ln for ln in out.splitlines() if "atoms too close" in ln)
    assert "\tclose.extxyz\t" in line and "close.extxyz: atoms too close" in line and "1:Cu2" not in line


# ------------------------------------------------------------------------------------------- item 11: torch-sim
def test_torchsim_model_passed_as_it_is():
    """A torch-sim ModelInterface given as the model runs behind TorchSimAdapter (was: every structure failed with
    "'Batch' object has no attribute 'system_idx'")."""
    from torch_sim.models.lennard_jones import LennardJonesModel

    from geodite_sim.model import TorchSimAdapter

    def lj():
        return LennardJonesModel(sigma=2.3, epsilon=0.05, cutoff=5.0, dtype=torch.float64, compute_stress=True)

    atoms = [bulk("Cu", "fcc", 3.61, cubic=True), bulk("Cu", "fcc", 3.7)]
    raw, wrapped = lj(), TorchSimAdapter(lj())
    e_raw = gs.evaluate(atoms, raw)
    e_ref = gs.evaluate(atoms, wrapped)
    assert all(r["error"] is None for r in e_raw)
    np.testing.assert_allclose([r["energy"] for r in e_raw], [r["energy"] for r in e_ref], rtol=0, atol=1e-12)
    r_raw = gs.relax_many(atoms, raw, max_steps=5, progress=False)
    r_ref = gs.relax_many(atoms, wrapped, max_steps=5, progress=False)
    assert [r.error for r in r_raw] == [None, None]
    np.testing.assert_allclose([r.energy for r in r_raw], [r.energy for r in r_ref], rtol=0, atol=1e-12)
    md = gs.run_md(atoms[:1], raw, ensemble="nve", temperature=100.0, steps=3, progress=False)
    assert md[0].error is None and md[0].n_steps == 3
