"""SSE campaign workflow: spec validation, the example specs, end-to-end run with report, references,
and resuming an interrupted campaign to the same HDF5 data as an uninterrupted one."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import MORSE, builder, quiet, tiny_spec
from geodite_sim.workflows.sse_campaign import SpecError, load_spec, run_campaign, run_states

REPO = Path(__file__).resolve().parents[2]
SSE = REPO / "workflows" / "sse"


def h5_content(path: Path) -> dict:
    """Every dataset and every system attribute of a trajectory file (root attrs hold versions, skipped)."""
    out = {}
    with h5py.File(path, "r") as f:
        for name, g in f["systems"].items():
            for key, ds in g.items():
                out[f"{name}/{key}"] = ds[()]
            for key, v in g.attrs.items():
                out[f"{name}@{key}"] = v
    return out


def assert_same_h5(a: Path, b: Path) -> None:
    ca, cb = h5_content(a), h5_content(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        if isinstance(ca[key], np.ndarray):
            assert ca[key].shape == cb[key].shape, key
            assert np.array_equal(ca[key], cb[key]), key  # bit for bit
        else:
            assert ca[key] == cb[key], key


# ---------------------------------------------------------------------------------------------- spec
def test_spec_errors_name_the_problem(tmp_path):
    spec = tiny_spec(tmp_path)
    load_spec(spec, base=tmp_path, output=tmp_path / "out")
    bad = copy.deepcopy(spec)
    bad["md"]["stepz"] = 5
    with pytest.raises(SpecError, match=r"\[md\]: unknown key\(s\) \['stepz'\]"):
        load_spec(bad, base=tmp_path)
    bad = copy.deepcopy(spec)
    bad["material"][0]["structure"] = "missing.extxyz"
    with pytest.raises(SpecError, match="structure file not found"):
        load_spec(bad, base=tmp_path)
    bad = copy.deepcopy(spec)
    bad["material"][0]["references"] = {"700": "ref.extxyz"}
    with pytest.raises(SpecError, match="no run at 700 K"):
        load_spec(bad, base=tmp_path)
    bad = copy.deepcopy(spec)
    bad["material"][1]["temperatures"] = []
    with pytest.raises(SpecError, match="temperatures"):
        load_spec(bad, base=tmp_path)


def test_example_specs_and_structures():
    full = load_spec(SSE / "full.toml")
    assert (full.md.ensemble, full.md.chain_length, full.tdamp_fs, full.md.timestep_fs, full.md.steps,
            full.md.frame_every) == ("nvt_nhc", 10, 150.0, 1.5, 700_000, 10)
    assert full.analysis.discard_fs == 5000.0 and full.analysis.rdf_bin_width == 0.05
    assert full.analysis.reference_discard_fs == 30000.0
    b = builder()
    from ase.io import read

    for run in full.runs:
        assert len(read(run.structure)) == b.PROTOCOL_ATOMS[run.material], run.id
        assert run.temperature in b.MATERIALS[run.material][3]
    short = load_spec(SSE / "short.toml")
    assert short.md.steps == 2000 and {r.material for r in short.runs} == set(b.MATERIALS)
    # The shipped files are what the builder makes (rebuilt in memory, compared to the file).
    for name, (_, big, small, _, _) in b.MATERIALS.items():
        for sc in (big, small):
            atoms = b.build(name, sc)
            stored = read(SSE / "structures" / f"{name}_{len(atoms)}.extxyz")
            assert (stored.numbers == atoms.numbers).all()
            np.testing.assert_allclose(stored.positions, atoms.positions, atol=1e-6)
            np.testing.assert_allclose(stored.cell[:], atoms.cell[:], atol=1e-6)


# ---------------------------------------------------------------------------------------------- end to end
def test_short_example_end_to_end_with_report(tmp_path):
    """workflows/sse/short.toml with Morse and a few steps: MD, analysis, report with plots."""
    data = tomllib.loads((SSE / "short.toml").read_text())
    data["campaign"].update(model="morse", model_options=MORSE, dtype="float64")
    data["md"].update(steps=30, checkpoint_every=10, frame_every=5)
    data["analysis"].update(discard_fs=15.0)
    out = tmp_path / "short"
    lines: list[str] = []
    result = run_campaign(load_spec(data, base=SSE, output=out), log=lines.append, progress_every_s=0.0)
    assert any("ETA" in line for line in lines)
    assert json.loads((out / "progress.json").read_text())["fraction_done"] == pytest.approx(1.0)
    assert {s.status for s in result.states} <= {"done", "failed"}  # Morse blows up Li/H compounds: reported
    assert any(s.status == "done" for s in result.states)
    assert len(result.results) == len(data["material"]) == len(result.states)
    for r in result.results:
        if r["status"] == "done":
            assert r["n_frames"] >= 3 and r["rdf"]["g"]
    report = (out / "report.md").read_text()
    assert "## Runs" in report and "no reference trajectories" in report
    assert "## Transport" in report and "σ Nernst–Einstein" in report
    for r in result.results:  # every species: a D with its interval, or "not determined" with the reason
        for sp, d in ((r.get("transport") or {}).get("tracer") or {}).items():
            assert (f"{sp}: not determined ({d['reason']})" if d["D_cm2_per_s"] is None
                    else f"{sp}: {d['D_cm2_per_s']:.3e}") in report
    for s in result.states:
        if s.status == "failed":
            assert s.error in report
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert any(p.startswith("rdf_") for p in pngs) and any(p.startswith("msd_") for p in pngs)
    for p in (out / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_references_scores_and_cli(tmp_path, capsys):
    """A reference equal to the run scores 1; a reference run at another temperature scores lower;
    the CLI reports status and the mean score."""
    from geodite_sim.cli import main
    from geodite_sim.md import run_md
    from geodite_sim.pair_potential import MorsePotential
    from geodite_sim.trajectory import export_extxyz

    spec = tiny_spec(tmp_path, steps=80)
    out = tmp_path / "out"
    # Reference for CuI at 900 K: a separate Morse run of the same cell at 300 K, exported to extxyz.
    ref_h5 = tmp_path / "ref.h5"
    b = builder()
    run_md([b.build("CuI", (1, 1, 1))], MorsePotential(**MORSE), temperature=300, steps=80, trajectory=ref_h5,
           seed=11, progress=False)
    export_extxyz(ref_h5, tmp_path / "ref_300K.extxyz")
    spec["material"][0]["references"] = {
        "500": {"file": str(out / "trajectories.h5"), "system": 0, "discard_fs": 15.0},  # itself
        "900": {"file": "ref_300K.extxyz", "discard_fs": 15.0},
    }
    (tmp_path / "spec.toml").write_text(_to_toml(spec, out))
    assert main(["campaign", str(tmp_path / "spec.toml"), "--progress-every", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "mean overlap score" in printed and "report:" in printed
    results = {r["id"]: r for r in json.loads((out / "analysis.json").read_text()).values() for r in [r["result"]]}
    assert results["CuI-500K"]["comparison"]["score"] == 1.0
    assert 0.0 < results["CuI-900K"]["comparison"]["score"] < 0.99
    assert "comparison" not in results["Bi2O3-600K"]
    for r in results.values():
        assert np.isfinite(r["diffusion"][r["mobile"]]["D_cm2_per_s"])
    report = (out / "report.md").read_text()
    assert "mean overlap score" in report and "plots/scores.png" in report
    assert (out / "plots" / "scores.png").exists()
    # Status after the end: everything done, nothing left.
    assert main(["campaign", str(tmp_path / "spec.toml"), "--status"]) == 0
    status = capsys.readouterr().out
    assert "3/3 runs finished" in status and "0 atom-steps left" in status
    # A finished campaign re-run does no MD and leaves the trajectory untouched.
    before = h5_content(out / "trajectories.h5")
    mtime = (out / "trajectories.h5").stat().st_mtime_ns
    assert main(["campaign", str(tmp_path / "spec.toml"), "--no-report"]) == 0
    assert (out / "trajectories.h5").stat().st_mtime_ns == mtime
    assert_same_h5_dict(before, h5_content(out / "trajectories.h5"))
    # Changing an MD setting of a started campaign is refused.
    spec["md"]["steps"] = 90
    (tmp_path / "spec.toml").write_text(_to_toml(spec, out))
    assert main(["campaign", str(tmp_path / "spec.toml")]) == 2
    assert "different MD settings" in capsys.readouterr().err


def assert_same_h5_dict(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k], k


def _to_toml(spec: dict, out: Path) -> str:
    """Minimal TOML writer for the test specs (tables, arrays of tables, inline tables)."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(v)

    lines = []
    for table in ("campaign", "md", "analysis"):
        lines.append(f"[{table}]")
        items = dict(spec.get(table, {}))
        if table == "campaign":
            items["output"] = str(out)
        lines += [f"{k} = {value(v)}" for k, v in items.items()]
    for mat in spec["material"]:
        lines.append("[[material]]")
        lines += [f"{k} = {value(v)}" for k, v in mat.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- resume
def test_interrupted_campaign_resumes_to_identical_data(tmp_path):
    """Uninterrupted vs interrupted twice (two runs running; then one finished, one queued) and resumed."""
    spec = tiny_spec(tmp_path, steps=60)
    ref = run_campaign(load_spec(spec, base=tmp_path, output=tmp_path / "a"), analyse=False, log=quiet)
    assert [s.status for s in ref.states] == ["done"] * 3

    b = load_spec(spec, base=tmp_path, output=tmp_path / "b")
    # the progress observer interrupts at the first check after this many steps (checks every few steps)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(b, analyse=False, log=quiet, interrupt_after=45)  # a checkpoint at 20-40 steps
    states = run_states(b)
    assert [s.status for s in states] == ["running", "running", "pending"]
    assert 20 <= states[0].steps_done == states[1].steps_done < 60 and states[2].steps_done == 0
    assert not (tmp_path / "b" / "runs.jsonl").exists() or not (tmp_path / "b" / "runs.jsonl").read_text()
    with pytest.raises(KeyboardInterrupt):
        run_campaign(b, analyse=False, log=quiet, interrupt_after=55)  # past 60: runs 0, 1 retire and are stored
    states = run_states(b)
    assert [s.status for s in states][:2] == ["done", "done"] and states[2].status in ("running", "pending")
    stored = [json.loads(line) for line in (tmp_path / "b" / "runs.jsonl").read_text().splitlines()]
    assert [(r["index"], r["status"], r["n_steps"]) for r in stored] == [(0, "done", 60), (1, "done", 60)]
    done = run_campaign(b, log=quiet)
    assert [s.status for s in done.states] == ["done"] * 3
    assert_same_h5(tmp_path / "a" / "trajectories.h5", tmp_path / "b" / "trajectories.h5")
    manifest = json.loads((tmp_path / "b" / "campaign.json").read_text())
    assert [s["resumed"] for s in manifest["sessions"]] == [False, True, True]


@pytest.mark.slow
def test_killed_campaign_subprocess_resumes_to_identical_data(tmp_path):
    """SIGKILL a ``geodite-sim campaign`` process after its first checkpoints, re-run it, compare with
    an uninterrupted campaign."""
    spec = tiny_spec(tmp_path, steps=400)
    spec["md"]["checkpoint_every"] = 50
    for name in ("a", "b"):
        (tmp_path / f"{name}.toml").write_text(_to_toml(spec, tmp_path / name))
    cmd = [sys.executable, "-m", "geodite_sim", "campaign"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(cmd + [str(tmp_path / "a.toml"), "--no-report"], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + [str(tmp_path / "b.toml"), "--no-report", "--progress-every", "0.5"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "b" / "trajectories.h5.ckpt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and run_states(load_spec(tmp_path / "b.toml"))[0].steps_done >= 100:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "campaign finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    states = run_states(load_spec(tmp_path / "b.toml"))
    assert any(s.status != "done" for s in states)
    subprocess.run(cmd + [str(tmp_path / "b.toml"), "--no-report"], check=True, env=env, capture_output=True)
    assert_same_h5(tmp_path / "a" / "trajectories.h5", tmp_path / "b" / "trajectories.h5")


def test_spec_md_preset(tmp_path):
    """``[md] preset = "sse_nvt"`` fills the paper's integrator settings; conflicts and NPT presets are refused."""
    from geodite_sim.workflows.sse_campaign import SpecError, load_spec

    def spec(**md):
        d = tiny_spec(tmp_path)
        d["md"] = {k: v for k, v in d["md"].items() if k != "steps"} | md
        return load_spec(d, base=tmp_path, output=tmp_path / "out")

    s = spec(preset="sse_nvt", steps=10)
    assert (s.md.ensemble, s.md.timestep_fs, s.md.chain_length, s.md.steps) == ("nvt_nhc", 1.5, 10, 10)
    assert s.md.tdamp_fs == pytest.approx(150.0)
    with pytest.raises(SpecError, match="conflict"):
        spec(preset="sse_nvt", timestep_fs=2.0)
    with pytest.raises(SpecError, match="NPT"):
        spec(preset="ms25_npt")
    with pytest.raises(SpecError, match="preset"):
        spec(preset="nope")
