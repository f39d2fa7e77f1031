"""Slots: the padded layout of a batch (systems in slots + one padding system), its capacities, the per-slot
status carried across a re-pack, and the per-slot undo of a step (:func:`where_state`).

Padding is exact: padding atoms (Z = :data:`PAD_Z`, at the end) belong to the padding system (index ``S``),
whose outputs are dropped; empty slots hold no atoms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from geodite_sim.accelerate import next_capacity
from geodite_sim.batch import Batch
from geodite_sim.model.strain import cell_volumes
from geodite_sim.runner.config import SlotStatus
from geodite_sim.state import PER, select_systems

#: Atomic number of padding atoms (their energies are dropped).
PAD_Z = 1
#: Smallest capacities (atoms incl. one padding atom, system slots).
MIN_ATOMS, MIN_SLOTS = 16, 2


@dataclass
class Bare:
    """A state with only a batch (for padding a batch alone)."""

    batch: Batch


def capacities(n_atoms: int, n_systems: int, current: tuple[int | None, int | None], static: bool) -> tuple[int, int]:
    """(atom capacity incl. one padding atom, system slots) of a re-pack. ``static`` (compiled / captured step):
    bucketed with headroom, so shapes rarely change; eager: exact (every padding atom is model work for nothing)."""
    if not static:
        return n_atoms + 1, n_systems
    return (next_capacity(n_atoms + 1, current[0], MIN_ATOMS, 1.0 / 16.0, 0.5),
            next_capacity(n_systems, current[1], MIN_SLOTS, 1.0 / 16.0, 0.5))


def where_state(keep: torch.Tensor, new, old):
    """Field by field: ``new`` where ``keep`` [S] (per-atom fields by their system), else ``old``."""
    sys_idx = old.batch.system_index
    keep_atom = keep[sys_idx]
    changes = {}
    for f in fields(old):
        if f.name == "batch":
            continue
        a, b = getattr(new, f.name), getattr(old, f.name)
        if a is None or b is None or a is b:
            changes[f.name] = a
            continue
        per = f.metadata.get(PER)
        if per == "packed":  # constant during a step
            changes[f.name] = b
            continue
        mask = keep_atom if per == "atom" else keep
        changes[f.name] = torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)
    nb, ob = new.batch, old.batch
    batch = ob.with_positions(torch.where(keep_atom[:, None], nb.positions, ob.positions),
                              torch.where(keep[:, None, None], nb.cell, ob.cell))
    return replace(old, batch=batch, **changes)


def pad_state(state, n_atoms_cap: int, n_slots: int, pad_cell: torch.Tensor):
    """A compact state (k systems, n atoms) padded to ``n_atoms_cap`` atoms and ``n_slots`` slots + 1 padding system.

    Empty slots hold 0 atoms; padding atoms (``n_atoms_cap - n`` ≥ 1, at the end) belong to the padding system
    (index ``n_slots``). Per-system fields of empty/padding rows copy row 0 (finite, valid values); per-atom
    fields of padding atoms are 0 (masses 1, Z = :data:`PAD_Z`).
    """
    b = state.batch
    k, n = b.n_systems, b.n_atoms
    n_pad, s_pad = n_atoms_cap - n, n_slots + 1 - k
    dev, dt = b.device, b.dtype
    counts = torch.cat([b.atoms_per_system, torch.zeros(s_pad - 1, dtype=torch.long, device=dev),
                        torch.tensor([n_pad], dtype=torch.long, device=dev)])
    offsets = torch.zeros(n_slots + 2, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    rows = torch.zeros(s_pad, dtype=torch.long, device=dev)
    cell = torch.cat([b.cell, b.cell[rows]])
    cell[-1] = pad_cell
    pbc = torch.cat([b.pbc, torch.zeros(s_pad, 3, dtype=torch.bool, device=dev)])
    batch = Batch(
        positions=torch.cat([b.positions[:n], torch.zeros(n_pad, 3, dtype=dt, device=dev)]),
        numbers=torch.cat([b.numbers[:n], torch.full((n_pad,), PAD_Z, dtype=torch.long, device=dev)]),
        cell=cell, pbc=pbc,
        system_index=torch.cat([b.system_index[:n], torch.full((n_pad,), n_slots, dtype=torch.long, device=dev)]),
        offsets=offsets,
        masses=torch.cat([b.masses[:n], torch.ones(n_pad, dtype=dt, device=dev)]),
        atom_count=n_atoms_cap,
    )
    changes = {}
    for f in fields(state):
        if f.name == "batch":
            continue
        v = getattr(state, f.name)
        per = f.metadata.get(PER)
        if v is None or per is None:
            changes[f.name] = v
        elif per == "atom":
            changes[f.name] = torch.cat([v[:n], v.new_zeros((n_pad,) + v.shape[1:])])
        elif per == "packed":
            pad_counts = [0] * (s_pad - 1) + [n_pad]
            changes[f.name] = type(v).concat([v, type(v).padding(pad_counts, dt, dev)])
        else:
            pad = v[rows].clone()
            if f.name == "relax_cell":
                pad[:] = False
            changes[f.name] = torch.cat([v, pad])
    return replace(state, batch=batch, **changes)


def unpad(state, slots: Sequence[int]):
    """The compact state of ``slots`` (host-side gather; used at checks)."""
    out = select_systems(state, list(slots))
    out.batch = replace(out.batch, atom_count=None)
    out.batch = replace(out.batch, atom_count=out.batch.n_atoms)
    return out


def empty_status(n: int, dtype: torch.dtype, device, volume0: torch.Tensor | None = None) -> SlotStatus:
    """A zero :class:`SlotStatus` of ``n`` rows (nothing occupied, parked or failed); ``volume0`` default ones."""
    long = dict(dtype=torch.long, device=device)
    return SlotStatus(torch.zeros(n, dtype=torch.bool, device=device), torch.zeros(n, dtype=torch.bool, device=device),
                      torch.zeros(n, **long), torch.zeros(n, **long), torch.zeros(n, dtype=dtype, device=device),
                      torch.zeros(n, **long),
                      volume0 if volume0 is not None else torch.ones(n, dtype=dtype, device=device))


def repacked_status(old: SlotStatus | None, keep: list[int], n_systems: int, n_slots: int, cell: torch.Tensor,
                    dtype: torch.dtype, device) -> SlotStatus:
    """The slot status after a re-pack: survivors (``keep``, now slots ``0 .. len(keep) - 1``) keep their codes,
    horizons and admission volumes; the new systems (up to ``n_systems``) start clean with their current volume;
    nothing is parked (the edges of parked survivors are rebuilt by the re-pack)."""
    status = empty_status(n_slots + 1, dtype, device)
    status.occupied[:n_systems] = True
    status.volume0[:n_systems] = cell_volumes(cell[:n_systems])
    if keep and old is not None:
        k = torch.as_tensor(keep, dtype=torch.long, device=device)
        n = len(keep)
        for name in ("code", "fail_step", "fail_value", "volume0", "horizon"):
            getattr(status, name)[:n] = getattr(old, name)[k]
    return status


__all__ = ["Bare", "MIN_ATOMS", "MIN_SLOTS", "PAD_Z", "capacities", "empty_status", "pad_state", "repacked_status",
           "unpad", "where_state"]
