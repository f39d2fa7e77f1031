"""Analysis: partial RDFs against ASE and a brute-force all-images histogram, overlap scores,
unwrapping, MSD against a direct computation, and D of a synthetic random walk."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.geometry.rdf import get_rdf

from geodite_sim.analysis import (
    compare_rdfs,
    compute_msd,
    compute_rdf,
    diffusion_coefficients,
    load_frames,
    max_rdf_radius,
    overlap_score,
    shortest_lattice_vector,
    unwrap_positions,
)
from geodite_sim.analysis.rdf import pair_name, perpendicular_widths


def einstein_frames(atoms: Atoms, sigma: float, n: int, seed: int, strain: float = 0.0) -> list[Atoms]:
    """Frames of an Einstein crystal: Gaussian displacements of rms ``sigma`` per component (σ² ∝ T)."""
    rng = np.random.default_rng(seed)
    base = atoms.copy()
    if strain:
        base.set_cell(base.cell[:] * (1.0 + strain), scale_atoms=True)
    frames = []
    for _ in range(n):
        a = base.copy()
        a.positions += rng.normal(0.0, sigma, a.positions.shape)
        a.wrap()
        frames.append(a)
    return frames


def stack(frames: list[Atoms]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.stack([a.positions for a in frames]), np.stack([a.cell[:] for a in frames]), frames[0].numbers)


def brute_force_rdf(frames: list[Atoms], edges: np.ndarray) -> dict[str, np.ndarray]:
    """Partial g(r) from every ordered pair of atoms over every periodic image within edges[-1] (numpy)."""
    r_max = edges[-1]
    out: dict[str, np.ndarray] = {}
    numbers = frames[0].numbers
    species = np.unique(numbers)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    for a in frames:
        cell = a.cell[:]
        m = [int(np.ceil(r_max / w)) + 1 for w in perpendicular_widths(cell)]
        shifts = np.array(list(itertools.product(*[range(-k, k + 1) for k in m]))) @ cell
        d = a.positions[None, :, None, :] + shifts[None, None] - a.positions[:, None, None, :]  # [i, j, K, 3]
        r = np.linalg.norm(d, axis=-1)
        for za, zb in itertools.combinations_with_replacement(species, 2):
            ia, ib = numbers == za, numbers == zb
            rr = r[ia][:, ib].ravel()
            rr = rr[(rr > 1e-8) & (rr < r_max)]
            h, _ = np.histogram(rr, bins=edges)
            g = h * a.cell.volume / (ia.sum() * ib.sum() * shell)
            key = pair_name(za, zb)
            out[key] = out.get(key, 0.0) + g / len(frames)
    return out


# ---------------------------------------------------------------------------------------------- geometry
def test_shortest_lattice_vector_is_not_the_shortest_basis_vector():
    cell = np.array([[10.0, 0.0, 0.0], [9.0, 4.0, 0.0], [0.0, 0.0, 10.0]])
    assert np.linalg.norm(cell, axis=1).min() == pytest.approx(9.8489, abs=1e-3)
    assert shortest_lattice_vector(cell) == pytest.approx(np.sqrt(17.0))  # b - a = (-1, 4, 0)
    assert max_rdf_radius(cell) == pytest.approx(np.sqrt(17.0) / 2)
    # Same lattice, any unimodular change of basis: same answer.
    op = np.array([[1, 2, 0], [0, 1, 0], [3, 1, 1]])
    assert shortest_lattice_vector(op @ cell) == pytest.approx(np.sqrt(17.0))
    # Sheared cube: perpendicular widths shrink, the shortest translation does not.
    sheared = np.array([[8.0, 0, 0], [8.0, 8.0, 0], [8.0, 8.0, 8.0]])
    assert shortest_lattice_vector(sheared) == pytest.approx(8.0)
    assert perpendicular_widths(sheared).min() < 8.0 * 0.75


# ---------------------------------------------------------------------------------------------- RDF
def test_rdf_matches_ase_on_orthorhombic_frames():
    atoms = bulk("NaCl", "rocksalt", 5.64, cubic=True) * (3, 3, 2)
    frames = einstein_frames(atoms, 0.15, 4, seed=1)
    res = compute_rdf(*stack(frames))
    assert res.bin_width == pytest.approx(0.05)
    assert res.r_max == pytest.approx(np.floor(0.5 * 2 * 5.64 / 0.05) * 0.05)
    assert set(res.g) == {"Na-Na", "Na-Cl", "Cl-Cl"}
    for el, key in [(("Na", "Na"), "Na-Na"), (("Na", "Cl"), "Na-Cl"), (("Cl", "Na"), "Na-Cl"), (("Cl", "Cl"), "Cl-Cl")]:
        g_ase, _ = get_rdf(frames, res.r_max, len(res.r), elements=el)
        np.testing.assert_allclose(res.g[key], g_ase, atol=1e-10)


def test_rdf_triclinic_beyond_perpendicular_width_matches_all_images():
    """fcc primitive supercell: r_max = L/2 > w_min/2 (ASE's get_rdf refuses this range)."""
    atoms = bulk("NaCl", "rocksalt", 5.64) * (3, 3, 3)  # 54 atoms, 60° cell
    frames = einstein_frames(atoms, 0.12, 3, seed=2)
    res = compute_rdf(*stack(frames))
    widths = perpendicular_widths(atoms.cell[:])
    assert res.r_max > 0.5 * widths.min() + 0.3
    ref = brute_force_rdf(frames, res.edges)
    for key in res.g:
        np.testing.assert_allclose(res.g[key], ref[key], atol=1e-9)
    # The same atoms described by a strongly skewed basis of the same lattice give the same RDF.
    op = np.array([[1, 2, 0], [0, 1, 0], [1, 1, 1]])
    assert abs(round(np.linalg.det(op))) == 1
    skewed = []
    for a in frames:
        b = a.copy()
        b.set_cell(op @ a.cell[:], scale_atoms=False)
        b.wrap()
        skewed.append(b)
    res2 = compute_rdf(*stack(skewed))
    assert res2.r_max == pytest.approx(res.r_max)
    for key in res.g:
        np.testing.assert_allclose(res2.g[key], res.g[key], atol=1e-9)


def test_rdf_refuses_r_max_beyond_half_the_shortest_translation():
    atoms = bulk("Cu", "fcc", 3.6, cubic=True) * 2
    pos, cells, z = stack([atoms])
    with pytest.raises(ValueError, match="shortest periodic-image"):
        compute_rdf(pos, cells, z, r_max=3.7)


def test_rdf_ideal_gas_tends_to_one():
    rng = np.random.default_rng(3)
    cell = np.diag([14.0, 15.0, 16.0])
    numbers = np.array([3] * 100 + [8] * 60)
    pos = rng.random((40, 160, 3)) @ cell
    res = compute_rdf(pos, cell, numbers)
    for key, g in res.g.items():
        tail = g[res.r > 3.0]
        assert abs(tail.mean() - 1.0) < 0.03, key


# ---------------------------------------------------------------------------------------------- scores
def test_overlap_scores_identity_heating_strain():
    atoms = bulk("NaCl", "rocksalt", 5.64, cubic=True) * (3, 3, 3)
    cold = compute_rdf(*stack(einstein_frames(atoms, 0.10, 6, seed=10)))
    cold2 = compute_rdf(*stack(einstein_frames(atoms, 0.10, 6, seed=11)))
    hot = compute_rdf(*stack(einstein_frames(atoms, 0.20, 6, seed=12)))
    strained = compute_rdf(*stack(einstein_frames(atoms, 0.10, 6, seed=13, strain=0.03)))

    same = compare_rdfs(cold, cold)
    assert same.score == 1.0 and all(v == 1.0 for v in same.pair_scores.values())
    resample = compare_rdfs(cold, cold2).score
    heated = compare_rdfs(cold, hot)
    strain = compare_rdfs(cold, strained)
    assert resample > 0.95
    assert heated.score < resample - 0.1
    assert strain.score < resample - 0.1
    assert heated.worst_pair in heated.pair_scores
    assert heated.score == min(heated.pair_scores.values())


def test_halves_score_measures_sampling_noise():
    """Frames.halves: the first vs the second half of one stationary run scores below 1 by sampling noise only,
    and closer to 1 the more frames there are (the distill report's resolution of its RDF check)."""
    from geodite_sim.analysis import Frames

    atoms = bulk("NaCl", "rocksalt", 5.64, cubic=True) * (2, 2, 2)

    def halves_score(n_frames):
        pos, cells, numbers = stack(einstein_frames(atoms, 0.12, n_frames, seed=5))
        fr = Frames(pos, cells, numbers, np.ones(len(numbers)), np.arange(n_frames) * 10.0)
        a, b = fr.halves()
        assert len(a) + len(b) == n_frames and np.array_equal(np.concatenate([a.positions, b.positions]), pos)
        return compare_rdfs(a.rdf(), b.rdf()).score

    short, long = halves_score(8), halves_score(128)
    assert short < long < 1.0
    assert 1 - long < 0.5 * (1 - short)  # noise ~ 1/sqrt(frames): 16x the frames, ~1/4 the distance from 1


def test_overlap_score_limits():
    g = np.array([0.0, 1.0, 2.0, 1.0])
    assert overlap_score(g, g) == 1.0
    assert overlap_score(np.array([1.0, 0, 0]), np.array([0, 0, 1.0])) == 0.0
    assert np.isnan(overlap_score(np.zeros(3), np.zeros(3)))
    with pytest.raises(ValueError):
        overlap_score(np.zeros(3), np.zeros(4))


# ---------------------------------------------------------------------------------------------- MSD
def random_walk(n_frames=2000, n_walkers=256, sigma=0.15, box=16.0, seed=0):
    """Walkers (Li) with Gaussian steps of ``sigma`` Å per component per frame and a frozen I framework."""
    rng = np.random.default_rng(seed)
    cell = np.diag([box, box * 1.1, box * 0.9])
    frame_pos = rng.random((64, 3)) @ cell
    walk0 = rng.random((n_walkers, 3)) @ cell
    steps = rng.normal(0.0, sigma, (n_frames - 1, n_walkers, 3))
    walkers = np.concatenate([walk0[None], walk0[None] + np.cumsum(steps, axis=0)])  # unwrapped
    true = np.concatenate([walkers, np.broadcast_to(frame_pos, (n_frames, 64, 3))], axis=1)
    numbers = np.array([3] * n_walkers + [53] * 64)
    return true, cell, numbers


def test_unwrap_recovers_continuous_paths():
    true, cell, numbers = random_walk(n_frames=300, n_walkers=20, sigma=0.4, box=5.0)
    frac = true @ np.linalg.inv(cell)
    wrapped = (frac - np.floor(frac)) @ cell
    assert np.abs(wrapped - true).max() > 5.0  # boundaries were crossed
    un = unwrap_positions(wrapped, cell).numpy()
    np.testing.assert_allclose(un, wrapped[0] + (true - true[0]), atol=1e-9)


def test_msd_fft_matches_direct_average():
    rng = np.random.default_rng(4)
    pos = np.cumsum(rng.normal(0, 0.3, (60, 7, 3)), axis=0)
    numbers = np.array([3, 3, 3, 3, 8, 8, 8])
    res = compute_msd(pos, np.eye(3) * 100.0, numbers, 10.0, remove_com=False, unwrapped=True,
                      max_lag_fraction=1.0)
    for z, sym in [(3, "Li"), (8, "O")]:
        x = pos[:, numbers == z]
        direct = [np.mean(np.sum((x[m:] - x[: len(x) - m]) ** 2, axis=-1)) for m in range(len(res.t_fs))]
        np.testing.assert_allclose(res.msd[sym], direct, rtol=1e-10, atol=1e-12)
    assert res.t_fs[1] == 10.0


def test_diffusion_of_random_walk_trajectory_file(tmp_path):
    """A random walk written as a geodite_sim HDF5 trajectory (wrapped, float32): D within 5 %."""
    from geodite_sim.trajectory import TrajectoryWriter

    sigma, dt_frame = 0.15, 15.0
    true, cell, numbers = random_walk(n_frames=1400, n_walkers=2048, sigma=sigma)  # ~1.6 % statistical error
    frac = true @ np.linalg.inv(cell)
    wrapped = (frac - np.floor(frac)) @ cell
    path = tmp_path / "walk.h5"
    w = TrajectoryWriter(path, {"timestep_fs": 1.5, "frame_every": 10}, block=256)
    w.add_system(0, numbers, np.where(numbers == 3, 6.94, 126.9), np.ones(3, bool), {"label": "walk"})
    for t in range(len(wrapped)):
        w.add_frame(0, {"positions": wrapped[t], "cell": cell, "energy": 0.0, "kinetic_energy": 0.0,
                        "temperature": 0.0, "conserved": 0.0, "step": 10 * t})
    w.close()

    frames = load_frames(path, discard_fs=3000.0)  # 200 frames discarded
    assert len(frames) == 1200 and frames.frame_interval_fs == pytest.approx(dt_frame)
    expected = sigma**2 / (2 * dt_frame) * 1000.0  # Å²/ps
    for remove_com in (False, True):
        msd = frames.msd(remove_com=remove_com)
        fits = diffusion_coefficients(msd)
        assert fits["Li"].D_A2_per_ps == pytest.approx(expected, rel=0.05)
        assert fits["Li"].D_cm2_per_s == pytest.approx(expected * 1e-4, rel=0.05)
        assert abs(fits["I"].D_A2_per_ps) < 0.02 * expected
    # A fixed window in fs is honoured.
    fit = diffusion_coefficients(msd, window_fs=(1500.0, 6000.0))["Li"]
    assert fit.window_fs == (1500.0, 6000.0) and fit.n_points == 301 and fit.r2 > 0.99
    assert fit.D_A2_per_ps == pytest.approx(expected, rel=0.05)


def test_load_frames_extxyz_and_atoms(tmp_path):
    from ase.io import write

    atoms = bulk("NaCl", "rocksalt", 5.64, cubic=True)
    frames = einstein_frames(atoms, 0.1, 10, seed=5)
    for k, a in enumerate(frames):
        a.info["time_fs"] = 20.0 * k
    path = tmp_path / "ref.extxyz"
    write(path, frames)
    f = load_frames(path, discard_fs=60.0, stride=2)
    assert len(f) == 4 and list(f.times_fs) == [60.0, 100.0, 140.0, 180.0]
    np.testing.assert_allclose(f.positions[0], frames[3].positions, atol=1e-6)
    # Without times, frame_interval_fs is needed.
    for a in frames:
        del a.info["time_fs"]
    with pytest.raises(ValueError, match="frame_interval_fs"):
        load_frames(frames, discard_fs=10.0)
    f = load_frames(frames, discard_fs=30.0, frame_interval_fs=10.0)
    assert len(f) == 7 and f.times_fs[0] == 30.0
    traj = tmp_path / "ref.traj"
    write(traj, frames)
    assert len(load_frames(traj, frame_interval_fs=10.0)) == 10
