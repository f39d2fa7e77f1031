"""MD integrators against ASE: NVE and Nosé–Hoover chain trajectories, Langevin statistics, velocities, noise."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.md.langevin import Langevin
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from geodite_sim import GeoditeCalculator, run_md
from geodite_sim.batch import Batch
from geodite_sim.dynamics.langevin import counter_normals, hash32
from geodite_sim.dynamics.nose_hoover import init_chain, nhc_propagate
from geodite_sim.dynamics.velocities import maxwell_boltzmann
from geodite_sim.dynamics.verlet import MDState


def cu_crystal(reps=(2, 2, 2), rattle=0.05, seed=1) -> Atoms:
    a = bulk("Cu", "fcc", 3.61, cubic=True) * reps
    a.rattle(rattle, seed=seed)
    return a


def run_ase(atoms: Atoms, calc, ensemble: str, steps: int, dt_fs: float, temperature_K: float = 0.0,
            tchain: int = 10) -> tuple[Atoms, list[float]]:
    a = atoms.copy()
    a.calc = calc
    if ensemble == "nve":
        dyn = VelocityVerlet(a, timestep=dt_fs * units.fs)
        conserved = a.get_total_energy
    else:
        dyn = NoseHooverChainNVT(a, timestep=dt_fs * units.fs, temperature_K=temperature_K,
                                 tdamp=100 * dt_fs * units.fs, tchain=tchain)
        conserved = dyn.get_conserved_energy
    values = []
    dyn.attach(lambda: values.append(conserved()), interval=10)
    dyn.run(steps)
    return a, values


@pytest.mark.parametrize("ensemble", ["nve", "nvt_nhc"])
def test_morse_trajectory_matches_ase(morse, ensemble, tmp_path):
    """200 steps of one system reproduce ASE's positions (1e-8 Å) and conserved quantity from identical momenta."""
    atoms = cu_crystal()
    atoms.set_momenta(maxwell_boltzmann(atoms, 600.0, seed=3, index=0))
    ref, ref_conserved = run_ase(atoms, morse.ase_calculator(), ensemble, 200, 1.5, 600.0)
    path = tmp_path / "t.h5"
    (res,) = run_md([atoms], morse, ensemble=ensemble, temperature=600.0, timestep=1.5, steps=200,
                    trajectory=path, frame_every=10, progress=False)
    assert res.error is None and res.n_steps == 200
    assert np.abs(res.final.positions - ref.positions).max() < 1e-8
    assert np.abs(res.final.get_momenta() - ref.get_momenta()).max() < 1e-8
    from geodite_sim.trajectory import read_trajectory

    ours = [f.info["conserved"] for f in read_trajectory(path)]
    np.testing.assert_allclose(ours, ref_conserved, rtol=0, atol=1e-8)


def test_nhc_geodite_matches_ase(tiny_model):
    """The same with a (tiny, random) Geodite model through GeoditeCalculator, on a binary crystal."""
    model = tiny_model
    atoms = bulk("NaCl", "rocksalt", 5.64, cubic=True)
    atoms.rattle(0.05, seed=2)
    atoms.set_momenta(maxwell_boltzmann(atoms, 500.0, seed=0, index=7))
    ref, _ = run_ase(atoms, GeoditeCalculator(model), "nvt_nhc", 200, 1.0, 500.0)
    (res,) = run_md([atoms], model, ensemble="nvt_nhc", temperature=500.0, timestep=1.0, steps=200, progress=False,
                    monitors=False)
    assert res.error is None
    assert np.abs(res.final.positions - ref.positions).max() < 1e-8


def test_nhc_chain_matches_ase_thermostat():
    """One NHC half-step on several systems at different temperatures equals ASE's thermostat, system by system."""
    from ase.md.nose_hoover_chain import NoseHooverChainThermostat

    rng = np.random.default_rng(0)
    systems = [cu_crystal((1, 1, n)) for n in (1, 2, 3)]
    temps = [300.0, 700.0, 1100.0]
    batch = Batch.from_atoms(systems, dtype=torch.float64)
    p = torch.as_tensor(rng.standard_normal((batch.n_atoms, 3)) * 3.0)
    state = MDState(batch=batch, momenta=p.clone(), kT=torch.tensor(temps, dtype=torch.float64) * units.kB)
    tdamp = 30 * units.fs
    state = init_chain(state, tdamp, 10)
    for _ in range(5):
        nhc_propagate(state, 0.7 * units.fs, tloop=2)
    for s, (a, T) in enumerate(zip(systems, temps)):
        th = NoseHooverChainThermostat(len(a), a.get_masses()[:, None], T, tdamp, tchain=10, tloop=2)
        ps = p[batch.offsets[s]:batch.offsets[s + 1]].numpy().copy()
        for _ in range(5):
            ps = th.integrate_nhc(ps, 0.7 * units.fs)
        np.testing.assert_allclose(state.momenta[batch.offsets[s]:batch.offsets[s + 1]].numpy(), ps, rtol=1e-12)
        np.testing.assert_allclose(state.p_eta[s].numpy(), th._p_eta, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(state.eta[s].numpy(), th._eta, rtol=1e-11, atol=1e-14)


def test_nhc_torch_path_equals_numpy_path():
    """The chain recursion runs in numpy on CPU and in torch elsewhere: both give the same numbers."""
    from geodite_sim.dynamics.nose_hoover import chain_sweeps

    g = torch.Generator().manual_seed(0)
    S, M = 5, 10
    k2 = torch.rand(S, generator=g, dtype=torch.float64) * 3
    n3kT = torch.rand(S, generator=g, dtype=torch.float64) * 3
    kT = torch.rand(S, generator=g, dtype=torch.float64) * 0.1
    Q = torch.rand(S, M, generator=g, dtype=torch.float64) + 0.5
    pe = torch.randn(S, M, generator=g, dtype=torch.float64)
    eta = torch.randn(S, M, generator=g, dtype=torch.float64)
    a = chain_sweeps(k2, n3kT, kT, list(Q.unbind(1)), list(pe.unbind(1)), eta, 0.3, 2, torch.exp, torch.stack)
    b = chain_sweeps(k2.numpy(), n3kT.numpy(), kT.numpy(), list(Q.numpy().T), list(pe.numpy().T), eta.numpy(), 0.3,
                     2, np.exp, np.stack)
    np.testing.assert_allclose(torch.stack(a[0], 1).numpy(), np.stack(b[0], 1), rtol=1e-13)
    np.testing.assert_allclose(a[1].numpy(), b[1], rtol=1e-13)
    np.testing.assert_allclose(a[2].numpy(), b[2], rtol=1e-13)


# ---------------------------------------------------------------------------------------------- Langevin
def free_gas(n=64, spacing=8.0) -> Atoms:
    """Argon atoms on a wide grid: no two within the Morse cutoff, so forces vanish (pure Ornstein–Uhlenbeck)."""
    k = int(np.ceil(n ** (1 / 3)))
    grid = np.array([(i, j, h) for i in range(k) for j in range(k) for h in range(k)][:n], dtype=float) * spacing
    return Atoms("Ar" * n, positions=grid, cell=[k * spacing] * 3, pbc=True)


def vacf_rate(v: np.ndarray, dt_fs: float, max_lag: int) -> float:
    """Decay rate (1/fs) of the velocity autocorrelation, from a log-linear fit over lags < max_lag. v: [T, N, 3]."""
    c = np.array([(v[: len(v) - k] * v[k:]).sum(-1).mean() for k in range(max_lag)])
    lags = np.arange(max_lag) * dt_fs
    return -np.polyfit(lags, np.log(c / c[0]), 1)[0]


def test_langevin_statistics_match_ase(morse, tmp_path):
    """Ideal gas: mean temperature and velocity-autocorrelation decay rate (= friction) agree with ASE's Langevin."""
    T, gamma, dt = 500.0, 0.05, 1.0
    gas = free_gas()
    steps = 600
    # ASE, one system
    a = gas.copy()
    a.calc = morse.ase_calculator()
    a.set_momenta(maxwell_boltzmann(a, T, 0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dyn = Langevin(a, timestep=dt * units.fs, temperature_K=T, friction=gamma / units.fs, fixcm=False,
                       rng=np.random.default_rng(1))
    ase_v, ase_T = [], []

    def record():
        ase_v.append(a.get_velocities().copy())
        ase_T.append(a.get_temperature())

    dyn.attach(record, interval=1)
    dyn.run(steps)
    # ours: 4 copies in one batch (different seeds per structure)
    path = tmp_path / "lgv.h5"
    res = run_md([gas] * 4, morse, ensemble="nvt_langevin", temperature=T, timestep=dt, friction=gamma, steps=steps,
                 trajectory=path, frame_every=1, save_momenta=True, progress=False)
    assert all(r.error is None for r in res)
    from geodite_sim.trajectory import read_trajectory

    rates, temps = [], []
    for s in range(4):
        frames = read_trajectory(path, system=s)
        v = np.stack([f.get_velocities() for f in frames])
        rates.append(vacf_rate(v, dt, 25))
        temps.extend(f.info["temperature"] for f in frames[100:])
    ase_rate = vacf_rate(np.stack(ase_v), dt, 25)
    ours_rate = float(np.mean(rates))
    print(f"Langevin gas: VACF decay rate ours {ours_rate:.4f}/fs, ASE {ase_rate:.4f}/fs (friction {gamma}); "
          f"<T> ours {np.mean(temps):.1f} K, ASE {np.mean(ase_T[100:]):.1f} K (target {T})")
    assert abs(ase_rate - gamma) / gamma < 0.12
    assert abs(ours_rate - gamma) / gamma < 0.08
    assert abs(ours_rate - ase_rate) / gamma < 0.15
    assert abs(np.mean(temps) - T) / T < 0.03
    assert abs(np.mean(ase_T[100:]) - T) / T < 0.06


# ---------------------------------------------------------------------------------------------- velocities, noise
def test_maxwell_boltzmann_is_ase_and_per_structure(morse):
    atoms = cu_crystal((2, 2, 2))
    p = maxwell_boltzmann(atoms, 700.0, seed=11, index=5)
    ref = atoms.copy()
    thermalize_momenta(ref, 700.0, rng=np.random.default_rng([11, 5]))
    Stationary(ref)
    np.testing.assert_allclose(p, ref.get_momenta(), rtol=1e-14)
    assert np.abs(p.sum(0)).max() < 1e-10
    # batch-mates do not matter: the same structure index gives the same momenta in any run composition
    other = [cu_crystal((1, 1, 1), seed=9), atoms]
    res = run_md(other, morse, ensemble="nve", temperature=700.0, steps=0, seed=11, progress=False)
    assert res[1].n_steps == 0
    # index 1 in this run -> seeded by (11, 1), not (11, 5)
    np.testing.assert_allclose(res[1].final.get_momenta(), maxwell_boltzmann(atoms, 700.0, 11, 1), rtol=1e-14)


def _hash32_reference(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 17
    x = (x * 0xED5AD4BB) & m
    x ^= x >> 11
    x = (x * 0xAC4C1B51) & m
    x ^= x >> 15
    x = (x * 0x31848BAB) & m
    x ^= x >> 14
    return x


def test_counter_rng():
    vals = [0, 1, 2, 12345, 0xFFFFFFFF, 0xDEADBEEF, 2**31, 987654321]
    got = hash32(torch.tensor(vals, dtype=torch.long)).tolist()
    assert got == [_hash32_reference(v) for v in vals]
    # a system's noise depends on (seed, step, local index) only, not on its slot or batch-mates
    seed = torch.tensor([7, 99, 7])
    step = torch.tensor([3, 3, 3])
    sys_idx = torch.tensor([0] * 5 + [1] * 4 + [2] * 5)
    local = torch.tensor(list(range(5)) + list(range(4)) + list(range(5)))
    z = counter_normals(seed, step, sys_idx, local, 6, torch.float64)
    assert torch.equal(z[:5], z[9:])
    assert not torch.equal(z[:4], z[5:9])
    # moments and decorrelation over many draws
    n = 200_000
    zs = counter_normals(torch.tensor([1]), torch.tensor([0]), torch.zeros(n, dtype=torch.long),
                         torch.arange(n), 6, torch.float64)
    z2 = counter_normals(torch.tensor([1]), torch.tensor([1]), torch.zeros(n, dtype=torch.long),
                         torch.arange(n), 6, torch.float64)
    assert abs(float(zs.mean())) < 0.005 and abs(float(zs.var()) - 1) < 0.01
    assert abs(float((zs**4).mean()) - 3) < 0.05
    corr = np.corrcoef(zs.flatten().numpy(), z2.flatten().numpy())[0, 1]
    assert abs(corr) < 0.005
    assert abs(float((zs[:, 0] * zs[:, 1]).mean())) < 0.01
    assert abs(float((zs[1:, 0] * zs[:-1, 0]).mean())) < 0.01
