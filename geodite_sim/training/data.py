"""Labelled structures for training: reading (extxyz, HDF5), neighbour lists, collation, E0 and statistics.

A data set is a list of :class:`Sample` (an ASE Atoms plus its reference energy [eV],
forces [N, 3] eV/Å and stress [3, 3] eV/Å^3 with ASE's sign, ``None`` where absent).
Neighbour lists are computed once per structure (:func:`precompute_edges`) and
offset when structures are packed into a batch (:func:`collate`).

HDF5 layout read and written here (packed, one row block per structure)::

    numbers [N_total] int, positions [N_total, 3], offsets [S + 1] int,
    cell [S, 3, 3], pbc [S, 3] bool, energy [S], forces [N_total, 3],
    stress [S, 3, 3] (optional; NaN rows = no stress label)

Files following the trajectory layout ``/systems/<id>/{numbers [N], positions [T, N, 3],
cell [T, 3, 3] or [3, 3], pbc [3], energy [T], forces [T, N, 3], stress [T, 3, 3]}``
are read too (every frame becomes a sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from geodite_sim.batch import Batch
from geodite_sim.core.graph import Edges
from geodite_sim.neighbors import neighbor_list

N_ELEMENTS = 119


@dataclass
class Sample:
    """One labelled structure; ``edges`` is filled by :func:`precompute_edges` (local atom indices)."""

    atoms: Atoms
    energy: float
    forces: np.ndarray | None = None  # [N, 3] eV/Å
    stress: np.ndarray | None = None  # [3, 3] eV/Å^3, ASE sign
    edges: Edges | None = None

    @property
    def n_atoms(self) -> int:
        return len(self.atoms)


def _voigt_to_full(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=float)
    if s.shape == (3, 3):
        return s
    if s.shape == (6,):
        xx, yy, zz, yz, xz, xy = s
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if s.shape == (9,):
        return s.reshape(3, 3)
    raise ValueError(f"stress of shape {s.shape} is not 3x3, Voigt-6 or 9")


def sample_from_atoms(atoms: Atoms) -> Sample:
    """Labels from the attached (SinglePoint) calculator, else from ``info``/``arrays`` keys energy/forces/stress."""
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    energy = results.get("energy", atoms.info.get("energy"))
    if energy is None:
        raise ValueError(f"structure {atoms.get_chemical_formula()} has no energy label")
    forces = results.get("forces", atoms.arrays.get("forces"))
    stress = results.get("stress", atoms.info.get("stress"))
    bare = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    bare.info.update({k: v for k, v in atoms.info.items() if k not in ("energy", "stress")})
    return Sample(
        atoms=bare,
        energy=float(energy),
        forces=None if forces is None else np.asarray(forces, dtype=float).reshape(-1, 3),
        stress=None if stress is None or not bare.pbc.all() else _voigt_to_full(stress),
    )


def read_samples(path: str | Path) -> list[Sample]:
    """Labelled structures from an extxyz (or any ASE-readable multi-frame file) or an HDF5 file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix.lower() in (".h5", ".hdf5"):
        return read_hdf5(path)
    from ase.io import read

    frames = read(str(path), index=":")
    return [sample_from_atoms(a) for a in frames]


def read_hdf5(path: str | Path) -> list[Sample]:
    import h5py

    out: list[Sample] = []
    with h5py.File(path, "r") as f:
        if "offsets" in f:
            off = f["offsets"][()]
            numbers, positions, forces = f["numbers"][()], f["positions"][()], f["forces"][()]
            cell, pbc, energy = f["cell"][()], f["pbc"][()], f["energy"][()]
            stress = f["stress"][()] if "stress" in f else None
            for s in range(len(off) - 1):
                a, b = off[s], off[s + 1]
                at = Atoms(numbers=numbers[a:b], positions=positions[a:b], cell=cell[s], pbc=pbc[s])
                st = None if stress is None or np.isnan(stress[s]).any() or not at.pbc.all() else stress[s]
                out.append(Sample(at, float(energy[s]), forces[a:b].astype(float), st))
        elif "systems" in f:
            for key in sorted(f["systems"], key=lambda k: (len(k), k)):
                g = f["systems"][key]
                pos, numbers = g["positions"][()], g["numbers"][()]
                cell = g["cell"][()] if "cell" in g else np.zeros((3, 3))
                pbc = g["pbc"][()] if "pbc" in g else np.zeros(3, bool)
                for t in range(pos.shape[0]):
                    c = cell[t] if cell.ndim == 3 else cell
                    at = Atoms(numbers=numbers, positions=pos[t], cell=c, pbc=pbc)
                    st = g["stress"][t] if "stress" in g and at.pbc.all() else None
                    out.append(Sample(at, float(g["energy"][t]), g["forces"][t].astype(float), st))
        else:
            raise ValueError(f"{path}: neither the packed layout (offsets, ...) nor /systems/<id> groups")
    return out


def write_hdf5(samples: Sequence[Sample], path: str | Path) -> None:
    """Write samples in the packed layout read by :func:`read_hdf5`."""
    import h5py

    counts = [s.n_atoms for s in samples]
    with h5py.File(path, "w") as f:
        f["numbers"] = np.concatenate([s.atoms.numbers for s in samples])
        f["positions"] = np.concatenate([s.atoms.positions for s in samples])
        f["offsets"] = np.concatenate([[0], np.cumsum(counts)])
        f["cell"] = np.stack([np.asarray(s.atoms.cell[:]) for s in samples])
        f["pbc"] = np.stack([np.asarray(s.atoms.pbc) for s in samples])
        f["energy"] = np.array([s.energy for s in samples])
        f["forces"] = np.concatenate([s.forces if s.forces is not None else np.full((s.n_atoms, 3), np.nan)
                                      for s in samples])
        f["stress"] = np.stack([s.stress if s.stress is not None else np.full((3, 3), np.nan) for s in samples])


# ------------------------------------------------------------------ neighbour lists and batches
def precompute_edges(samples: Sequence[Sample], cutoff: float) -> None:
    """Fill ``sample.edges`` (indices local to the structure) once, in float64."""
    for s in samples:
        if s.edges is None or getattr(s, "_cutoff", None) != cutoff:
            b = Batch.from_atoms([s.atoms], dtype=torch.float64)
            s.edges = Edges(*(t.clone() for t in neighbor_list(b, cutoff)))
            s._cutoff = cutoff  # type: ignore[attr-defined]


@dataclass
class Collated:
    """A packed batch with its edges and labels (tensors on the batch's device/dtype)."""

    batch: Batch
    edges: Edges
    energy: torch.Tensor  # [S]
    n_atoms: torch.Tensor  # [S]
    forces: torch.Tensor  # [N, 3]
    forces_mask: torch.Tensor  # [N] bool
    stress: torch.Tensor  # [S, 3, 3]
    stress_mask: torch.Tensor  # [S] bool


def collate(samples: Sequence[Sample], dtype: torch.dtype, device: str | torch.device = "cpu") -> Collated:
    """Pack samples into one Batch; offset their precomputed edges by each structure's first atom."""
    batch = Batch.from_atoms([s.atoms for s in samples], dtype=dtype, device=device)
    offsets = batch.offsets.tolist()
    send, recv, shifts = [], [], []
    for k, s in enumerate(samples):
        if s.edges is None:
            raise ValueError("edges not precomputed: call precompute_edges(samples, cutoff) first")
        send.append(s.edges.sender + offsets[k])
        recv.append(s.edges.receiver + offsets[k])
        shifts.append(s.edges.shifts)
    edges = Edges(torch.cat(send).to(device), torch.cat(recv).to(device), torch.cat(shifts).to(device))
    forces = np.concatenate([s.forces if s.forces is not None else np.zeros((s.n_atoms, 3)) for s in samples])
    fmask = np.concatenate([np.full(s.n_atoms, s.forces is not None) for s in samples])
    stress = np.stack([s.stress if s.stress is not None else np.zeros((3, 3)) for s in samples])
    smask = np.array([s.stress is not None for s in samples])
    t = lambda x, dt=dtype: torch.as_tensor(x, dtype=dt, device=device)  # noqa: E731
    return Collated(
        batch=batch,
        edges=edges,
        energy=t([s.energy for s in samples]),
        n_atoms=t([s.n_atoms for s in samples]),
        forces=t(forces),
        forces_mask=t(fmask, torch.bool),
        stress=t(stress),
        stress_mask=t(smask, torch.bool),
    )


# ------------------------------------------------------------------ E0 and statistics
def composition_matrix(samples: Sequence[Sample]) -> np.ndarray:
    """[S, 119] atom counts per element."""
    a = np.zeros((len(samples), N_ELEMENTS))
    for i, s in enumerate(samples):
        np.add.at(a[i], s.atoms.numbers, 1.0)
    return a


def fit_e0(samples: Sequence[Sample]) -> np.ndarray:
    """Per-element reference energies [119] (eV) by least squares: E_s ~ sum_i e0[Z_i].

    Elements absent from the data get 0. When compositions are collinear (e.g. an element only
    ever appears in one fixed ratio with another) the minimum-norm solution is taken.
    """
    a = composition_matrix(samples)
    e = np.array([s.energy for s in samples])
    present = a.sum(0) > 0
    sol, *_ = np.linalg.lstsq(a[:, present], e, rcond=None)
    e0 = np.zeros(N_ELEMENTS)
    e0[present] = sol
    return e0


def dataset_statistics(samples: Sequence[Sample], e0: np.ndarray) -> dict[str, float]:
    """Normalisers of the loss: std of the per-atom residual energy, of force and stress components."""
    comp = composition_matrix(samples)
    n = comp.sum(1)
    resid = (np.array([s.energy for s in samples]) - comp @ e0) / n
    forces = np.concatenate([s.forces.ravel() for s in samples if s.forces is not None] or [np.zeros(1)])
    stress = np.concatenate([s.stress.ravel() for s in samples if s.stress is not None] or [np.zeros(1)])
    return {
        "energy_std": float(max(resid.std(), 1e-6)),
        "energy_rms": float(max(np.sqrt((resid**2).mean()), 1e-6)),
        "energy_mean": float(resid.mean()),
        "force_std": float(max(np.sqrt((forces**2).mean()), 1e-6)),
        "stress_mean": float(stress.mean()),
        "stress_std": float(max(stress.std(), 1e-8)),
        "n_structures": len(samples),
        "n_atoms": int(n.sum()),
    }


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split by structure with a fixed seed (at least one validation structure)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
