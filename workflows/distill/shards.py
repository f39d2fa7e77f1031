"""Sharded structure sets: compressed HDF5 files written atomically, each with a content hash.

A shard holds S structures packed as in :mod:`geodite_sim.training.data`::

    numbers [N] int16, positions [N, 3], offsets [S + 1] int64, cell [S, 3, 3], pbc [S, 3] bool,
    tag [S] str (how the structure was made), composition [S] str (reduced formula),
    heldout [S] bool (validation split, by composition)
    labelled shards add: energy [S] float64 eV, forces [N, 3] float32 eV/Å, stress [S, 3, 3] float32 eV/Å^3
    (ASE sign; NaN for non-periodic structures); attribute ``failures`` (JSON: tag + reason).

Candidate shards (before labelling) keep float64 geometry; labelled shards store float32 geometry
and forces, gzip-compressed. The content hash (sha256 of every array and string, in a fixed order)
identifies a shard independently of HDF5's byte layout; a shard file is immutable once written.
:func:`load_samples` reads a folder's labelled shards as training samples; :func:`weights_hash` identifies a
checkpoint's weights the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from ase import Atoms

from geodite_sim.store import write_json
from geodite_sim.training.data import Sample

_STR = h5py.string_dtype("utf-8")


@dataclass
class ShardData:
    """Structures of one shard (labels optional)."""

    atoms: list[Atoms]
    tags: list[str]
    compositions: list[str]
    heldout: list[bool]
    energy: np.ndarray | None = None  # [S] eV
    forces: list[np.ndarray] | None = None  # per structure [n, 3] eV/Å
    stress: np.ndarray | None = None  # [S, 3, 3] eV/Å^3
    failures: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.atoms)


def _arrays(data: ShardData, float_dtype) -> dict[str, np.ndarray]:
    counts = np.array([len(a) for a in data.atoms], dtype=np.int64)
    out = {
        "numbers": np.concatenate([a.numbers for a in data.atoms]).astype(np.int16) if data.atoms
        else np.zeros(0, np.int16),
        "positions": np.concatenate([a.positions for a in data.atoms]).astype(float_dtype) if data.atoms
        else np.zeros((0, 3), float_dtype),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "cell": np.array([a.cell.array for a in data.atoms], dtype=float_dtype).reshape(-1, 3, 3),
        "pbc": np.array([a.pbc for a in data.atoms], dtype=bool).reshape(-1, 3),
    }
    if data.energy is not None:
        out["energy"] = np.asarray(data.energy, dtype=np.float64)
        out["forces"] = (np.concatenate(data.forces).astype(np.float32) if data.forces
                         else np.zeros((0, 3), np.float32))
        out["stress"] = np.asarray(data.stress, dtype=np.float32).reshape(-1, 3, 3)
    return out


def content_hash(arrays: dict[str, np.ndarray], strings: dict[str, list]) -> str:
    """sha256 (16 hex digits) of the arrays (name, dtype, shape, bytes) and the string lists."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    h.update(json.dumps(strings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def write_shard(path: Path, data: ShardData, labelled: bool) -> str:
    """Write ``data`` atomically to ``path``; returns its content hash."""
    arrays = _arrays(data, np.float32 if labelled else np.float64)
    strings = {"tag": data.tags, "composition": data.compositions, "heldout": [bool(h) for h in data.heldout],
               "failures": data.failures}
    digest = content_hash(arrays, strings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with h5py.File(tmp, "w", track_order=True) as f:
        for name, a in arrays.items():
            kw = {"compression": "gzip", "compression_opts": 6, "shuffle": True} if a.size > 64 else {}
            f.create_dataset(name, data=a, **kw)
        f.create_dataset("tag", data=np.array(data.tags, dtype=object), dtype=_STR)
        f.create_dataset("composition", data=np.array(data.compositions, dtype=object), dtype=_STR)
        f.create_dataset("heldout", data=np.array(data.heldout, dtype=bool).reshape(-1))
        f.attrs["failures"] = json.dumps(data.failures)
        f.attrs["content_hash"] = digest
        f.attrs["labelled"] = labelled
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return digest


def read_shard(path: Path) -> ShardData:
    """All structures of a shard (float64 numpy arrays; Atoms without calculators)."""
    with h5py.File(path, "r") as f:
        numbers, positions = f["numbers"][:], f["positions"][:].astype(np.float64)
        offsets, cell, pbc = f["offsets"][:], f["cell"][:].astype(np.float64), f["pbc"][:]
        tags = [t.decode() if isinstance(t, bytes) else str(t) for t in f["tag"][:]]
        comps = [t.decode() if isinstance(t, bytes) else str(t) for t in f["composition"][:]]
        heldout = [bool(h) for h in f["heldout"][:]]
        failures = json.loads(f.attrs.get("failures", "[]"))
        labelled = "energy" in f
        energy = f["energy"][:] if labelled else None
        forces_all = f["forces"][:].astype(np.float64) if labelled else None
        stress = f["stress"][:].astype(np.float64) if labelled else None
    atoms, forces = [], [] if labelled else None
    for s in range(len(offsets) - 1):
        a, b = offsets[s], offsets[s + 1]
        atoms.append(Atoms(numbers=numbers[a:b], positions=positions[a:b], cell=cell[s], pbc=pbc[s]))
        if labelled:
            forces.append(forces_all[a:b])
    return ShardData(atoms, tags, comps, heldout, energy, forces, stress, failures)


def shard_hash(path: Path) -> str:
    """The content hash recorded in a shard file."""
    with h5py.File(path, "r") as f:
        return str(f.attrs["content_hash"])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def write_record(path: Path, data: dict) -> None:
    """A JSON record of the workflow (manifest, stage stamps, checks, report): sorted keys, written atomically."""
    write_json(path, data, sort_keys=True, default=str)


def load_samples(workdir: Path, limits: tuple[float, float, float] | None = None, e0: dict[int, float] | None = None,
                 excluded: list[str] | None = None) -> tuple[list[Sample], list[Sample]]:
    """(training, held-out) samples of every labelled shard, in shard order.

    ``limits = (energy eV/atom, force eV/Å, stress eV/Å^3)``: a structure whose teacher labels exceed them —
    |E - sum E0| / N (``e0``: isolated-atom energies by Z), the largest force or stress component — is left
    out (its tag appended to ``excluded``): a teacher far outside its data can return finite nonsense
    (SevenNet-0 gives elemental F in compressed bcc cells 1e22 eV/atom), and one such label swamps the loss
    normalisation."""
    train, held = [], []
    for path in sorted((workdir / "labels").glob("shard-*.h5")):
        d = read_shard(path)
        for i, atoms in enumerate(d.atoms):
            stress = d.stress[i]
            if limits is not None:
                e_ref = sum(e0[int(z)] for z in atoms.numbers) if e0 else 0.0
                s_max = float(np.abs(stress).max()) if np.isfinite(stress).all() else 0.0
                if (abs(float(d.energy[i]) - e_ref) / len(atoms) > limits[0] or float(np.abs(d.forces[i]).max(
                        initial=0.0)) > limits[1] or s_max > limits[2]):
                    if excluded is not None:
                        excluded.append(d.tags[i])
                    continue
            s = Sample(atoms=atoms, energy=float(d.energy[i]), forces=d.forces[i],
                       stress=None if not np.isfinite(stress).all() else stress)
            atoms.info["tag"] = d.tags[i]
            (held if d.heldout[i] else train).append(s)
    return train, held


def weights_hash(path: Path) -> str:
    """sha256 (16 hex) of a checkpoint's weights (state_dict tensors by name), independent of its metadata."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    h = hashlib.sha256()
    for name in sorted(ck["state_dict"]):
        t = ck["state_dict"][name]
        if isinstance(t, torch.Tensor) and not name.startswith("SnapshotDecoder."):
            h.update(name.encode())
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
