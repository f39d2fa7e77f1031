"""The runner's edge list: a padded Verlet list whose per-step use needs no host read.

At a check (host side) the runner builds each system's edges at ``cutoff + skin`` with any
backend of :mod:`geodite_sim.neighbors`, sorts them into the **canonical order**
(receiver, sender, cell shift), and pads the list to a capacity ``E_cap`` with *padding
edges* (from the last atom of the batch, a padding atom, to its own image one padding-cell
vector away: finite, longer than the cutoff, touching no real atom). Inside a step
(device side, static shapes):

* :meth:`EdgeBuffer.masked` recomputes every stored edge's length at the current positions and
  cell and turns those at or beyond ``cutoff`` into padding edges. A real atom therefore sees
  exactly the edges a fresh neighbour list at ``cutoff`` would give it, in the same
  (canonical) order, whatever the skin, the batch-mates or the time of the last build: a
  system's numbers do not depend on any of them, bit for bit.
* :meth:`EdgeBuffer.stale` flags the systems for which the stored list may be incomplete: a
  pair missing from it was at least ``R = cutoff + skin`` apart at the build, and its length
  can since have shrunk by at most ``2 δ + ε R``, where δ is the largest non-affine
  displacement of an atom (its move minus the move the cell deformation implies) and
  ``ε = ||C_b⁻¹ C − I||_F`` the cell strain since the build (C_b, C: cells at the build and
  now, completed to full rank along non-periodic axes). A system is stale when
  ``2 δ + ε R > skin``; the runner then undoes its step, parks it, and rebuilds its list at the
  next check (docs/runner.md).

Capacity: ``E_cap`` is chosen at each build from the valid count with headroom, so the list
never overflows between builds (nothing is added on the device) and is never truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from geodite_sim.batch import Batch, atom_indices
from geodite_sim.core.graph import edge_vectors
from geodite_sim.model.geodite import Edges
from geodite_sim.neighbors import complete_cell, neighbor_list

#: Cell-shift components are packed into the sort key with this offset and width.
_SHIFT_OFFSET, _SHIFT_WIDTH = 1 << 9, 1 << 10


def canonical_order(edges: Edges, n_atoms: int) -> Edges:
    """Edges sorted by (receiver, sender, shift): the order every backend's result is put into."""
    if edges.sender.numel() == 0:
        return edges
    s = (edges.shifts.long() + _SHIFT_OFFSET).clamp(0, _SHIFT_WIDTH - 1)
    shift_key = (s[:, 0] * _SHIFT_WIDTH + s[:, 1]) * _SHIFT_WIDTH + s[:, 2]
    order = torch.sort(shift_key, stable=True).indices  # lexicographic: minor key first, then stable major sort
    pair_key = edges.receiver[order] * n_atoms + edges.sender[order]
    order = order[torch.sort(pair_key, stable=True).indices]
    return Edges(edges.sender[order], edges.receiver[order], edges.shifts[order])


def padding_cell(cutoff: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[3, 3] cell of the padding system: cubic, side ``cutoff + 1`` Å (non-periodic)."""
    return torch.eye(3, dtype=dtype, device=device) * (float(cutoff) + 1.0)


@dataclass
class EdgeBuffer:
    """A padded Verlet edge list over a padded batch (A atoms, S systems incl. the padding system).

    Attributes:
        sender, receiver: [E_cap] int64 atom indices (padding edges: both = ``pad_atom``).
        shifts: [E_cap, 3] integer cell shifts in the batch's float dtype (padding: (1, 0, 0)).
        real: [E_cap] bool, True for stored (non-padding) edges.
        ref_positions: [A, 3] positions at each system's last build, Å.
        ref_cell_inv: [S, 3, 3] inverse of each system's full-rank cell at its last build.
        ref_full_cell: [S, 3, 3] full-rank cell at the last build (non-periodic rows: orthonormal completion).
        skin: [S] each system's skin, Å (grown by the runner for a system that outruns it in one step).
        cutoff: Å. pad_atom: index of the padding atom that padding edges use.
        n_valid: stored edges (host). builds: systems built since the buffer was made (host counter).
    """

    sender: torch.Tensor
    receiver: torch.Tensor
    shifts: torch.Tensor
    real: torch.Tensor
    ref_positions: torch.Tensor
    ref_cell_inv: torch.Tensor
    ref_full_cell: torch.Tensor
    skin: torch.Tensor
    cutoff: float
    pad_atom: int
    n_valid: int = 0
    builds: int = 0

    @property
    def capacity(self) -> int:
        return int(self.sender.shape[0])

    # ------------------------------------------------------------------ device side (inside a step)
    def _vectors(self, positions: torch.Tensor, cell: torch.Tensor, system_index: torch.Tensor) -> torch.Tensor:
        return edge_vectors(positions, cell, system_index, self.sender, self.receiver, self.shifts)

    def masked(self, positions: torch.Tensor, cell: torch.Tensor, system_index: torch.Tensor) -> Edges:
        """Edges within ``cutoff`` at the given positions/cell; the others become padding edges (static shape)."""
        vec = self._vectors(positions.detach(), cell.detach(), system_index)
        keep = self.real & ((vec * vec).sum(-1) < self.cutoff * self.cutoff)
        pad = torch.full_like(self.sender, self.pad_atom)
        pad_shift = torch.zeros_like(self.shifts)
        pad_shift[:, 0] = 1.0
        return Edges(torch.where(keep, self.sender, pad), torch.where(keep, self.receiver, pad),
                     torch.where(keep[:, None], self.shifts, pad_shift))

    def stale(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
              system_index: torch.Tensor) -> torch.Tensor:
        """[S] True where the stored list may miss a pair within ``cutoff`` (see the module docstring)."""
        return ~(self.stale_bound(positions, cell, pbc, system_index) <= self.skin)  # NaN counts as stale

    def stale_bound(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                    system_index: torch.Tensor) -> torch.Tensor:
        """[S] 2 δ + ε R, Å: how much a pair can have approached since the build (≤ skin: the list is complete)."""
        full = torch.where(pbc[:, :, None], cell, self.ref_full_cell)  # non-periodic rows: the build's completion
        m = self.ref_cell_inv @ full.detach()  # C_b^-1 C (row convention: r_affine = r_b @ m)
        eye = torch.eye(3, dtype=m.dtype, device=m.device)
        eps = torch.linalg.vector_norm((m - eye).flatten(1), dim=1)
        affine = torch.einsum("ni,nij->nj", self.ref_positions, m[system_index])
        delta = torch.linalg.vector_norm(positions.detach() - affine, dim=1)
        dmax = torch.zeros_like(eps).scatter_reduce_(0, system_index, delta, reduce="amax", include_self=True)
        return 2.0 * dmax + eps * (self.cutoff + self.skin)


# ---------------------------------------------------------------------------------------------- host side
def _pad_to(edges: Edges, capacity: int, pad_atom: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    e = edges.sender.shape[0]
    dev = edges.sender.device
    sender = torch.full((capacity,), pad_atom, dtype=torch.long, device=dev)
    receiver = sender.clone()
    shifts = torch.zeros(capacity, 3, dtype=dtype, device=dev)
    shifts[:, 0] = 1.0
    real = torch.zeros(capacity, dtype=torch.bool, device=dev)
    sender[:e] = edges.sender
    receiver[:e] = edges.receiver
    shifts[:e] = edges.shifts.to(dtype)
    real[:e] = True
    return sender, receiver, shifts, real


def edge_capacity(n_edges: int, current: int | None, headroom: float = 0.25, static: bool = True) -> int:
    """Capacity for ``n_edges`` stored edges. ``static`` (a compiled or captured step): keep ``current`` while it
    fits and is at least half used, else a bucket with ``headroom``, so shapes rarely change; otherwise (eager, where
    every padding edge is model work for nothing) the count rounded up to a multiple of 16."""
    from geodite_sim.accelerate import bucket

    if not static:
        return 16 * ((n_edges + 16) // 16)
    if current is not None and n_edges <= current and 2 * n_edges >= current:
        return current
    return bucket(int(n_edges * (1.0 + headroom)) + 1, 64)


def build_edges(batch: Batch, systems: torch.Tensor, cutoff: float, skin: torch.Tensor | float, backend: str) -> Edges:
    """Edges at ``cutoff + skin[s]`` of ``systems`` (global atom indices of ``batch``); ``skin`` [S] or a float.

    One neighbour search at the largest radius, then each system's pairs beyond its own radius are dropped
    (systems' skins differ once some have grown)."""
    if not isinstance(skin, torch.Tensor):
        skin = torch.full((batch.cell.shape[0],), float(skin), dtype=batch.dtype, device=batch.device)
    if systems.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=batch.device)
        return Edges(empty, empty, torch.zeros(0, 3, dtype=torch.long, device=batch.device))
    values = skin[systems].to(batch.dtype)
    lo, hi = (float(v) for v in torch.aminmax(values))
    sub = batch.select(systems)
    edges = neighbor_list(sub, cutoff + hi, backend)
    if lo < hi:
        vec = edge_vectors(sub.positions, sub.cell, sub.system_index, edges.sender, edges.receiver,
                           edges.shifts.to(sub.dtype))
        radius = cutoff + values[sub.system_index[edges.receiver]]
        keep = (vec * vec).sum(-1) < radius * radius
        edges = Edges(edges.sender[keep], edges.receiver[keep], edges.shifts[keep])
    atoms = atom_indices(batch.offsets, systems)
    return Edges(atoms[edges.sender], atoms[edges.receiver], edges.shifts)


def make_buffer(batch: Batch, real_systems: torch.Tensor, cutoff: float, skin: torch.Tensor | float, backend: str,
                capacity: int | None = None, static: bool = True) -> EdgeBuffer:
    """A fresh buffer with every system in ``real_systems`` built (host side); ``skin`` [S] Å or one value."""
    pad_atom = batch.positions.shape[0] - 1
    if not isinstance(skin, torch.Tensor):
        skin = torch.full((batch.cell.shape[0],), float(skin), dtype=batch.dtype, device=batch.device)
    none = torch.zeros(0, dtype=torch.long, device=batch.device)
    edges = build_edges(batch, real_systems, cutoff, skin, backend) if real_systems.numel() else Edges(
        none, none.clone(), torch.zeros(0, 3, dtype=torch.long, device=batch.device))
    edges = canonical_order(edges, batch.positions.shape[0])
    cap = edge_capacity(edges.sender.shape[0], capacity, static=static)
    sender, receiver, shifts, real = _pad_to(edges, cap, pad_atom, batch.dtype)
    full = complete_cell(batch.cell.detach(), batch.pbc)
    from geodite_sim.dynamics.cell_filter import inv3

    return EdgeBuffer(sender, receiver, shifts, real, batch.positions.detach().clone(), inv3(full), full,
                      skin.clone(), float(cutoff), pad_atom, int(edges.sender.shape[0]), int(real_systems.numel()))


def _merge(kept: Edges, fresh: Edges, n_atoms: int, dtype: torch.dtype) -> Edges:
    """``kept`` (canonical order, float shifts) and ``fresh`` edges of other systems, in canonical order.

    Every receiver's edges come from one of the two lists (a system is kept or rebuilt whole), each already
    ordered by (sender, shift) within a receiver, so a stable sort on the receiver alone merges them."""
    fresh = canonical_order(fresh, n_atoms)
    fresh = Edges(fresh.sender, fresh.receiver, fresh.shifts.to(dtype))
    if fresh.sender.numel() == 0:
        return kept
    if kept.sender.numel() == 0:
        return fresh
    sender, receiver = torch.cat([kept.sender, fresh.sender]), torch.cat([kept.receiver, fresh.receiver])
    shifts = torch.cat([kept.shifts, fresh.shifts])
    order = torch.sort(receiver, stable=True).indices
    return Edges(sender[order], receiver[order], shifts[order])


def _assemble(buf: EdgeBuffer, batch: Batch, kept: Edges, systems: torch.Tensor, backend: str, static: bool,
              ref_positions: torch.Tensor, ref_cell_inv: torch.Tensor, ref_full_cell: torch.Tensor,
              skin: torch.Tensor, builds: int) -> EdgeBuffer:
    """A buffer of ``kept`` edges plus fresh ones of ``systems`` (built now at ``cutoff + skin``), references of
    ``systems`` reset to the current positions and cell."""
    pad_atom = batch.positions.shape[0] - 1
    if systems.numel():
        fresh = build_edges(batch, systems, buf.cutoff, skin, backend)
    else:
        fresh = Edges(kept.sender[:0], kept.sender[:0], kept.shifts[:0])
    edges = _merge(kept, fresh, batch.positions.shape[0], batch.dtype)
    cap = edge_capacity(edges.sender.shape[0], buf.capacity, static=static)
    sender, receiver, shifts, real = _pad_to(edges, cap, pad_atom, batch.dtype)
    if systems.numel():
        from geodite_sim.dynamics.cell_filter import inv3

        atoms = atom_indices(batch.offsets, systems)
        ref_positions = ref_positions.clone()
        ref_positions[atoms] = batch.positions.detach()[atoms]
        full = complete_cell(batch.cell.detach()[systems], batch.pbc[systems])
        ref_cell_inv, ref_full_cell = ref_cell_inv.clone(), ref_full_cell.clone()
        ref_cell_inv[systems] = inv3(full)
        ref_full_cell[systems] = full
    return EdgeBuffer(sender, receiver, shifts, real, ref_positions, ref_cell_inv, ref_full_cell, skin, buf.cutoff,
                      pad_atom, int(edges.sender.shape[0]), builds + int(systems.numel()))


def _without(buf: EdgeBuffer, batch: Batch, systems: torch.Tensor) -> Edges:
    """The stored edges of every system but ``systems`` (canonical order kept)."""
    n = buf.n_valid
    gone = torch.zeros(batch.cell.shape[0], dtype=torch.bool, device=batch.device)
    gone[systems] = True
    keep = ~gone[batch.system_index[buf.receiver[:n]]]
    return Edges(buf.sender[:n][keep], buf.receiver[:n][keep], buf.shifts[:n][keep])


def rebuild(buf: EdgeBuffer, batch: Batch, systems: torch.Tensor, backend: str, static: bool = True) -> EdgeBuffer:
    """The buffer with ``systems`` rebuilt at their current positions (others' edges and references kept)."""
    if systems.numel() == 0:
        return buf
    return _assemble(buf, batch, _without(buf, batch, systems), systems, backend, static, buf.ref_positions,
                     buf.ref_cell_inv, buf.ref_full_cell, buf.skin, buf.builds)


def drop(buf: EdgeBuffer, batch: Batch, systems: torch.Tensor, static: bool = True) -> EdgeBuffer:
    """The buffer without the edges of ``systems`` (vacated slots whose atoms stay in the batch until a re-pack:
    they cost no edge work any more). No neighbour search."""
    if systems.numel() == 0:
        return buf
    return _assemble(buf, batch, _without(buf, batch, systems), systems[:0], "torch", static, buf.ref_positions,
                     buf.ref_cell_inv, buf.ref_full_cell, buf.skin, buf.builds)


def inner(outer: EdgeBuffer, batch: Batch, margin: torch.Tensor, capacity: int | None = None,
          static: bool = True) -> EdgeBuffer:
    """A Verlet list built *now* from ``outer`` without a neighbour search (host side, at a check).

    Keeps the stored pairs whose current length is below ``cutoff + margin[s]`` (canonical order kept), with
    references at the current positions and cell and ``margin`` [S] as its skin. It is the complete list at that
    radius for every system whose ``outer`` staleness bound plus ``margin`` is at most its ``outer`` skin (the
    caller's promise: such an outer list holds every pair closer than ``cutoff + skin - bound``). Its own
    :meth:`EdgeBuffer.stale` then guards the steps until the next check, like a fresh build's."""
    n = outer.n_valid
    pos, cell = batch.positions.detach(), batch.cell.detach()
    sender, receiver, shifts = outer.sender[:n], outer.receiver[:n], outer.shifts[:n]
    vec = edge_vectors(pos, cell, batch.system_index, sender, receiver, shifts)
    radius = outer.cutoff + margin.to(pos.dtype)[batch.system_index[receiver]]
    keep = (vec * vec).sum(-1) < radius * radius
    edges = Edges(sender[keep], receiver[keep], shifts[keep])
    pad_atom = batch.positions.shape[0] - 1
    cap = edge_capacity(edges.sender.shape[0], capacity, static=static)
    s_, r_, sh_, real = _pad_to(edges, cap, pad_atom, batch.dtype)
    full = complete_cell(cell, batch.pbc)
    from geodite_sim.dynamics.cell_filter import inv3

    return EdgeBuffer(s_, r_, sh_, real, pos.clone(), inv3(full), full, margin.to(outer.skin.dtype).clone(),
                      outer.cutoff, pad_atom, int(edges.sender.shape[0]), outer.builds)


def remap(buf: EdgeBuffer, old_batch: Batch, keep: torch.Tensor, batch: Batch, systems: torch.Tensor,
          skin: torch.Tensor, backend: str, static: bool = True) -> EdgeBuffer:
    """The buffer of a re-packed batch (host side, at a check).

    ``keep`` [K]: old slots (increasing) that survive as the new slots ``0..K-1`` with their atoms in the same
    order; they keep their edges and build references (indices remapped, no neighbour search), except those
    listed in ``systems`` (new slot indices, e.g. parked survivors and newly started systems), which are built
    now. ``skin`` [S_new]: each new slot's skin, Å."""
    dev = batch.device
    old_atoms = atom_indices(old_batch.offsets, keep)
    mapping = torch.full((old_batch.positions.shape[0],), -1, dtype=torch.long, device=dev)
    mapping[old_atoms] = torch.arange(old_atoms.numel(), device=dev)
    n = buf.n_valid
    new_r = mapping[buf.receiver[:n]]  # -1: a retired system's edge (its senders are its own atoms)
    ok = new_r >= 0
    if systems.numel():
        rebuilt = torch.zeros(batch.cell.shape[0] + 1, dtype=torch.bool, device=dev)
        rebuilt[systems] = True
        ok &= ~rebuilt[batch.system_index[new_r.clamp(min=0)]]
    # the map is increasing on survivors' atoms, so the kept edges stay in canonical order
    kept = Edges(mapping[buf.sender[:n][ok]], new_r[ok], buf.shifts[:n][ok])
    from geodite_sim.dynamics.cell_filter import inv3

    k = keep.numel()
    ref_pos = torch.zeros_like(batch.positions)
    ref_pos[: old_atoms.numel()] = buf.ref_positions[old_atoms]
    ref_full = complete_cell(batch.cell.detach(), batch.pbc)
    ref_inv = inv3(ref_full)
    ref_full[:k] = buf.ref_full_cell[keep]
    ref_inv[:k] = buf.ref_cell_inv[keep]
    return _assemble(buf, batch, kept, systems, backend, static, ref_pos, ref_inv,
                     ref_full, skin, buf.builds)


__all__ = ["EdgeBuffer", "build_edges", "canonical_order", "drop", "inner", "make_buffer", "padding_cell", "rebuild",
           "remap"]
