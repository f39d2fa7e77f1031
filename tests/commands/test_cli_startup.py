"""Start-up of the command line and the fused-kernel build cache (issue 14, first-run experience)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.fixture()
def fake_builder(monkeypatch, tmp_path):
    """torch's extension builder replaced by a recorder that 'builds' (writes the library) when it is missing and
    appends to the linker flags it is given, as torch's does; the cache in tmp_path."""
    import torch.utils.cpp_extension as cpp

    from geodite_sim.model import edge_ops

    calls = []

    def load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        calls.append({"name": name, "sources": list(sources), "dir": build_directory})
        extra_ldflags.append("-L/torch/lib")  # what torch's _prepare_ldflags does to the caller's list
        so = Path(build_directory) / f"{name}.so"
        if not so.exists():
            so.write_bytes(b"built")
        return object()

    monkeypatch.setenv("GEODITE_SIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpp, "load", load)
    monkeypatch.setattr(edge_ops, "_EXT", None)
    monkeypatch.setattr(edge_ops, "_EXT_FAILED", False)
    monkeypatch.delenv("GEODITE_FUSED", raising=False)
    return calls


def test_kernel_build_is_keyed_and_announced(fake_builder, monkeypatch, tmp_path, capsys):
    """Issue 27 item 3: the build compiles a copy of the source inside its keyed cache folder (so another checkout
    with the same source reuses it instead of rebuilding silently), says so every time it builds, and the flags
    that key it do not change after a load."""
    import shutil

    from geodite_sim.model import edge_ops

    name, build_dir = edge_ops.build_config()
    assert edge_ops._load_extension() is not None
    err = capsys.readouterr().err
    assert f"building CPU kernels (once per configuration, ~1 min) in {build_dir}" in err and "built the CPU" in err
    assert fake_builder[0]["sources"] == [str(build_dir / "edge_ops.cpp")]  # the cache's copy, not the checkout's
    assert (build_dir / "edge_ops.cpp").read_bytes() == edge_ops._source().read_bytes()
    assert edge_ops.build_config() == (name, build_dir)  # torch appended to a copy of LDFLAGS, not to ours

    other = tmp_path / "other_checkout" / "csrc"  # the same source reached through another path
    other.mkdir(parents=True)
    shutil.copy(edge_ops._source(), other / "edge_ops.cpp")
    monkeypatch.setattr(edge_ops, "_source", lambda: other / "edge_ops.cpp")
    monkeypatch.setattr(edge_ops, "_EXT", None)
    assert edge_ops.build_config() == (name, build_dir)
    edge_ops._load_extension()
    assert fake_builder[1]["sources"] == fake_builder[0]["sources"]  # same build file: nothing for ninja to redo
    assert "building" not in capsys.readouterr().err  # the library exists: no build, no message

    monkeypatch.setattr(edge_ops, "build_inputs", lambda: ["-I/another/venv/torch/include"])
    assert edge_ops.build_config()[0] != name  # another environment's include paths: its own build


def test_kernel_build_waits_for_another_process_and_says_so(fake_builder, tmp_path, capsys):
    import fcntl
    import threading

    from geodite_sim.model import edge_ops

    _, build_dir = edge_ops.build_config()
    build_dir.mkdir(parents=True)
    holder = open(build_dir / "geodite_build.lock", "a")  # another process's build in progress
    fcntl.flock(holder, fcntl.LOCK_EX)
    timer = threading.Timer(0.5, lambda: (fcntl.flock(holder, fcntl.LOCK_UN), holder.close()))
    timer.start()
    try:
        assert edge_ops._load_extension() is not None
    finally:
        timer.join()
    err = capsys.readouterr().err
    assert "waiting for another process building the CPU kernels" in err
    assert err.index("waiting") < err.index("building CPU kernels")


def _option(parser, *path_and_flag):
    *path, flag = path_and_flag
    for name in path:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[name]
    return next(a for a in parser._actions if flag in a.option_strings)


def test_ensemble_and_optimizer_choices_come_from_the_registry(monkeypatch):
    """Adding an ensemble or optimiser is its module + one registration: the command line lists it by itself."""
    from geodite_sim.cli import build_parser
    from geodite_sim.runner import registry

    parser = build_parser()
    md_names = tuple(n for n, e in registry.REGISTRY.items() if e.kind == "md")
    assert tuple(_option(parser, "md", "run", "--ensemble").choices) == md_names
    for path in (("relax",), ("screen",), ("eos",)):
        assert tuple(_option(parser, *path, "--optimizer").choices) == registry.OPTIMIZERS
    new = registry.Integrator("nvt_test_only", "md", *(lambda *a: None,) * 4)
    monkeypatch.setitem(registry.REGISTRY, new.name, new)
    assert "nvt_test_only" in _option(build_parser(), "md", "run", "--ensemble").choices


def test_md_run_options_read_the_registry(capsys):
    """--pressure needs an entry with variable_cell (the message lists them from the registry); --ensemble-param
    reads KEY=VALUE as JSON."""
    import argparse

    from geodite_sim.cli import main
    from geodite_sim.commands.md import _key_value

    with pytest.raises(SystemExit) as exc:
        main(["md", "run", "x.cif", "--steps", "1", "--ensemble", "nve", "--pressure", "1.0"])
    assert exc.value.code == 2
    assert "need an NPT ensemble (npt_mtk_iso, npt_mtk), not nve" in capsys.readouterr().err
    assert _key_value("barostat_chain_length=5") == ("barostat_chain_length", 5)
    assert _key_value("pressure=[0.1, 1]") == ("pressure", [0.1, 1])
    assert _key_value("mode=fast") == ("mode", "fast")
    with pytest.raises(argparse.ArgumentTypeError):
        _key_value("no-equals-sign")
