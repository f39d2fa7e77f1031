"""The MD engine: physics (drift, canonical sampling), batch invariance, restarts, monitors, continuous batching."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from conftest import mixed_structures

from geodite_sim import run_md
from geodite_sim.dynamics.velocities import maxwell_boltzmann
from geodite_sim.monitors import Monitors
from geodite_sim.pair_potential import MorsePotential
from geodite_sim.trajectory import read_series, read_trajectory, trajectory_systems

MORSE = dict(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)


def cu(reps=(2, 2, 2), rattle=0.03, seed=0) -> Atoms:
    a = bulk("Cu", "fcc", 3.61, cubic=True) * reps
    a.rattle(rattle, seed=seed)
    return a


def drift_per_ps(path, system: int, dt_fs: float) -> float:
    frames = read_trajectory(path, system=system)
    t_ps = np.array([f.info["time_fs"] for f in frames]) / 1000
    e = np.array([f.info["conserved"] for f in frames]) / len(frames[0])
    return float(np.polyfit(t_ps, e, 1)[0])


# ---------------------------------------------------------------------------------------------- physics
def test_nve_energy_drift(morse, tmp_path):
    """Velocity Verlet at 0.5 fs on smooth Morse copper: |drift| < 1e-5 eV/atom/ps (2 systems, 0.5 ps)."""
    path = tmp_path / "nve.h5"
    res = run_md([cu(seed=s) for s in range(2)], morse, ensemble="nve", temperature=[300, 600], timestep=0.5,
                 steps=1000, trajectory=path, frame_every=10, progress=False)
    assert all(r.error is None for r in res)
    drifts = [drift_per_ps(path, s, 0.5) for s in range(2)]
    print("NVE drift eV/atom/ps:", drifts)
    assert max(abs(d) for d in drifts) < 1e-5


def small_crystals(n: int, target: float) -> list[Atoms]:
    """n rattled 8-atom Cu cells with momenta at twice the target (equipartition halves it)."""
    out = []
    for s in range(n):
        a = bulk("Cu", "fcc", 3.61) * (2, 2, 2)
        a.rattle(0.02, seed=s)
        a.set_momenta(maxwell_boltzmann(a, 2 * target, 7, s))
        out.append(a)
    return out


def canonical_check(path, n_systems: int, target: float, n_atoms: int, skip: float):
    temps = np.array([read_series(path, "temperature", s) for s in range(n_systems)])
    temps = temps[:, int(skip * temps.shape[1]):]
    mean = temps.mean()
    rel_var = temps.var() / target**2
    # ASE's chain thermostats 3N degrees of freedom while the total momentum (3 of them) is conserved, so KE
    # is chi^2 with 3N-3 dof at T' = T 3N/(3N-3): <T> = target, Var(T)/T^2 = 2/(3N-3) (canonical 3N: 2/(3N)).
    expected = 2 / (3 * n_atoms - 3)
    return mean, rel_var, expected


def test_nhc_canonical_light(morse, tmp_path):
    """32 independent 8-atom crystals, 2 ps: mean temperature within 2%, KE variance within 25%; the
    conserved quantity stays bounded."""
    path = tmp_path / "nhc.h5"
    target = 400.0
    res = run_md(small_crystals(32, target), morse, ensemble="nvt_nhc", temperature=target, timestep=4.0,
                 tdamp=100.0, steps=500, trajectory=path, frame_every=2, progress=False)
    assert all(r.error is None for r in res)
    mean, rel_var, expected = canonical_check(path, 32, target, 8, skip=0.3)
    print(f"NHC light: <T> = {mean:.2f} K (target {target}), Var(T)/T^2 = {rel_var:.5f} (expected {expected:.5f})")
    assert abs(mean - target) / target < 0.02
    assert abs(rel_var / expected - 1) < 0.25
    for s in range(32):
        c = read_series(path, "conserved", s)
        assert np.abs(c - c[0]).max() / 8 < 5e-3


@pytest.mark.slow
def test_nhc_canonical(tmp_path):
    """64 crystals, 12 ps with the protocol's tdamp = 100 dt: mean temperature within 2%, KE variance
    within 10%, conserved quantity bounded. The Morse crystal here keeps the first two neighbour shells only
    (cutoff 4.1 Å): the check needs an anharmonic crystal, not long-range forces, and this one costs ~1.8x less
    (measured: <T> 598.6 K, variance ratio 0.98 ± 0.024, vs 605.1 K and 1.03 ± 0.023 with the 5.6 Å cutoff)."""
    path = tmp_path / "nhc.h5"
    target = 600.0
    model = MorsePotential(**{**MORSE, "rcut1": 1.2, "rcut2": 1.6})
    res = run_md(small_crystals(64, target), model, ensemble="nvt_nhc", temperature=target, timestep=2.0,
                 steps=6000, trajectory=path, frame_every=4, progress=False)
    assert all(r.error is None for r in res)
    mean, rel_var, expected = canonical_check(path, 64, target, 8, skip=0.2)
    print(f"NHC: <T> = {mean:.2f} K (target {target}), Var(T)/T^2 = {rel_var:.5f} (expected {expected:.5f}, "
          f"canonical 3N {2 / 24:.5f})")
    assert abs(mean - target) / target < 0.02
    assert abs(rel_var / expected - 1) < 0.1
    for s in range(64):
        c = read_series(path, "conserved", s)
        assert np.abs(c - c[0]).max() / 8 < 5e-3


def test_langevin_crystal_temperature(morse, tmp_path):
    """With forces: 16 small crystals at two targets average to their targets (Langevin, seeded per structure)."""
    path = tmp_path / "lgv.h5"
    structs = small_crystals(16, 500.0)
    temps = [300.0, 700.0] * 8
    res = run_md(structs, morse, ensemble="nvt_langevin", temperature=temps, timestep=4.0, friction=0.02,
                 steps=400, trajectory=path, frame_every=2, progress=False)
    assert all(r.error is None for r in res)
    for target in (300.0, 700.0):
        t = np.concatenate([read_series(path, "temperature", s)[50:] for s in range(16) if temps[s] == target])
        print(f"Langevin: <T> = {t.mean():.1f} K (target {target})")
        assert abs(t.mean() - target) / target < 0.05


# ---------------------------------------------------------------------------------------------- batch invariance
def mixed_batch(n=32) -> tuple[list[Atoms], list[float]]:
    structs = []
    for seed in range(n // 8):
        structs.extend(mixed_structures(seed))
    temps = [300.0 + 100.0 * (i % 9) for i in range(n)]
    for i, (a, T) in enumerate(zip(structs, temps)):
        a.set_momenta(maxwell_boltzmann(a, T, seed=42, index=i))
    return structs, temps


@pytest.mark.parametrize("ensemble,max_atoms", [("nve", 100_000), ("nvt_nhc", 100_000), ("nvt_nhc", 60)])
def test_batch_invariance(tiny_model, ensemble, max_atoms):
    """A system's trajectory is the same alone and in a batch of 32 mixed systems at mixed temperatures
    (max_atoms=60: the batch is refilled from the queue as systems finish, at different step counts)."""
    structs, temps = mixed_batch()
    steps = [30 + (i % 5) * 5 for i in range(32)]
    res = run_md(structs, tiny_model, ensemble=ensemble, temperature=temps, timestep=1.0, steps=steps,
                 max_atoms=max_atoms, progress=False, monitors=False)
    for i in (5, 7, 13, 30):  # H2O, triclinic Al, NaCl, Mg (different positions in the batch)
        (alone,) = run_md([structs[i]], tiny_model, ensemble=ensemble, temperature=temps[i], timestep=1.0,
                          steps=steps[i], progress=False, monitors=False)
        assert res[i].error is None and res[i].n_steps == steps[i]
        np.testing.assert_allclose(res[i].final.positions, alone.final.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(res[i].final.get_momenta(), alone.final.get_momenta(), rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------- restart
class FailingModel(torch.nn.Module):
    """Delegates to a model and raises on the ``fail_at``-th call (an injected crash)."""

    name = "MorsePotential"

    def __init__(self, model, fail_at: int | None = None):
        super().__init__()
        self.inner = model
        self.fail_at = fail_at
        self.calls = 0

    cutoff = property(lambda self: self.inner.cutoff)
    dtype = property(lambda self: self.inner.dtype)
    device = property(lambda self: self.inner.device)

    def identity_config(self) -> dict:
        """The wrapped model's identity: the injected crash does not make it another model."""
        from geodite_sim.model.contract import identity_config

        return identity_config(self.inner)

    def forward(self, batch, **kw):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("injected crash")
        return self.inner(batch, **kw)


def restart_inputs():
    structs = [cu((1, 1, 1), seed=0), cu((2, 2, 1), seed=1), cu((2, 1, 1), seed=2), cu((2, 2, 2), seed=3),
               cu((1, 1, 2), seed=4), cu((2, 2, 1), seed=5)]
    return structs, [300, 500, 700, 900, 600, 400], [40, 55, 30, 45, 60, 35]


def h5_arrays(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        for name, g in f["systems"].items():
            for key, ds in g.items():
                out[f"{name}/{key}"] = ds[()]
            out[f"{name}/status"] = g.attrs["status"]
    return out


def assert_same_run(res_a, res_b, path_a, path_b):
    a, b = h5_arrays(path_a), h5_arrays(path_b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    for ra, rb in zip(res_a, res_b):
        assert ra.index == rb.index and ra.n_steps == rb.n_steps and ra.error == rb.error
        assert np.array_equal(ra.final.positions, rb.final.positions)
        assert np.array_equal(ra.final.get_momenta(), rb.final.get_momenta())


@pytest.mark.parametrize("ensemble,fail_seed", [("nvt_nhc", 0), ("nvt_langevin", 1), ("nve", 2)])
def test_restart_after_injected_crash_is_bit_for_bit(tmp_path, ensemble, fail_seed):
    """Crash at a random step, restart from the checkpoint: HDF5 arrays and final states identical to an
    uninterrupted run (continuous batching, checkpoints between frames, float64 CPU)."""
    structs, temps, steps = restart_inputs()
    kw = dict(ensemble=ensemble, temperature=temps, timestep=2.0, steps=steps, frame_every=3, checkpoint_every=7,
              max_atoms=50, progress=False, seed=5)
    morse = MorsePotential(**MORSE)
    ref_path = tmp_path / "ref.h5"
    ref_model = FailingModel(morse)
    ref = run_md(structs, ref_model, trajectory=ref_path, **kw)
    total_calls = ref_model.calls
    fail_at = int(np.random.default_rng(fail_seed).integers(15, total_calls - 5))
    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError, match="injected"):
        run_md(structs, FailingModel(morse, fail_at), trajectory=path, **kw)
    assert Path(str(path) + ".ckpt").exists()
    trajectory_systems(path)  # readable after the crash
    out = run_md(structs, FailingModel(morse), trajectory=path, restart=True, **kw)
    assert_same_run(ref, out, ref_path, path)
    # restarting a finished run returns its results without stepping
    again = run_md(structs, FailingModel(morse, fail_at=1), trajectory=path, restart=True, **kw)
    assert [r.n_steps for r in again] == steps


def test_restart_rejects_changed_settings(tmp_path, morse):
    structs, temps, steps = restart_inputs()
    path = tmp_path / "run.h5"
    run_md(structs[:2], morse, temperature=300, steps=10, trajectory=path, checkpoint_every=5, progress=False)
    with pytest.raises(ValueError, match="timestep"):
        run_md(structs[:2], morse, temperature=300, steps=10, timestep=1.0, trajectory=path, checkpoint_every=5,
               restart=True, progress=False)


def test_restart_refuses_other_steps_or_temperatures_but_resumes_older_checkpoints(tmp_path, morse):
    """A finished run restarted with more steps (or other temperatures) is refused with what to do instead (it
    used to return the old results as if they had run longer); the same call resumes to the same results; a
    checkpoint written before these targets were recorded still resumes."""
    from geodite_sim.md_checkpoint import load_checkpoint, save_checkpoint

    structs, _, _ = restart_inputs()
    path = tmp_path / "run.h5"
    kw = dict(trajectory=path, checkpoint_every=5, progress=False)
    first = run_md(structs[:2], morse, temperature=[300, 500], steps=[10, 15], **kw)
    with pytest.raises(ValueError, match=r"steps: checkpoint \[10.0, 15.0\] vs now 30.0.*final structures"):
        run_md(structs[:2], morse, temperature=[300, 500], steps=30, restart=True, **kw)
    with pytest.raises(ValueError, match="temperature_K"):
        run_md(structs[:2], morse, temperature=600, steps=[10, 15], restart=True, **kw)
    again = run_md(structs[:2], morse, temperature=[300, 500], steps=[10, 15], restart=True, **kw)
    assert [r.n_steps for r in again] == [10, 15]
    np.testing.assert_array_equal(again[1].final.positions, first[1].final.positions)
    ckpt = load_checkpoint(str(path) + ".ckpt")
    for key in ("steps", "temperature_K"):
        ckpt["settings"].pop(key)
    save_checkpoint(str(path) + ".ckpt", ckpt)
    old = run_md(structs[:2], morse, temperature=[300, 500], steps=[10, 15], restart=True, **kw)
    assert [r.n_steps for r in old] == [10, 15]


KILL_SCRIPT = """
import sys
from ase.build import bulk
from geodite_sim import run_md
from geodite_sim.pair_potential import MorsePotential

def structures():
    out = []
    for s, reps in enumerate([(2, 2, 1), (1, 1, 1), (2, 1, 1), (2, 2, 2), (1, 1, 2)]):
        a = bulk("Cu", "fcc", 3.61, cubic=True) * reps
        a.rattle(0.03, seed=s)
        out.append(a)
    return out

if __name__ == "__main__":
    path, restart = sys.argv[1], sys.argv[2] == "1"
    run_md(structures(), MorsePotential(**{morse}), ensemble="nvt_nhc", temperature=[300, 500, 700, 900, 1100],
           timestep=2.0, steps=[700, 900, 500, 800, 600], trajectory=path, frame_every=4, checkpoint_every=25,
           max_atoms=70, progress=False, seed=3, restart=restart)
"""


@pytest.mark.slow
def test_restart_after_sigkill(tmp_path):
    """SIGKILL a subprocess at a random moment after its first checkpoint; the file stays readable and the
    restarted run reproduces the uninterrupted one exactly."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT).replace("{morse}", repr(MORSE)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref_path, path = tmp_path / "ref.h5", tmp_path / "run.h5"
    subprocess.run([sys.executable, str(script), str(ref_path), "0"], check=True, env=env, cwd=tmp_path)
    proc = subprocess.Popen([sys.executable, str(script), str(path), "0"], env=env, cwd=tmp_path)
    ckpt = Path(str(path) + ".ckpt")
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(float(np.random.default_rng().uniform(0.0, 1.5)))
    interrupted = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and interrupted, "the run finished before it could be killed"
    trajectory_systems(path)  # the killed run's file opens and lists its systems
    subprocess.run([sys.executable, str(script), str(path), "1"], check=True, env=env, cwd=tmp_path)
    a, b = h5_arrays(ref_path), h5_arrays(path)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- monitors
class NaNAfter(FailingModel):
    """Forces on silver atoms become NaN from the ``start``-th call on."""

    def __init__(self, model, start: int):
        super().__init__(model)
        self.start = start

    def forward(self, batch, **kw):
        out = self.inner(batch, **kw)
        self.calls += 1
        if self.calls >= self.start:
            out["forces"] = torch.where((batch.numbers[:, None] == 47), float("nan"), out["forces"])
        return out


class EnergyCreep(FailingModel):
    """Adds 0.01 eV per call to the energy of systems holding silver (a conserved-quantity drift)."""

    def forward(self, batch, **kw):
        out = self.inner(batch, **kw)
        self.calls += 1
        has_ag = torch.zeros(batch.n_systems, dtype=out["energy"].dtype).index_add_(
            0, batch.system_index, (batch.numbers == 47).to(out["energy"].dtype))
        out["energy"] = out["energy"] + 0.01 * self.calls * (has_ag > 0)
        return out


def test_monitor_stops_exploding_system(morse, tmp_path):
    """A system given momenta of ~10^6 K runs away: it stops with a reason and its frames, the others finish;
    two atoms 0.45 Å apart are refused at admission with the distance in the message."""
    structs = [cu(seed=s) for s in range(5)]
    hot = structs[2]
    hot.set_momenta(np.random.default_rng(0).normal(0.0, 200.0, (len(hot), 3)))  # amu Å/t: T ~ 10^6 K
    close = structs[4]
    close.positions[1] = close.positions[0] + [0.45, 0.0, 0.0]
    path = tmp_path / "m.h5"
    res = run_md(structs, morse, ensemble="nvt_nhc", temperature=500, timestep=2.0, steps=60, trajectory=path,
                 frame_every=5, progress=False)
    assert [r.error is None for r in res] == [True, True, False, True, False]
    assert "stopped at step" in res[2].error and res[2].n_steps < 60 and res[2].status == "temperature_runaway"
    assert res[4].status == "atoms_too_close" and "0.450 Å" in res[4].error and res[4].n_steps == 0
    assert [r.n_steps for r in res if r.error is None] == [60, 60, 60]
    info = {d["index"]: d for d in trajectory_systems(path)}
    assert info[2]["status"] == "failed" and info[2]["error"] == res[2].error and info[2]["frames"] >= 1
    assert info[0]["status"] == "done" and info[0]["frames"] == 13
    assert 4 not in info  # never started: no trajectory group


@pytest.mark.parametrize("case", ["contact", "temperature", "drift", "nan"])
def test_monitor_reasons(morse, case):
    structs = [cu(seed=s) for s in range(3)]
    kw = dict(ensemble="nvt_nhc", temperature=300.0, timestep=2.0, steps=40, progress=False)
    model = morse
    if case == "contact":
        structs[1].positions[3] = structs[1].positions[0] + [0.5, 0.4, 0.0]
        kw.update(monitors=Monitors(max_temperature_factor=None, max_drift=None, check_every=1), ensemble="nve")
        match = "too close"
    elif case == "temperature":
        structs[1].set_momenta(maxwell_boltzmann(structs[1], 6000.0, 0, 0))
        match = "temperature runaway"
    elif case == "drift":
        structs[1].numbers[5] = 47
        model = EnergyCreep(morse)
        kw.update(monitors=Monitors(max_temperature_factor=None, max_drift=1e-3, check_every=5))
        match = "drift"
    else:
        structs[1].numbers[5] = 47
        model = NaNAfter(morse, start=12)
        match = "non-finite"
    res = run_md(structs, model, **kw)
    assert res[0].error is None and res[2].error is None, (res[0].error, res[2].error)
    assert res[1].error is not None and match in res[1].error, res[1].error


def test_nan_system_does_not_break_geodite_batch(tiny_model):
    """Geodite rejects non-finite positions; a system that went NaN must not take its batch-mates down."""
    structs = [cu((1, 1, 1), seed=s) for s in range(3)]
    structs[1].numbers[2] = 47
    model = NaNAfter(tiny_model, start=3)
    model.name = "geodite"
    res = run_md(structs, model, ensemble="nvt_nhc", temperature=300.0, timestep=1.0, steps=25, progress=False,
                 monitors=False)  # the random model's own physics is not at stake: only the NaN check
    assert res[0].error is None and res[2].error is None and res[0].n_steps == 25
    assert "non-finite" in res[1].error


# ---------------------------------------------------------------------------------------------- inputs, outputs
def test_inputs_outputs(morse, tmp_path):
    """Momenta from the input are used; pymatgen in -> pymatgen out; unreadable inputs give an error result."""
    from pymatgen.io.ase import AseAtomsAdaptor

    a = cu((1, 1, 1))
    p0 = maxwell_boltzmann(a, 400.0, 9, 9)
    a.set_momenta(p0)
    pmg = AseAtomsAdaptor.get_structure(cu((1, 1, 2), seed=4))
    res = run_md([a, str(tmp_path / "missing.cif"), pmg], morse, ensemble="nve", steps=0, progress=False)
    np.testing.assert_allclose(res[0].final.get_momenta(), p0)
    assert res[1].final is None and "not found" in res[1].error
    assert type(res[2].final).__name__ == "Structure" and res[2].error is None
    with pytest.raises(ValueError, match="temperature"):
        run_md([a], morse, ensemble="nvt_nhc", steps=1, progress=False)


def test_md_job_reads_ensemble_properties_not_names(morse, monkeypatch):
    """Issue 24: the MD job's ensemble rules come from the registry entry (``needs_temperature``,
    ``rescales_momenta``, ``variable_cell``, its own keywords in ``defaults``), never from ensemble names: a toy
    registration is treated by its properties alone, and no registered MD name appears as a string in the job's or
    the command's code."""
    import ast
    import dataclasses

    from geodite_sim import md_job
    from geodite_sim.commands import md as md_command
    from geodite_sim.md import md_job as make_md_job
    from geodite_sim.runner import registry
    from geodite_sim.status import Status

    nve = registry.get_integrator("nve")
    toys = {"toy_thermostat": dataclasses.replace(nve, name="toy_thermostat", needs_temperature=True),
            "toy_rescaler": dataclasses.replace(nve, name="toy_rescaler", needs_temperature=False,
                                                rescales_momenta=True),
            "toy_own": dataclasses.replace(nve, name="toy_own", defaults={"toy_gain": 2.0})}
    for name, entry in toys.items():
        monkeypatch.setitem(registry.REGISTRY, name, entry)
    a = cu((1, 1, 1))
    # needs_temperature: a thermostat without a target is refused up front; NVE's own entry runs without one
    with pytest.raises(ValueError, match="toy_thermostat.*needs a temperature"):
        run_md([a], morse, ensemble="toy_thermostat", steps=1, progress=False)
    assert run_md([a], morse, ensemble="nve", steps=1, progress=False)[0].error is None
    # rescales_momenta: zero kinetic energy (0 K, no momenta) is refused at admission, by whatever name
    res = run_md([a], morse, ensemble="toy_rescaler", temperature=0.0, steps=1, progress=False)[0]
    assert res.status == Status.INVALID_SETTINGS and "non-zero initial kinetic energy" in res.error
    assert run_md([a], morse, ensemble="toy_rescaler", temperature=300.0, steps=1, progress=False)[0].error is None
    moving = a.copy()
    moving.set_momenta(maxwell_boltzmann(a, 300.0, 1, 0))
    assert run_md([moving], morse, ensemble="toy_rescaler", steps=1, progress=False)[0].error is None  # no target
    # an entry's own keyword (a key of its defaults) is accepted, reaches init/step and is a restart key
    job = make_md_job([a], morse, ensemble="toy_own", temperature=300.0, toy_gain=3.0)
    assert job.run_settings["toy_gain"] == 3.0 and job.settings["toy_gain"] == 3.0 and "toy_gain" in job.restart_keys
    assert make_md_job([a], morse, ensemble="toy_own", temperature=300.0).run_settings["toy_gain"] == 2.0
    with pytest.raises(TypeError, match="toy_gain"):
        make_md_job([a], morse, ensemble="nve", toy_gain=3.0)
    # every registered ensemble states its properties; none is named in the code that applies them
    md_names = set(registry.names("md"))
    assert not registry.get_integrator("nve").needs_temperature
    assert all(registry.get_integrator(n).needs_temperature for n in md_names - {"nve", "toy_rescaler", "toy_own"})
    assert {n for n in md_names if registry.get_integrator(n).rescales_momenta} == {"nvt_bussi", "toy_rescaler"}
    for module in (md_job, md_command):
        tree = ast.parse(Path(module.__file__).read_text())
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        named = strings & (md_names - {"nvt_nhc"})  # nvt_nhc: the command line's default --ensemble only
        assert not named, f"{module.__name__} branches on ensemble names {sorted(named)}"


def test_checkpoint_finds_a_state_class_nothing_imported_yet():
    """A restart in a fresh process finds the state class of an ensemble whose module is imported lazily (Bussi's
    registry entry imports it only at ``init``): the checkpoint looks in geodite_sim.dynamics, no per-ensemble import
    list. (Before, a fresh-process restart of an nvt_bussi run failed with KeyError 'BussiState'.)"""
    code = ("import geodite_sim.md_job, geodite_sim.md_checkpoint as c; "
            "print(c._state_type('BussiState').__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "geodite_sim.dynamics.bussi"
    with pytest.raises(ValueError, match="NoSuchState"):
        from geodite_sim.md_checkpoint import _state_type

        _state_type("NoSuchState")
