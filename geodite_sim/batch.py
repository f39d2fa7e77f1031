"""The batch: many independent systems packed into one set of tensors.

Atoms of system ``s`` are contiguous, ``offsets[s]:offsets[s+1]``; ``system_index[i]``
names the system of atom ``i``. Tensors may carry padding rows after
``offsets[-1]`` (capacity kept for static shapes); padding atoms belong to no
system and are ignored by every consumer, which works on ``batch.n_atoms`` rows.
Cells are stored with rows = lattice vectors (ASE convention), in Å.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from ase import Atoms

from geodite_sim.core.ops import cell_volumes
from geodite_sim.io.admission import safe_formula
from geodite_sim.io.structures import to_atoms, validate_atoms


@dataclass
class Batch:
    """Packed systems. Shapes: N atoms (plus optional padding), S systems.

    Attributes:
        positions: [N, 3] Cartesian positions, Å.
        numbers: [N] atomic numbers (int64); padding rows hold 0.
        cell: [S, 3, 3] lattice vectors as rows, Å (zeros along non-periodic axes are allowed).
        pbc: [S, 3] periodicity per axis (bool).
        system_index: [N] system of each atom (int64); padding rows hold S - 1 and are masked by ``n_atoms``.
        offsets: [S + 1] atom offsets (int64) of each system.
        masses: [N] atomic masses, amu.
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    system_index: torch.Tensor
    offsets: torch.Tensor
    masses: torch.Tensor
    #: Number of real atoms known on the host (``offsets[-1]``), so that reading it costs no device sync.
    atom_count: int | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_atoms(
        cls,
        atoms_list: Sequence[Atoms],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Batch:
        """Pack already validated ASE Atoms (no copy of the Atoms is kept)."""
        if len(atoms_list) == 0:
            raise ValueError("cannot build a batch from zero structures")
        counts = np.array([len(a) for a in atoms_list], dtype=np.int64)
        positions = np.concatenate([a.positions for a in atoms_list])
        numbers = np.concatenate([a.numbers for a in atoms_list])
        masses = np.concatenate([a.get_masses() for a in atoms_list])
        cell = np.stack([np.asarray(a.cell[:], dtype=float) for a in atoms_list])
        pbc = np.stack([np.asarray(a.pbc, dtype=bool) for a in atoms_list])
        offsets = np.concatenate([[0], np.cumsum(counts)])
        system_index = np.repeat(np.arange(len(atoms_list)), counts)
        dev = torch.device(device)
        return cls(
            positions=torch.as_tensor(positions, dtype=dtype, device=dev),
            numbers=torch.as_tensor(numbers, dtype=torch.long, device=dev),
            cell=torch.as_tensor(cell, dtype=dtype, device=dev),
            pbc=torch.as_tensor(pbc, dtype=torch.bool, device=dev),
            system_index=torch.as_tensor(system_index, dtype=torch.long, device=dev),
            offsets=torch.as_tensor(offsets, dtype=torch.long, device=dev),
            masses=torch.as_tensor(masses, dtype=dtype, device=dev),
            atom_count=int(counts.sum()),
        )

    @classmethod
    def from_structures(
        cls,
        structures: Sequence,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Batch:
        """Convert (ASE, pymatgen, paths), validate and pack; raises StructureError naming the bad one."""
        atoms_list = []
        for i, s in enumerate(structures):
            atoms = to_atoms(s)
            try:
                validate_atoms(atoms)
            except ValueError as exc:
                raise type(exc)(f"structure {i} ({safe_formula(atoms)}): {exc}") from exc
            atoms_list.append(atoms)
        return cls.from_atoms(atoms_list, dtype=dtype, device=device)

    # ------------------------------------------------------------------ properties
    @property
    def n_systems(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def n_atoms(self) -> int:
        """Number of real (non-padding) atoms (host-side when known, else read from ``offsets[-1]``)."""
        if self.atom_count is not None:
            return self.atom_count
        return int(self.offsets[-1])

    @property
    def atoms_per_system(self) -> torch.Tensor:
        """[S] number of atoms of each system."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def fully_periodic(self) -> torch.Tensor:
        """[S] True where all three axes are periodic (stress is defined there)."""
        return self.pbc.all(dim=1)

    def volumes(self) -> torch.Tensor:
        """[S] |det(cell)| in Å^3 (0 for systems with a degenerate cell)."""
        return cell_volumes(self.cell)

    # ------------------------------------------------------------------ transforms
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Batch:
        """Copy to another device and/or float dtype (integer tensors keep their dtype)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if not isinstance(t, torch.Tensor):
                out[f.name] = t
                continue
            if t.is_floating_point() and dtype is not None:
                t = t.to(dtype=dtype)
            if device is not None:
                t = t.to(device=device)
            out[f.name] = t
        return Batch(**out)

    def with_positions(self, positions: torch.Tensor, cell: torch.Tensor | None = None) -> Batch:
        """A shallow copy with new positions (and optionally cell)."""
        return replace(self, positions=positions, cell=self.cell if cell is None else cell)

    def select(self, systems: Sequence[int] | torch.Tensor) -> Batch:
        """A new packed batch holding only ``systems`` (in that order)."""
        idx = torch.as_tensor(systems, dtype=torch.long, device=self.device)
        counts = self.atoms_per_system[idx]
        offsets = torch.zeros(idx.numel() + 1, dtype=torch.long, device=self.device)
        offsets[1:] = torch.cumsum(counts, 0)
        atom_idx = atom_indices(self.offsets, idx)
        return Batch(
            positions=self.positions[atom_idx],
            numbers=self.numbers[atom_idx],
            cell=self.cell[idx],
            pbc=self.pbc[idx],
            system_index=torch.repeat_interleave(torch.arange(idx.numel(), device=self.device), counts),
            offsets=offsets,
            masses=self.masses[atom_idx],
        )

    @staticmethod
    def concatenate(batches: Sequence[Batch]) -> Batch:
        """Pack several batches into one (systems in order)."""
        if len(batches) == 1:
            return batches[0]
        counts = torch.cat([b.atoms_per_system for b in batches])
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.long, device=counts.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return Batch(
            positions=torch.cat([b.positions[: b.n_atoms] for b in batches]),
            numbers=torch.cat([b.numbers[: b.n_atoms] for b in batches]),
            cell=torch.cat([b.cell for b in batches]),
            pbc=torch.cat([b.pbc for b in batches]),
            system_index=torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts),
            offsets=offsets,
            masses=torch.cat([b.masses[: b.n_atoms] for b in batches]),
        )

    def to_atoms(self, system: int) -> Atoms:
        """System ``system`` as ASE Atoms (positions, numbers, cell, pbc)."""
        a, b = int(self.offsets[system]), int(self.offsets[system + 1])
        return Atoms(
            numbers=self.numbers[a:b].cpu().numpy(),
            positions=self.positions[a:b].detach().cpu().double().numpy(),
            cell=self.cell[system].detach().cpu().double().numpy(),
            pbc=self.pbc[system].cpu().numpy(),
        )


def atom_indices(offsets: torch.Tensor, systems: torch.Tensor) -> torch.Tensor:
    """Concatenated atom indices of ``systems`` given system ``offsets`` (vectorised)."""
    starts = offsets[systems]
    counts = offsets[systems + 1] - starts
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=offsets.device)
    seg_start = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
    return torch.arange(total, device=offsets.device) + seg_start
