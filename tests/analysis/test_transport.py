"""Transport analysis: streamed unwrapping in a triclinic cell, tracer D with intervals on synthetic Brownian
ions with a known Arrhenius law, drift removal, "not determined" reasons, equality with
pymatgen-analysis-diffusion's DiffusionAnalyzer on an engine trajectory, the `md analyse` CLI, and the
50-seed interval coverage (slow)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from transport_synth import CELL, EA_EV, brownian, d_true, write_h5

from geodite_sim.analysis.arrhenius import fit_arrhenius
from geodite_sim.analysis.transport import (
    TransportSettings,
    analyse_transport,
    analyse_unwrapped,
    conversion_factor,
    unwrap_arrays,
    unwrap_trajectory,
)

TEMPS = (600.0, 800.0, 1000.0, 1200.0)
LI = TransportSettings(mobile=("Li",), charges={"Li": 1, "I": -1})


def crossings(true: np.ndarray) -> np.ndarray:
    """Boundary crossings per atom of continuous positions [T, N, 3] in CELL."""
    cells = np.floor(true @ np.linalg.inv(CELL))
    return np.abs(np.diff(cells, axis=0)).sum(axis=(0, 2))


def test_streamed_unwrapping_triclinic_many_crossings(tmp_path):
    """Positions stored wrapped in a triclinic cell, read back in many small chunks, are the true paths;
    with a stride (fewer kept frames) the kept frames are still unwrapped at the full frame rate."""
    wrapped, true, numbers, masses = brownian(d_true(1200.0), seed=3, n_frames=1500)
    assert crossings(true)[numbers == 3].mean() > 20  # every Li crosses the cell faces many times
    path = tmp_path / "walk.h5"
    write_h5(path, wrapped, numbers, masses, 10.0)
    none = TransportSettings(drift="none", chunk_mb=0.05)  # ~40 frames per chunk: 37 chunks
    un = unwrap_trajectory(path, settings=none)
    np.testing.assert_allclose(un.positions, wrapped[0] + (true - true[0]), atol=1e-9)
    strided = unwrap_trajectory(path, settings=TransportSettings(drift="none", chunk_mb=0.05, max_frames=100))
    assert strided.stride == 15 and len(strided.positions) == 100
    # 15 frames apart a Li moves ~1.6 Å rms per axis: unwrapping the kept frames alone would fail.
    np.testing.assert_allclose(strided.positions, un.positions[::15], atol=1e-9)
    np.testing.assert_allclose(strided.times_fs, np.arange(0, 1500, 15) * 10.0)
    assert strided.volume_A3 == pytest.approx(abs(np.linalg.det(CELL)))


def test_tracer_d_intervals_and_arrhenius_on_brownian_ions(tmp_path):
    """Four temperatures of an Arrhenius law: each D within 3 standard errors of the truth, Ea and D(300 K)
    inside their 3σ intervals (the 95 % coverage is the slow 50-seed test); the framework (vibrating, no drift
    correction) is "not determined" with the reason."""
    results = []
    for k, temperature in enumerate(TEMPS):
        wrapped, _, numbers, masses = brownian(d_true(temperature), seed=100 + k)
        path = tmp_path / f"T{temperature:g}.h5"
        write_h5(path, wrapped, numbers, masses, 10.0, temperature_K=temperature)
        res = analyse_transport(path, settings=LI)
        li = res.tracer["Li"]
        truth = d_true(temperature) * 1e-4
        assert li.reason is None and li.r2 > 0.99 and li.n_atoms == 32
        assert li.window_fs == pytest.approx((0.1 * 19990.0, 0.5 * 19990.0))
        lo, hi = li.ci_cm2_per_s
        assert hi - lo == pytest.approx(2 * 2.0395 * li.se_cm2_per_s, rel=1e-3)  # t(0.975, 31 dof)
        assert abs(li.D_cm2_per_s - truth) < 3.0 * li.se_cm2_per_s
        assert 0.05 < li.se_cm2_per_s / truth < 0.3
        assert res.temperature_K == temperature
        sigma = res.conductivity["Li"]
        assert sigma.charge == 1 and sigma.sigma_mS_per_cm > 0  # checked against pymatgen below
        results.append(res)
    fit = fit_arrhenius(TEMPS, [r.tracer["Li"].D_cm2_per_s for r in results],
                        [r.tracer["Li"].se_cm2_per_s for r in results], confidence=0.997)  # 3σ: one seed here
    assert fit.Ea_ci_eV[0] < EA_EV < fit.Ea_ci_eV[1] and fit.dof == 2
    d300, (lo, hi) = fit.D_at(300.0)
    assert lo < d_true(300.0) * 1e-4 < hi
    # The framework, without drift correction, only vibrates: no D.
    wrapped, _, numbers, masses = brownian(1.0, seed=5, n_frames=500)
    raw = TransportSettings(drift="none")
    frame = analyse_unwrapped(unwrap_arrays(wrapped, CELL, numbers, masses, 10.0, raw), raw)
    assert frame.tracer["I"].D_cm2_per_s is None and frame.tracer["I"].ci_cm2_per_s is None
    assert "not linear" in frame.tracer["I"].reason or "not positive" in frame.tracer["I"].reason


def test_drift_is_removed():
    """A uniform drift of every atom (2 Å/ps) changes nothing with drift="com"; uncorrected, it inflates D."""
    args = dict(seed=7, n_frames=1000)
    base = brownian(1.0, **args)
    moved = brownian(1.0, drift_A_per_ps=(2.0, -1.0, 0.5), **args)
    com = [analyse_unwrapped(unwrap_arrays(w, CELL, n, m, 10.0, LI), LI).tracer["Li"] for w, _, n, m in (base, moved)]
    assert com[1].D_cm2_per_s == pytest.approx(com[0].D_cm2_per_s, rel=1e-9)
    raw = TransportSettings(drift="none")
    drifting = analyse_unwrapped(unwrap_arrays(moved[0], CELL, moved[2], moved[3], 10.0, raw), raw).tracer["Li"]
    assert drifting.slope_D_cm2_per_s > 1.5 * com[0].D_cm2_per_s


def test_arrhenius_flags_and_pymatgen_equal_weights():
    from pymatgen.analysis.diffusion.analyzer import fit_arrhenius as pmg_fit

    temps, d = [500.0, 700.0, 900.0], [1e-7, 8e-6, 2e-6]
    fit = fit_arrhenius(temps, d, [0.1 * x for x in d])  # equal relative errors = equal weights in ln D
    ea, c, _ = pmg_fit(temps, d)
    assert fit.Ea_eV == pytest.approx(ea, rel=1e-9) and fit.D0_cm2_per_s == pytest.approx(c, rel=1e-9)
    assert any("poor fit" in f for f in fit.flags)  # D falls from 700 to 900 K: not Arrhenius
    two = fit_arrhenius(temps[:2], d[:2], [1e-8, 2e-7])
    assert two.Ea_eV is not None and any("too few temperatures: 2" in f for f in two.flags)
    one = fit_arrhenius(temps[:1], d[:1], [1e-8])
    assert one.Ea_eV is None and one.D_at(300.0) is None and "too few" in one.flags[0]


# ---------------------------------------------------------------------------------------------- engine run
@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """A real run_md trajectory: CuI (64 atoms, Morse, float64) at 1400 K, a frame every 8 fs for 1.2 ps."""
    import torch
    from ase.io import read

    from geodite_sim.md import run_md
    from geodite_sim.pair_potential import MorsePotential

    path = tmp_path_factory.mktemp("engine") / "cui.h5"
    atoms = read("workflows/sse/structures/CuI_64.extxyz")
    model = MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2, dtype=torch.float64)
    res = run_md([atoms], model, ensemble="nvt_nhc", temperature=1400.0, timestep=4.0, steps=300,
                 trajectory=str(path), frame_every=2, seed=1, progress=False)
    assert res[0].error is None, res[0].error
    return path


def test_tracer_d_equals_pymatgen_diffusion_analyzer(engine_run):
    """Same frames, same window (DiffusionAnalyzer's: 1 ps to its max_dt), pymatgen's framework drift:
    the tracer D equals DiffusionAnalyzer's; the Nernst–Einstein factor is pymatgen's on the run's structure."""
    from pymatgen.analysis.diffusion.analyzer import DiffusionAnalyzer, get_conversion_factor
    from pymatgen.io.ase import AseAtomsAdaptor

    from geodite_sim.trajectory import read_trajectory

    frames = read_trajectory(engine_run)
    structures = [AseAtomsAdaptor.get_structure(a) for a in frames]
    dt = 8.0
    da = DiffusionAnalyzer.from_structures(structures, "Cu", 1400.0, time_step=dt, step_skip=1, smoothed="max")
    n_cu, n_t = 32, len(frames)
    min_dt, max_dt = int(1000 / dt), min(n_cu * n_t // 30, n_t)
    assert max_dt - min_dt < 200  # DiffusionAnalyzer then fits every lag in between
    settings = TransportSettings(mobile=("Cu",), drift="framework", fit_window_fs=(min_dt * dt, (max_dt - 1) * dt),
                                 r2_min=0.0)
    ours = analyse_transport(engine_run, settings=settings)
    cu = ours.tracer["Cu"]
    assert cu.n_lags == len(da.dt) and cu.window_fs == (da.dt[0], da.dt[-1])
    assert da.diffusivity > 1e-6  # the Cu ions diffuse at 1400 K
    assert cu.slope_D_cm2_per_s == pytest.approx(da.diffusivity, rel=1e-9)
    assert ours.temperature_K == 1400.0
    decorated = structures[0].copy()
    decorated.add_oxidation_state_by_element({"Cu": 1, "I": -1})
    assert conversion_factor(frames[0].numbers, ours.volume_A3, "Cu", 1, 1400.0) == pytest.approx(
        get_conversion_factor(decorated, "Cu+", 1400.0), rel=1e-12)


def test_md_analyse_cli(engine_run, tmp_path, capsys):
    from geodite_sim.cli import main

    out = tmp_path / "a.json"
    rc = main(["md", "analyse", str(engine_run), "--species", "Cu", "--discard-fs", "200", "--json", str(out),
               "--charges", "Cu=1", "I=-1"])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    (system,) = data["systems"]
    cu = system["transport"]["tracer"]["Cu"]
    assert system["transport"]["n_frames"] == 126 and cu["window_fs"] == pytest.approx([100.0, 500.0])
    assert system["rdf"]["g"]["Cu-I"] and system["msd"]["msd"]["Cu"]
    assert "Cu" in text and "I" in text and "Haven" in text and "RDF" in text
    for sp, d in system["transport"]["tracer"].items():
        shown = f"{d['D_cm2_per_s']:.3e}" if d["D_cm2_per_s"] is not None else "not determined"
        assert shown in text, sp
    # A bad species is refused before anything runs; a missing file fails on its own line.
    with pytest.raises(SystemExit) as exc:
        main(["md", "analyse", str(engine_run), "--species", "Xx"])
    assert exc.value.code == 2
    assert main(["md", "analyse", str(engine_run), str(tmp_path / "missing.h5")]) == 1
    assert "missing.h5" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- coverage (slow)
@pytest.mark.slow
def test_interval_coverage_50_seeds():
    """50 seeds × 4 temperatures: the 95 % interval of D holds the true D in ≥ 90 % of runs (at every
    temperature), and the 95 % interval of Ea holds the true Ea in ≥ 90 % of the 50 Arrhenius fits."""
    hits, ea_hits = np.zeros(len(TEMPS)), 0
    for seed in range(50):
        d, se = [], []
        for k, temperature in enumerate(TEMPS):
            wrapped, _, numbers, masses = brownian(d_true(temperature), seed=1000 * seed + k)
            tr = analyse_unwrapped(unwrap_arrays(wrapped, CELL, numbers, masses, 10.0, LI), LI).tracer["Li"]
            lo, hi = tr.ci_cm2_per_s
            hits[k] += lo < d_true(temperature) * 1e-4 < hi
            d.append(tr.D_cm2_per_s)
            se.append(tr.se_cm2_per_s)
        lo, hi = fit_arrhenius(TEMPS, d, se).Ea_ci_eV
        ea_hits += lo < EA_EV < hi
    assert (hits / 50 >= 0.9).all(), hits
    assert ea_hits / 50 >= 0.9, ea_hits
    assert not math.isnan(hits.sum())


# ---------------------------------------------------------------------------------------------- campaign
def test_campaign_transport_tables_and_arrhenius_plot(tmp_path):
    """The campaign's per-material step on three synthetic runs: Arrhenius fit, D and σ at 300 K with intervals,
    the runs' table, "not determined" runs left out with their reason, and the PNG."""
    from geodite_sim.workflows.sse_campaign import AnalysisSettings, _figure
    from geodite_sim.workflows.sse_transport import material_transport, plot_arrhenius, report_tables

    analysis = AnalysisSettings(discard_fs=0.0, charges={"Li": 1, "I": -1})
    results = []
    for k, temperature in enumerate((800.0, 1000.0, 1200.0)):
        wrapped, _, numbers, masses = brownian(d_true(temperature), seed=200 + k, n_frames=1000)
        write_h5(tmp_path / f"{k}.h5", wrapped, numbers, masses, 10.0, temperature_K=temperature)
        tr = analyse_transport(tmp_path / f"{k}.h5", settings=LI).to_dict()
        results.append({"id": f"X-{temperature:g}K", "material": "X", "temperature": temperature, "mobile": "Li",
                        "status": "done", "transport": tr})
    stalled = json.loads(json.dumps(results[0]))
    stalled.update(id="X-700K", temperature=700.0)
    stalled["transport"]["tracer"]["Li"].update(D_cm2_per_s=None, reason="MSD slope is not positive")
    results.insert(0, stalled)
    entry = material_transport(results, analysis)["X"]
    fit = entry["fit"]
    assert fit["temperatures_K"] == [800.0, 1000.0, 1200.0] and entry["excluded"] == [
        "X-700K: MSD slope is not positive"]
    assert abs(fit["Ea_eV"] - EA_EV) < 3 * fit["Ea_se_eV"]
    lo, hi = entry["D_ci_cm2_per_s"]
    assert lo < entry["D_cm2_per_s"] < hi
    factor = conversion_factor(np.array([3] * 32 + [53] * 32), abs(np.linalg.det(CELL)), "Li", 1, 300.0)
    assert entry["sigma_mS_per_cm"] == pytest.approx(entry["D_cm2_per_s"] * factor, rel=1e-12)
    png = plot_arrhenius("X", entry, results, tmp_path / "arrhenius.png", _figure)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    items = report_tables(results, {"X": entry}, 0.95)
    runs_table = next(i for i in items if i[0] == "table" and i[1][0] == "run")
    assert [row[0] for row in runs_table[2]] == ["X-700K", "X-800K", "X-1000K", "X-1200K"]
    assert runs_table[2][0][2] == "not determined: MSD slope is not positive"
    material_table = next(i for i in items if i[0] == "table" and i[1][0] == "material")
    assert material_table[2][0][3].startswith(f"{fit['Ea_eV']:.3f} ± ")


def test_campaign_spec_transport_keys(tmp_path):
    from geodite_sim.workflows.sse_campaign import SpecError, load_spec

    spec = {"campaign": {"name": "t", "model": "morse"}, "analysis": {"charges": {"Li": 1}, "extrapolate_to_K": 350.0},
            "material": [{"name": "CuI", "structure": "workflows/sse/structures/CuI_64.extxyz",
                          "temperatures": [600], "mobile": "Cu"}]}
    s = load_spec(spec, base=".")
    assert s.analysis.charges == {"Li": 1} and s.analysis.extrapolate_to_K == 350.0
    example = load_spec("workflows/sse/transport.toml")  # the committed example: one fast-ion material, >= 3 T
    assert {r.material for r in example.runs} == {"CuI"} and len(example.runs) >= 3
    assert example.analysis.charges == {"Cu": 1, "I": -1} and all(r.mobile == "Cu" for r in example.runs)
    spec["analysis"]["charges"] = {"Lx": 1}
    with pytest.raises(SpecError, match=r"\[analysis\].charges: Lx = 1"):
        load_spec(spec, base=".")
