"""Synthetic trajectories with a known tracer D (Brownian mobile ions in a vibrating heavy framework, triclinic
cell); used by tests/analysis/test_transport.py and benchmarks/transport_coverage.py."""

from __future__ import annotations

import numpy as np

#: A triclinic cell (rows = lattice vectors, Å); perpendicular widths 7.5–8.1 Å.
CELL = np.array([[8.6, 0.0, 0.0], [2.9, 8.1, 0.0], [1.7, 2.3, 7.6]])
#: Arrhenius law of the synthetic mobile ion: D = D0 exp(-Ea / kT).
D0_A2_PER_PS, EA_EV = 50.0, 0.2
K_B_EV = 1.380649e-23 / 1.602176634e-19


def d_true(temperature_K: float) -> float:
    """Tracer D of the synthetic mobile ion, Å²/ps."""
    return D0_A2_PER_PS * np.exp(-EA_EV / (K_B_EV * temperature_K))


def brownian(d_a2_per_ps: float, seed: int, n_frames: int = 2000, dt_fs: float = 10.0, n_mobile: int = 32,
             n_frame: int = 32, drift_A_per_ps=(0.0, 0.0, 0.0)):
    """Wrapped positions [T, N, 3] and the true continuous ones: ``n_mobile`` Li doing Brownian motion
    (per-axis step variance 2 D Δt) and ``n_frame`` I vibrating (0.15 Å) about fixed sites; every atom
    also drifts by ``drift_A_per_ps``. Returns (wrapped, true, numbers, masses)."""
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(2.0 * d_a2_per_ps * dt_fs / 1000.0)
    steps = rng.normal(0.0, sigma, (n_frames, n_mobile, 3))
    steps[0] = 0.0
    start = rng.uniform(0, 1, (n_mobile, 3)) @ CELL
    mobile = start + np.cumsum(steps, axis=0)
    sites = rng.uniform(0, 1, (n_frame, 3)) @ CELL
    frame = sites + rng.normal(0.0, 0.15, (n_frames, n_frame, 3))
    true = np.concatenate([mobile, frame], axis=1)
    true = true + np.arange(n_frames)[:, None, None] * (np.asarray(drift_A_per_ps) * dt_fs / 1000.0)
    frac = true @ np.linalg.inv(CELL)
    wrapped = (frac - np.floor(frac)) @ CELL
    numbers = np.array([3] * n_mobile + [53] * n_frame)
    masses = np.where(numbers == 3, 6.94, 126.9)
    return wrapped, true, numbers, masses


def write_h5(path, wrapped, numbers, masses, dt_fs: float, temperature_K: float = 0.0, float_dtype=np.float64):
    """Write frames as a geodite_sim HDF5 trajectory (one system, a frame every step of ``dt_fs``)."""
    from geodite_sim.trajectory import TrajectoryWriter

    w = TrajectoryWriter(path, {"timestep_fs": dt_fs, "frame_every": 1}, block=512, float_dtype=float_dtype)
    w.add_system(0, numbers, masses, np.ones(3, bool), {"label": "synthetic", "temperature_K": temperature_K})
    for t in range(len(wrapped)):
        w.add_frame(0, {"positions": wrapped[t], "cell": CELL, "energy": 0.0, "kinetic_energy": 0.0,
                        "temperature": temperature_K, "conserved": 0.0, "step": t})
    w.close()
