"""Trajectory analysis: partial RDFs and overlap scores (:mod:`.rdf`), MSD and diffusion (:mod:`.msd`).

    from geodite_sim.analysis import load_frames, compare_rdfs, diffusion_coefficients
    frames = load_frames("run.h5", system=3, discard_fs=5000)        # or extxyz / ASE .traj / list[Atoms]
    rdf = frames.rdf(device="cuda")                                  # RDFResult, bin 0.05 Å, r_max = L_min / 2
    score = compare_rdfs(load_frames("aimd.extxyz", discard_fs=30000, frame_interval_fs=15).rdf(), rdf).score
    D = diffusion_coefficients(frames.msd())["Li"].D_cm2_per_s

:func:`load_frames` is the one place trajectories are read: it returns a :class:`Frames` of
evenly spaced frames with the equilibration time discarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from geodite_sim.analysis.msd import (
    DiffusionFit,
    MSDResult,
    compute_msd,
    diffusion_coefficients,
    fit_diffusion,
    unwrap_positions,
)
from geodite_sim.analysis.rdf import (
    RDFComparison,
    RDFResult,
    compare_rdfs,
    compute_rdf,
    max_rdf_radius,
    overlap_score,
    shortest_lattice_vector,
)
from geodite_sim.trajectory import system_group

__all__ = [
    "DiffusionFit", "Frames", "MSDResult", "RDFComparison", "RDFResult", "compare_rdfs", "compute_msd",
    "compute_rdf", "diffusion_coefficients", "fit_diffusion", "load_frames", "max_rdf_radius", "overlap_score",
    "sample_frames",
    "shortest_lattice_vector", "unwrap_positions",
]


@dataclass
class Frames:
    """Evenly spaced frames of one trajectory.

    Attributes:
        positions: [T, N, 3] Å (dtype as stored). cells: [T, 3, 3] Å. numbers: [N]. masses: [N] amu.
        times_fs: [T] time of each frame since the start of the run, fs.
        label: where the frames came from.
    """

    positions: np.ndarray
    cells: np.ndarray
    numbers: np.ndarray
    masses: np.ndarray
    times_fs: np.ndarray
    label: str = ""

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def frame_interval_fs(self) -> float:
        return float(np.median(np.diff(self.times_fs))) if len(self) > 1 else 0.0

    def rdf(self, **kw) -> RDFResult:
        """:func:`~geodite_sim.analysis.rdf.compute_rdf` of these frames."""
        return compute_rdf(self.positions, self.cells, self.numbers, **kw)

    def halves(self) -> tuple[Frames, Frames]:
        """The first and the second half of the frames (an odd middle frame goes to the second)."""
        h = len(self) // 2
        return (Frames(self.positions[:h], self.cells[:h], self.numbers, self.masses, self.times_fs[:h], self.label),
                Frames(self.positions[h:], self.cells[h:], self.numbers, self.masses, self.times_fs[h:], self.label))

    def msd(self, **kw) -> MSDResult:
        """:func:`~geodite_sim.analysis.msd.compute_msd` of these frames."""
        return compute_msd(self.positions, self.cells, self.numbers, self.frame_interval_fs,
                           masses=kw.pop("masses", self.masses), **kw)


def _regular(times: np.ndarray) -> np.ndarray:
    """Indices of the frames on the regular grid t0 + k Δt (drops e.g. an off-grid last frame)."""
    if len(times) < 3:
        return np.arange(len(times))
    dt = float(np.median(np.diff(times)))
    if dt <= 0:
        raise ValueError("frame times are not increasing")
    k = (times - times[0]) / dt
    on_grid = np.abs(k - np.round(k)) < 1e-6
    keep = np.nonzero(on_grid)[0]
    _, first = np.unique(np.round(k[keep]).astype(np.int64), return_index=True)
    return keep[first]


def _select(times: np.ndarray, discard_fs: float, stride: int) -> np.ndarray:
    idx = _regular(times)
    idx = idx[times[idx] - times[0] >= float(discard_fs) - 1e-6]
    if len(idx) == 0:
        raise ValueError(f"no frames left after discarding the first {discard_fs} fs "
                         f"(trajectory spans {times[-1] - times[0]:.1f} fs)")
    return idx[:: max(1, int(stride))]


def _hdf5_system(f, system: int | None, path) -> tuple:
    """``(group, system, times fs [F])`` of one system of an open engine trajectory."""
    g, system = system_group(f, system, path)
    dt = float(f.attrs.get("timestep_fs", 0.0))
    if dt <= 0:
        raise ValueError(f"{path}: no timestep_fs attribute")
    return g, system, g["step"][()].astype(float) * dt


def _from_hdf5(path: str, system: int | None, discard_fs: float, stride: int) -> Frames:
    import h5py

    with h5py.File(path, "r") as f:
        g, system, times = _hdf5_system(f, system, path)
        idx = _select(times, discard_fs, stride)
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        positions = g["positions"][lo:hi][idx - lo]
        cells = g["cell"][lo:hi][idx - lo]
        return Frames(positions, cells.astype(float), g["numbers"][()].astype(int), g["masses"][()].astype(float),
                      times[idx], f"{path}#{system}")


def _from_atoms(images: Sequence[Atoms], label: str, discard_fs: float, stride: int,
                frame_interval_fs: float | None) -> Frames:
    if not images:
        raise ValueError(f"{label}: no frames")
    numbers = images[0].numbers
    for k, a in enumerate(images):
        if len(a) != len(numbers) or not np.array_equal(a.numbers, numbers):
            raise ValueError(f"{label}: frame {k} has different atoms than frame 0")
        if not a.pbc.all():
            raise ValueError(f"{label}: frame {k} is not periodic along all three axes")
    if frame_interval_fs is not None:
        times = np.arange(len(images)) * float(frame_interval_fs)
    elif all("time_fs" in a.info for a in images):
        times = np.array([float(a.info["time_fs"]) for a in images])
    else:
        if discard_fs > 0 or len(images) > 1:
            raise ValueError(f"{label}: frames carry no time (info['time_fs']): pass frame_interval_fs")
        times = np.zeros(len(images))
    idx = _select(times, discard_fs, stride)
    positions = np.stack([images[i].positions for i in idx])
    cells = np.stack([np.asarray(images[i].cell[:], dtype=float) for i in idx])
    return Frames(positions, cells, numbers.astype(int), images[0].get_masses(), times[idx], label)


def sample_frames(path: str | Path, system: int | None = None, discard_fs: float = 0.0,
                  max_frames: int = 200) -> Frames:
    """At most ``max_frames`` evenly spaced frames of an HDF5 trajectory after ``discard_fs``, reading only those
    frames from the file (for RDFs of long runs; :func:`load_frames` reads the whole analysed range)."""
    import h5py

    with h5py.File(path, "r") as f:
        g, system, times = _hdf5_system(f, system, path)
        idx = _select(times, discard_fs, 1)
        idx = np.unique(idx[np.linspace(0, len(idx) - 1, min(len(idx), max(1, int(max_frames)))).round().astype(int)])
        return Frames(g["positions"][idx], g["cell"][idx].astype(float), g["numbers"][()].astype(int),
                      g["masses"][()].astype(float), times[idx], f"{path}#{system}")


def load_frames(source, system: int | None = None, discard_fs: float = 0.0, stride: int = 1,
                frame_interval_fs: float | None = None) -> Frames:
    """Evenly spaced frames of a trajectory, the first ``discard_fs`` dropped, every ``stride``-th kept.

    Args:
        source: a geodite_sim HDF5 trajectory (``run_md``), any file ``ase.io.read`` reads as a
            sequence of frames (extxyz, ASE ``.traj``, ...), or a list of ASE Atoms.
        system: input index of the system in an HDF5 file holding several.
        discard_fs: equilibration time to drop, fs (protocol: 5 ps model, 30 ps AIMD reference).
        stride: keep every ``stride``-th remaining frame.
        frame_interval_fs: time between consecutive frames of a non-HDF5 source, fs; by default
            taken from each frame's ``info["time_fs"]`` (as ``geodite_sim`` exports write it).
    """
    if isinstance(source, (list, tuple)):
        return _from_atoms(list(source), "frames", discard_fs, stride, frame_interval_fs)
    path = str(source)
    if not Path(path).exists():
        raise FileNotFoundError(f"trajectory not found: {path}")
    import h5py

    if h5py.is_hdf5(path):
        return _from_hdf5(path, system, discard_fs, stride)
    from ase.io import read

    images = read(path, index=":")
    return _from_atoms(images if isinstance(images, list) else [images], path, discard_fs, stride, frame_interval_fs)
