"""Batched neighbour lists (edges sender -> receiver with integer cell shifts).

``neighbor_list(batch, cutoff)`` returns the pairs (i = receiver, j = sender, S)
with ``|r_j + S @ cell - r_i| < cutoff``, excluding i == j at S == 0, exactly as
``ase.neighborlist.neighbor_list("ijS")`` does, honouring pbc per axis.
"""

from __future__ import annotations

import math

import torch

from geodite_sim.batch import Batch
from geodite_sim.model.geodite import Edges

BACKENDS = ("torch",)


def _shift_range(cell: torch.Tensor, pbc: torch.Tensor, cutoff: float) -> list[int]:
    """Number of images needed along each axis so that every pair within ``cutoff`` is found."""
    n = []
    if pbc.any():
        inv = torch.linalg.pinv(cell.double())  # columns are reciprocal vectors / 2pi
        for a in range(3):
            if pbc[a]:
                width = 1.0 / float(torch.linalg.vector_norm(inv[:, a]))
                n.append(int(math.ceil(cutoff / width)))
            else:
                n.append(0)
    else:
        n = [0, 0, 0]
    return n


def _torch_system(pos, cell, pbc, cutoff):
    """All pairs of one system; positions wrapped along periodic axes, shifts corrected back."""
    dev = pos.device
    nat = pos.shape[0]
    if pbc.any():
        inv = torch.linalg.pinv(cell)
        frac = pos @ inv
        floor = torch.where(pbc, torch.floor(frac), torch.zeros_like(frac))
        wrapped = pos - floor @ cell
    else:
        floor = torch.zeros_like(pos)
        wrapped = pos
    nx, ny, nz = _shift_range(cell, pbc, cutoff)
    rng = [torch.arange(-k, k + 1, device=dev) for k in (nx, ny, nz)]
    shifts = torch.cartesian_prod(*rng).reshape(-1, 3)  # [K, 3]
    shift_vec = shifts.to(pos.dtype) @ cell  # [K, 3]
    # d[i, j, k] = wrapped[j] + shift_vec[k] - wrapped[i]
    d = wrapped[None, :, None, :] + shift_vec[None, None, :, :] - wrapped[:, None, None, :]
    dist2 = (d * d).sum(-1)
    mask = dist2 < cutoff * cutoff
    zero = (shifts == 0).all(dim=1)
    eye = torch.eye(nat, dtype=torch.bool, device=dev)
    mask &= ~(eye[:, :, None] & zero[None, None, :])
    i, j, k = torch.nonzero(mask, as_tuple=True)
    s = shifts[k] - floor[j].long() + floor[i].long()
    return i, j, s


def neighbor_list(batch: Batch, cutoff: float, backend: str = "auto") -> Edges:
    """Edges of all systems in ``batch`` within ``cutoff`` (Å), receiver-sorted.

    Returns :class:`Edges` (sender [E], receiver [E], shifts [E, 3] int64) indexing the batch's atoms.
    """
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown neighbour-list backend {backend!r}; choose from {('auto',) + BACKENDS}")
    senders, receivers, shifts = [], [], []
    offsets = batch.offsets.tolist()
    for s in range(batch.n_systems):
        a, b = offsets[s], offsets[s + 1]
        i, j, sh = _torch_system(batch.positions[a:b].detach(), batch.cell[s], batch.pbc[s], cutoff)
        receivers.append(i + a)
        senders.append(j + a)
        shifts.append(sh)
    recv = torch.cat(receivers)
    order = torch.argsort(recv, stable=True)
    return Edges(torch.cat(senders)[order], recv[order], torch.cat(shifts)[order])
