"""MTK NPT (isotropic and full cell) against ASE 3.29, batch invariance, purity, and NPT physics."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT
from conftest import tiny_geodite
from scipy.optimize import brentq

from geodite_sim import GeoditeCalculator
from geodite_sim.batch import Batch
from geodite_sim.dynamics import mtk
from geodite_sim.dynamics.velocities import maxwell_boltzmann
from geodite_sim.dynamics.verlet import MDState
from geodite_sim.neighbors import neighbor_list
from geodite_sim.pair_potential import MorsePotential

ENSEMBLES = {
    "npt_mtk_iso": (IsotropicMTKNPT, mtk.mtk_iso_init, mtk.mtk_iso_step),
    "npt_mtk": (MTKNPT, mtk.mtk_init, mtk.mtk_step),
}


def morse() -> MorsePotential:
    return MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2, dtype=torch.float64)


def make_force_fn(model, backend: str = "torch"):
    """(energy, forces, stress) of a batch. The comparisons with ASE use the reference "torch" neighbour list;
    the long statistical runs pass "auto" (nvalchemiops on CPU, ~6x faster here; the same edges)."""

    def force_fn(batch):
        out = model(batch, edges=neighbor_list(batch, model.cutoff, backend), compute_forces=True,
                    compute_stress=True)
        return out["energy"], out["forces"], out["stress"]

    return force_fn


def md_state(atoms_list: list[Atoms], temps: list[float], force_fn) -> MDState:
    batch = Batch.from_atoms(atoms_list, dtype=torch.float64)
    energy, forces, stress = force_fn(batch)
    S = len(atoms_list)
    return MDState(batch=batch, energy=energy, forces=forces, stress=stress,
                   momenta=torch.as_tensor(np.concatenate([a.get_momenta() for a in atoms_list])),
                   kT=torch.tensor(temps, dtype=torch.float64) * units.kB, step=torch.zeros(S, dtype=torch.long),
                   target_steps=torch.full((S,), 1000, dtype=torch.long), seed=torch.arange(S, dtype=torch.long))


def run_ours(ensemble, atoms_list, force_fn, dt, steps, temps, pressure, tdamp, pdamp, tchain=3, pchain=3,
             tloop=1, ploop=1, record=None):
    _, init, step = ENSEMBLES[ensemble]
    state = init(md_state(atoms_list, temps, force_fn), pressure=pressure, tdamp=tdamp, pdamp=pdamp,
                 chain_length=tchain, barostat_chain_length=pchain)
    for _ in range(steps):
        state = step(state, force_fn, dt, tloop=tloop, ploop=ploop)
        if record is not None:
            record(state)
    return state


def run_ase(ensemble, atoms, calc, dt, steps, T, pressure, tdamp, pdamp, tchain=3, pchain=3, tloop=1, ploop=1):
    cls = ENSEMBLES[ensemble][0]
    a = atoms.copy()
    a.set_momenta(atoms.get_momenta())
    a.calc = calc
    dyn = cls(a, timestep=dt, temperature_K=T, pressure_au=pressure, tdamp=tdamp, pdamp=pdamp, tchain=tchain,
              pchain=pchain, tloop=tloop, ploop=ploop)
    dyn.run(steps)
    return a, dyn.get_conserved_energy()


def cu(reps=(2, 2, 2), a0=3.58, rattle=0.05, seed=1, cubic=True, strain=None) -> Atoms:
    atoms = bulk("Cu", "fcc", a0, cubic=cubic) * reps
    if strain is not None:
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + strain), scale_atoms=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


def three_systems() -> tuple[list[Atoms], dict]:
    """Three different Cu cells (compressed cubic, 32 atoms; strained triclinic, 32 atoms; primitive 3x3x3,
    27 atoms) with their own targets. (Cells below ~7 Å make ASE's Python neighbour list slow.)"""
    rng = np.random.default_rng(4)
    systems = [cu((2, 2, 2), 3.55), cu((2, 2, 2), 3.62, strain=0.03 * rng.standard_normal((3, 3)), seed=2),
               cu((3, 3, 3), 3.60, cubic=False, seed=3)]
    temps = [600.0, 300.0, 900.0]
    for i, (a, T) in enumerate(zip(systems, temps, strict=True)):
        a.set_momenta(maxwell_boltzmann(a, T, seed=7, index=i))
    dt = 1.5 * units.fs
    params = dict(temps=temps, pressure=[1.0 * units.GPa, 0.0, -0.5 * units.GPa],
                  tdamp=[20 * dt, 50 * dt, 10 * dt], pdamp=[100 * dt, 60 * dt, 150 * dt])
    return systems, params


@pytest.mark.parametrize("ensemble", list(ENSEMBLES))
def test_morse_batch_matches_ase(ensemble):
    """200 steps of 3 different systems in one batch: each equals ASE's solo run (positions, cells, momenta
    to 1e-8; conserved energy to 1e-8 eV), and system 0 equals our own solo run (batch invariance)."""
    model = morse()
    force_fn = make_force_fn(model)
    systems, prm = three_systems()
    dt, steps = 1.5 * units.fs, 200
    kw = dict(tchain=4, pchain=3, tloop=1, ploop=2)
    state = run_ours(ensemble, systems, force_fn, dt, steps, prm["temps"], prm["pressure"], prm["tdamp"],
                     prm["pdamp"], **kw)
    b = state.batch
    cons = mtk.conserved(state)
    worst = np.zeros(4)
    for s, atoms in enumerate(systems):
        ref, ref_cons = run_ase(ensemble, atoms, model.ase_calculator(), dt, steps, prm["temps"][s],
                                prm["pressure"][s], prm["tdamp"][s], prm["pdamp"][s], **kw)
        lo, hi = int(b.offsets[s]), int(b.offsets[s + 1])
        assert np.abs(b.positions[lo:hi].numpy() - ref.positions).max() < 1e-8
        assert np.abs(b.cell[s].numpy() - ref.cell[:]).max() < 1e-8
        assert np.abs(state.momenta[lo:hi].numpy() - ref.get_momenta()).max() < 1e-8
        assert abs(float(cons[s]) - ref_cons) < 1e-8
        assert np.abs(ref.cell[:] - atoms.cell[:]).max() > 0.02  # the barostat really moved the cell
        worst = np.maximum(worst, [np.abs(b.positions[lo:hi].numpy() - ref.positions).max(),
                                   np.abs(b.cell[s].numpy() - ref.cell[:]).max(),
                                   abs(float(cons[s]) - ref_cons), np.abs(ref.cell[:] - atoms.cell[:]).max()])
    print(f"{ensemble} batch of 3 vs ASE, 200 steps: max |dr| {worst[0]:.1e} A, |dcell| {worst[1]:.1e} A, "
          f"|dconserved| {worst[2]:.1e} eV (cell moved up to {worst[3]:.2f} A)")
    solo = run_ours(ensemble, systems[:1], force_fn, dt, steps, prm["temps"][:1], prm["pressure"][:1],
                    prm["tdamp"][:1], prm["pdamp"][:1], **kw)
    n0 = int(b.offsets[1])
    assert torch.allclose(solo.batch.positions, b.positions[:n0], rtol=0, atol=1e-12)
    assert torch.allclose(solo.batch.cell[0], b.cell[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("ensemble", list(ENSEMBLES))
def test_geodite_matches_ase(ensemble):
    """The tiny random Geodite through GeoditeCalculator: 200 steps of rattled NaCl equal ASE's to 1e-8 Å."""
    model = tiny_geodite()
    model.forward = functools.partial(model.forward, neighbor_backend="torch")  # GeoditeCalculator's list too
    atoms = bulk("NaCl", "rocksalt", 5.64, cubic=True)
    atoms.rattle(0.05, seed=2)
    atoms.set_momenta(maxwell_boltzmann(atoms, 500.0, seed=0, index=7))
    dt, steps, T, P = 1.0 * units.fs, 200, 500.0, 0.5 * units.GPa
    state = run_ours(ensemble, [atoms], make_force_fn(model), dt, steps, [T], P, 25 * dt, 80 * dt)
    ref, ref_cons = run_ase(ensemble, atoms, GeoditeCalculator(model), dt, steps, T, P, 25 * dt, 80 * dt)
    assert np.abs(state.batch.positions.numpy() - ref.positions).max() < 1e-8
    assert np.abs(state.batch.cell[0].numpy() - ref.cell[:]).max() < 1e-8
    assert abs(float(mtk.conserved(state)[0]) - ref_cons) < 1e-8
    assert np.abs(ref.cell[:] - atoms.cell[:]).max() > 1e-3
    print(f"{ensemble} Geodite NaCl vs ASE, 200 steps: max |dr| "
          f"{np.abs(state.batch.positions.numpy() - ref.positions).max():.1e} A, |dcell| "
          f"{np.abs(state.batch.cell[0].numpy() - ref.cell[:]).max():.1e} A (cell moved "
          f"{np.abs(ref.cell[:] - atoms.cell[:]).max():.3f} A)")


@pytest.mark.parametrize("ensemble", list(ENSEMBLES))
def test_step_is_pure_and_empty_systems_stay_finite(ensemble):
    """A step leaves its input untouched; a 0-atom system with kT = 0 in the batch gives no NaN/Inf and does
    not change its neighbour's trajectory."""
    model = morse()
    force_fn = make_force_fn(model)
    real = cu((1, 1, 1), 3.6)
    real.set_momenta(maxwell_boltzmann(real, 400.0, seed=1, index=0))
    empty = Atoms(cell=np.eye(3) * 10.0, pbc=True)
    _, init, step = ENSEMBLES[ensemble]
    dt = 1.0 * units.fs
    state = init(md_state([empty, real], [0.0, 400.0], force_fn), pressure=[0.0, 0.1 * units.GPa],
                 tdamp=[0.0, 20 * dt], pdamp=[0.0, 80 * dt])
    snapshot = {k: v.clone() for k, v in vars(state).items() if isinstance(v, torch.Tensor)}
    positions, cell = state.batch.positions.clone(), state.batch.cell.clone()
    for _ in range(20):
        new = step(state, force_fn, dt)
        for k, v in snapshot.items():
            assert torch.equal(getattr(state, k), v), k
        assert torch.equal(state.batch.positions, positions) and torch.equal(state.batch.cell, cell)
        state = new
        snapshot = {k: v.clone() for k, v in vars(state).items() if isinstance(v, torch.Tensor)}
        positions, cell = state.batch.positions.clone(), state.batch.cell.clone()
    for k, v in snapshot.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    assert torch.isfinite(mtk.conserved(state)).all()
    solo = init(md_state([real], [400.0], force_fn), pressure=0.1 * units.GPa, tdamp=20 * dt, pdamp=80 * dt)
    for _ in range(20):
        solo = step(solo, force_fn, dt)
    assert torch.allclose(solo.batch.positions, state.batch.positions, rtol=0, atol=1e-13)
    assert torch.equal(state.batch.cell[0], cell[0])


class NoHostSync:
    """Fails on the aten ops behind host reads (.item(), bool()/int()/float() of a tensor, nonzero, boolean-mask
    indexing, unique, bincount, torch.equal, repeat_interleave without output_size): a CPU stand-in for CUDA's
    sync debug mode."""

    BAD = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "bincount", "equal",
           "repeat_interleave.Tensor", "masked_scatter", "index.Tensor")

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        bad = self.BAD

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__
                if any(name == b or name.startswith(b + ".") for b in bad):
                    if name == "index.Tensor" and not any(
                            t is not None and t.dtype == torch.bool for t in args[1]):
                        return func(*args, **(kwargs or {}))
                    raise AssertionError(f"host synchronisation inside a step: {func}")
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def harmonic_force_fn(frac: torch.Tensor, k: float = 2.0):
    """Springs to fixed fractional sites plus a volume-dependent stress, computed without host reads."""

    def force_fn(batch):
        sites = torch.einsum("ni,nij->nj", frac, batch.cell[batch.system_index])
        d = batch.positions - sites
        S = batch.n_systems
        energy = batch.positions.new_zeros(S).index_add_(0, batch.system_index, 0.5 * k * (d * d).sum(-1))
        vol = mtk.det3(batch.cell).abs()
        stress = (0.01 * (vol / 40.0 - 1.0))[:, None, None] * torch.eye(3, dtype=d.dtype)
        return energy, -k * d, stress

    return force_fn


@pytest.mark.parametrize("ensemble", list(ENSEMBLES))
def test_step_needs_no_host_sync(ensemble):
    """A step (with a sync-free force function) issues none of the operations that read back to the host."""
    systems = [cu((1, 1, 1), 3.6), cu((1, 1, 2), 3.5, seed=4)]
    for i, a in enumerate(systems):
        a.set_momenta(maxwell_boltzmann(a, 300.0, seed=1, index=i))
    batch = Batch.from_atoms(systems, dtype=torch.float64)
    frac = torch.linalg.solve(batch.cell[batch.system_index].transpose(1, 2), batch.positions[:, :, None])[..., 0]
    force_fn = harmonic_force_fn(frac)
    _, init, step = ENSEMBLES[ensemble]
    state = init(md_state(systems, [300.0, 600.0], force_fn), pressure=[0.0, 0.01], tdamp=10.0, pdamp=50.0,
                 chain_length=5, barostat_chain_length=4)
    with NoHostSync():
        for _ in range(3):
            state = step(state, force_fn, 0.1, tloop=2, ploop=2)
        cons = mtk.conserved(state)
    assert torch.isfinite(cons).all() and bool((state.step == 3).all())
    for read in (lambda: float(state.kT[0]), lambda: state.momenta[state.momenta > 0],
                 lambda: torch.equal(state.kT, state.kT)):
        with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
            read()


def test_expm_phi_against_eigh():
    """e^X and φ(X) = (e^X - I)/X of symmetric matrices (small and large norms) equal the eigendecomposition's."""
    from scipy.special import exprel

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    x = 0.5 * (a + a.transpose(1, 2)) * torch.tensor([1e-9, 1e-4, 0.3, 2.0, 20.0, 0.0], dtype=torch.float64)[:, None,
                                                                                                          None]
    e, phi = mtk.expm_phi(x)
    lam, u = np.linalg.eigh(x.numpy())
    e_ref = np.einsum("sij,sj,skj->sik", u, np.exp(lam), u)
    phi_ref = np.einsum("sij,sj,skj->sik", u, exprel(lam), u)
    np.testing.assert_allclose(e.numpy(), e_ref, rtol=1e-12, atol=1e-12 * np.abs(e_ref).max())
    np.testing.assert_allclose(phi.numpy(), phi_ref, rtol=1e-12, atol=1e-12 * np.abs(phi_ref).max())
    np.testing.assert_allclose(e.numpy(), torch.linalg.matrix_exp(x).numpy(), rtol=1e-12,
                               atol=1e-12 * np.abs(e_ref).max())


def test_pressure_units():
    assert mtk.gpa_to_ev_per_a3(1.0) == units.GPa
    assert abs(mtk.ev_per_a3_to_gpa(1.0) - 160.21766) < 1e-4


# ---------------------------------------------------------------------------------------------- physics
def relaxed_cu_lattice(model) -> float:
    """Lattice constant at zero pressure of the Morse 'Cu' (fcc), from ASE's stress."""
    calc = model.ase_calculator()

    def pressure(a0):
        atoms = bulk("Cu", "fcc", a0, cubic=True)
        atoms.calc = calc
        return -atoms.get_stress()[:3].mean()

    return brentq(pressure, 3.3, 3.9, xtol=1e-12)


def npt_physics(ensemble, steps, reps=(2, 2, 2), backend="auto"):
    """One batch: [20 K, 0 GPa], [900 K, 0 GPa], [300 K, 2 GPa], started from the relaxed cell."""
    model = morse()
    a0 = relaxed_cu_lattice(model)
    temps = [20.0, 900.0, 300.0]
    pressure = [0.0, 0.0, 2.0 * units.GPa]
    systems = []
    for i, T in enumerate(temps):
        a = bulk("Cu", "fcc", a0, cubic=True) * reps
        a.set_momenta(maxwell_boltzmann(a, T, seed=5, index=i))
        systems.append(a)
    v_relaxed = systems[0].get_volume()
    dt = 2.0 * units.fs
    vols, press = [], []

    def record(state):
        vols.append(mtk.volume(state).numpy().copy())
        press.append(mtk.instantaneous_pressure(state).numpy().copy())

    t0 = time.time()
    # ASE's cell mass W ∝ kT: at 20 K the cell period is ~10 steps for pdamp = 150 dt, and the full-cell run
    # develops a growing volume oscillation (±0.3 % after 3000 steps); the cold system gets a slower barostat.
    pdamp = [500 * dt, 150 * dt, 150 * dt]
    run_ours(ensemble, systems, make_force_fn(model, backend), dt, steps, temps, pressure, 50 * dt, pdamp,
             record=record)
    elapsed = time.time() - t0
    return v_relaxed, np.array(vols), np.array(press) / units.GPa, elapsed


def block_error(x: np.ndarray, n_blocks: int = 10) -> float:
    blocks = np.array_split(x, n_blocks)
    return float(np.std([b.mean() for b in blocks], ddof=1) / np.sqrt(n_blocks))


def _check_physics(ensemble, steps, reps=(2, 2, 2)):
    v0, vols, press, elapsed = npt_physics(ensemble, steps, reps)
    burn = steps // 5
    v_cold, v_hot = vols[burn:, 0].mean(), vols[burn:, 1].mean()
    p_mean = press[burn:, 2].mean()
    p_err = block_error(press[burn:, 2])
    print(f"{ensemble} {steps} steps ({elapsed:.1f} s): V(20 K)/V0 - 1 = {v_cold / v0 - 1:+.5f}, "
          f"V(900 K)/V0 - 1 = {v_hot / v0 - 1:+.5f}, <P>(2 GPa target) = {p_mean:.3f} ± {p_err:.3f} GPa, "
          f"max |V(20 K)/V0 - 1| = {np.abs(vols[:, 0] / v0 - 1).max():.5f}")
    assert np.abs(vols[:, 0] / v0 - 1).max() < 0.005  # low T, 0 GPa: the relaxed volume, every step
    assert v_hot / v0 - 1 > 0.01  # thermal expansion (Morse 'Cu': ~ +3 % at 900 K)
    assert abs(p_mean - 2.0) < max(4 * p_err, 0.05)


def test_npt_physics():
    """Isotropic MTK, 32-atom Morse Cu: 0 GPa and 20 K keeps the relaxed volume (< 0.5 %) at every step; 900 K
    expands it (> 1 %); the pressure of a 300 K, 2 GPa system averages to 2 GPa within 4 block errors."""
    _check_physics("npt_mtk_iso", 600)


@pytest.mark.slow
@pytest.mark.parametrize("ensemble", list(ENSEMBLES))
def test_npt_physics_long(ensemble):
    """The same, both ensembles, 108 atoms and 3000 steps (6 ps)."""
    _check_physics(ensemble, 3000, reps=(3, 3, 3))


# ---------------------------------------------------------------------------------------------- presets
def test_md_presets():
    from geodite_sim.md_presets import ATM_GPA, get_preset, preset_names

    sse = get_preset("sse_nvt")
    assert (sse.ensemble, sse.chain_length, sse.timestep_fs, sse.tdamp_fs, sse.steps) == ("nvt_nhc", 10, 1.5, 150.0,
                                                                                          700_000)
    assert "pressure" not in sse.run_md_kwargs()
    npt = get_preset("ms25_npt_iso").run_md_kwargs()
    assert npt["ensemble"] == "npt_mtk_iso" and npt["pdamp"] == 1000 * npt["timestep"]
    assert abs(mtk.gpa_to_ev_per_a3(ATM_GPA) - 1.01325 * units.bar) < 1e-15
    assert {"sse_nvt", "sse_npt", "ms25_npt", "ms25_npt_iso"} <= set(preset_names())
    with pytest.raises(ValueError, match="available presets: .*sse_nvt"):
        get_preset("nope")
