"""Start-up of the command line and the fused-kernel build cache (issue 14, first-run experience)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torch_sim", "warp", "nvalchemiops", "pymatgen", "matplotlib", "h5py", "sevenn", "ray", "phonopy")


def test_parser_and_package_import_no_heavy_library():
    """Building every sub-command's parser (what ``--help`` does) and ``import geodite_sim`` load none of them."""
    code = ("import sys, geodite_sim, geodite_sim.cli as c; c.build_parser(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lazy_names_resolve():
    import geodite_sim as gs
    from geodite_sim.evaluate import stress_to_voigt  # importing the submodule must not shadow gs.evaluate

    assert callable(stress_to_voigt)
    assert gs.evaluate.__name__ == "evaluate" and gs.relax_many.__name__ == "relax_many"
    assert gs.Status.DONE == "done" and callable(gs.admit)
    with pytest.raises(AttributeError):
        gs.no_such_name  # noqa: B018


def test_help_examples_point_at_files_that_exist():
    from geodite_sim.cli import EPILOG

    paths = re.findall(r"\b((?:examples|workflows)/[\w./*-]+)", EPILOG)
    assert paths
    for p in paths:
        assert list(ROOT.glob(p)), f"--help example names {p}, which does not exist"


def test_device_default_and_resolution(monkeypatch):
    import argparse

    import torch

    from geodite_sim.commands import device_arg, exit_code, resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "", "cpu0"):
        with pytest.raises(argparse.ArgumentTypeError):
            device_arg(bad)
    assert exit_code(["done", "converged", "not_converged"]) == 0
    assert exit_code(["done", "unreadable"]) == 1 and exit_code(["failed"]) == 1


def test_build_cache_is_per_configuration(monkeypatch, tmp_path):
    from geodite_sim.model import edge_ops

    monkeypatch.setenv("GEODITE_SIM_CACHE", str(tmp_path))
    name, where = edge_ops.build_config()
    assert where == tmp_path / "torch_extensions" / name and name.startswith("geodite_edge_ops_")
    monkeypatch.setattr(edge_ops, "CFLAGS", [*edge_ops.CFLAGS, "-DSOMETHING_ELSE"])
    other, _ = edge_ops.build_config()
    assert other != name  # other flags: another build directory, neither evicts the other
    monkeypatch.setattr(edge_ops.torch, "__version__", "0.0.0")
    assert edge_ops.build_config()[0] not in (name, other)
