"""Batched neighbour lists (edges sender -> receiver with integer cell shifts).

``neighbor_list(batch, cutoff)`` returns the pairs (i = receiver, j = sender, S)
with ``|r_j + S @ cell - r_i| < cutoff``, excluding i == j at S == 0, exactly as
``ase.neighborlist.neighbor_list("ijS")`` does, honouring pbc per axis, cells
thinner than the cutoff (several images of a neighbour, and of the atom itself)
and unwrapped positions (shifts refer to the positions as given).

Backends (all return int64 tensors on the batch's device, receiver-sorted, only
real atoms — padding rows after ``offsets[-1]`` are ignored):

- ``"triton"``: one count launch + prefix sum + one fill launch over the whole
  batch (``geodite_sim.kernels.neighbor_list``); CUDA, or CPU under ``TRITON_INTERPRET=1``.
- ``"alchemiops"``: nvalchemiops' batched Warp kernels (naive or cell list); CPU and CUDA.
- ``"torch"``: vectorised brute force over atom pairs with per-pair image ranges; the reference.

``"auto"`` picks triton on CUDA, alchemiops on CPU, torch when neither imports.
The runner keeps lists between steps with a Verlet skin (:mod:`geodite_sim.runner.edges`, docs/runner.md).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from geodite_sim._warp import import_warp_quietly
from geodite_sim.batch import Batch
from geodite_sim.core.graph import Edges
from geodite_sim.core.ops import cell_volumes

BACKENDS = ("triton", "alchemiops", "torch")

#: Margin (in fractional units) added to image ranges so that rounding in the wrap never loses an image.
_IMAGE_EPS = 1e-9
#: Atom pairs per chunk and candidate (pair, image) triples per chunk in the torch backend.
_PAIR_CHUNK = 1 << 20
_CANDIDATE_CHUNK = 1 << 22
#: Above this many atoms in its largest system a batch goes to nvalchemiops' cell list instead of naive.
_CELL_LIST_ATOMS = 256


# ---------------------------------------------------------------------------------------------- geometry
@dataclass
class WrappedGeometry:
    """A batch's real atoms wrapped into their cells along periodic axes. N real atoms, S systems.

    Attributes:
        positions: [N, 3] positions as given (detached), Å.
        wrapped: [N, 3] ``positions - image @ cell``, inside the cell along periodic axes, Å.
        frac: [N, 3] fractional coordinates of ``wrapped`` in ``full_cell`` (in [0, 1] along periodic axes).
        image: [N, 3] int64 lattice translations removed by the wrap (0 along non-periodic axes).
        cell: [S, 3, 3] the batch's cell (detached), rows = lattice vectors, Å.
        full_cell: [S, 3, 3] ``cell`` with non-periodic rows replaced by an orthonormal completion.
        reach: [S, 3] ``cutoff * |reciprocal vector|`` along periodic axes (0 elsewhere): the cutoff in cell units.
        n_images: [S, 3] int64 images needed each way along each axis, ``ceil(reach)``.
        pbc: [S, 3] bool.
        system_index: [N] int64.
        offsets: [S + 1] int64.
    """

    positions: torch.Tensor
    wrapped: torch.Tensor
    frac: torch.Tensor
    image: torch.Tensor
    cell: torch.Tensor
    full_cell: torch.Tensor
    reach: torch.Tensor
    n_images: torch.Tensor
    pbc: torch.Tensor
    system_index: torch.Tensor
    offsets: torch.Tensor


def complete_cell(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """Full-rank cells [S, 3, 3]: periodic rows kept, non-periodic rows replaced by unit vectors
    orthogonal to the periodic ones (identity for fully non-periodic systems). Vectorised over systems.

    Raises ValueError when the periodic lattice vectors of a system are degenerate.
    """
    n_sys = cell.shape[0]
    dtype, dev = cell.dtype, cell.device
    per = pbc[..., None]
    rows = torch.where(per, cell, torch.zeros_like(cell))
    k = pbc.sum(1)
    out = torch.where(per, cell, torch.eye(3, dtype=dtype, device=dev).expand(n_sys, 3, 3))

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)

    # Two periodic axes: the non-periodic row c becomes the unit normal rows[c+1] x rows[c+2].
    normal = unit(torch.linalg.cross(rows.roll(-1, dims=1), rows.roll(-2, dims=1), dim=-1))
    # One periodic axis a: two unit vectors u, v perpendicular to a, given to the non-periodic axes in order.
    a = rows.sum(1)
    helper = torch.nn.functional.one_hot(a.abs().argmin(dim=1), 3).to(dtype)
    u = unit(torch.linalg.cross(a, helper, dim=-1))
    v = unit(torch.linalg.cross(a, u, dim=-1))
    first = (torch.cumsum((~pbc).long(), 1) == 1)[..., None]
    one_axis = torch.where(first, u[:, None, :], v[:, None, :])
    out = torch.where(~per & (k == 2)[:, None, None], normal, out)
    out = torch.where(~per & (k == 1)[:, None, None], one_axis, out)

    periodic = k > 0
    if bool(periodic.any()):
        norms = torch.linalg.vector_norm(out, dim=-1).prod(-1)
        det = cell_volumes(out)
        bad = periodic & ~(det > 1e-10 * norms)
        if bool(bad.any()):
            bad_systems = torch.nonzero(bad).flatten().tolist()
            raise ValueError(f"degenerate periodic lattice vectors in system(s) {bad_systems}")
    return out


def wrap_batch(batch: Batch, cutoff: float) -> WrappedGeometry:
    """Wrap the real atoms of ``batch`` along periodic axes and size the image ranges for ``cutoff`` (Å)."""
    n = batch.n_atoms
    pos = batch.positions[:n].detach()
    cell = batch.cell.detach()
    pbc = batch.pbc.to(torch.bool)
    sys_idx = batch.system_index[:n]
    full = complete_cell(cell, pbc)
    inv = torch.linalg.inv(full)  # column a = reciprocal vector b_a (without 2 pi)
    frac = torch.einsum("ni,nij->nj", pos, inv[sys_idx])
    image = torch.where(pbc[sys_idx], torch.floor(frac), torch.zeros_like(frac))
    wrapped = pos - torch.einsum("ni,nij->nj", image, cell[sys_idx])
    reach = cutoff * torch.linalg.vector_norm(inv, dim=1) * pbc
    n_images = torch.ceil(reach + _IMAGE_EPS).long() * pbc
    return WrappedGeometry(
        positions=pos,
        wrapped=wrapped.contiguous(),
        frac=frac - image,
        image=image.long(),
        cell=cell,
        full_cell=full,
        reach=reach,
        n_images=n_images,
        pbc=pbc,
        system_index=sys_idx,
        offsets=batch.offsets,
    )


def _empty_edges(device: torch.device) -> Edges:
    z = torch.zeros(0, dtype=torch.long, device=device)
    return Edges(z, z.clone(), torch.zeros(0, 3, dtype=torch.long, device=device))


# ---------------------------------------------------------------------------------------------- torch
def _torch_candidates(
    geo: WrappedGeometry, cutoff: float, sys: torch.Tensor, i: torch.Tensor, j: torch.Tensor, lo: torch.Tensor,
    cnt: torch.Tensor, tot: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expand atom pairs into their candidate images and keep those within ``cutoff``."""
    nc = int(tot.sum())
    rep = torch.repeat_interleave(torch.arange(tot.numel(), device=tot.device), tot, output_size=nc)
    local = torch.arange(nc, device=tot.device) - (torch.cumsum(tot, 0) - tot)[rep]
    c = cnt[rep]
    img = torch.stack((local // (c[:, 1] * c[:, 2]), (local // c[:, 2]) % c[:, 1], local % c[:, 2]), 1) + lo[rep]
    i, j, s = i[rep], j[rep], sys[rep]
    shift = img - geo.image[j] + geo.image[i]
    pos = geo.positions
    # Same arithmetic as ASE: D = r_j - r_i + S @ cell, d = sqrt(D . D).
    d = pos[j] - pos[i] + torch.einsum("ei,eij->ej", shift.to(pos.dtype), geo.cell[s])
    keep = torch.sqrt((d * d).sum(-1)) < cutoff
    keep &= (i != j) | (shift != 0).any(1)
    return j[keep], i[keep], shift[keep]


def _torch_backend(geo: WrappedGeometry, cutoff: float) -> Edges:
    """Reference: every atom pair of a system, each with only the images its fractional separation allows.

    For a pair with wrapped fractional separation delta, image n along periodic axis a can be within the
    cutoff only if ``|delta_a + n_a| < reach_a``; the (pair, image) candidates are expanded in chunks.
    """
    dev = geo.positions.device
    counts = geo.offsets[1:] - geo.offsets[:-1]
    pair_ptr = torch.zeros(counts.numel() + 1, dtype=torch.long, device=dev)
    pair_ptr[1:] = torch.cumsum(counts * counts, 0)
    n_pairs = int(pair_ptr[-1])
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for p0 in range(0, n_pairs, _PAIR_CHUNK):
        p = torch.arange(p0, min(n_pairs, p0 + _PAIR_CHUNK), device=dev)
        sys = torch.searchsorted(pair_ptr[1:], p, right=True)
        q = p - pair_ptr[sys]
        n_s = counts[sys]
        i = geo.offsets[sys] + q // n_s
        j = geo.offsets[sys] + q % n_s
        delta = geo.frac[j] - geo.frac[i]
        reach = geo.reach[sys]
        per = geo.pbc[sys]
        lo = torch.where(per, torch.ceil(-reach - delta - _IMAGE_EPS), torch.zeros_like(delta)).long()
        hi = torch.where(per, torch.floor(reach - delta + _IMAGE_EPS), torch.zeros_like(delta)).long()
        cnt = (hi - lo + 1).clamp_min(0)
        tot = cnt.prod(1)
        ctot = torch.cumsum(tot, 0)
        total = int(ctot[-1])
        # split so that each piece expands to about _CANDIDATE_CHUNK candidates
        bounds = [0]
        if total > _CANDIDATE_CHUNK:
            marks = torch.arange(_CANDIDATE_CHUNK, total, _CANDIDATE_CHUNK, device=dev)
            bounds += torch.searchsorted(ctot, marks, right=True).tolist()
        bounds.append(p.numel())
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                out.append(_torch_candidates(geo, cutoff, sys[a:b], i[a:b], j[a:b], lo[a:b], cnt[a:b], tot[a:b]))
    if not out:
        return _empty_edges(dev)
    sender, receiver, shifts = (torch.cat(t) for t in zip(*out))
    return Edges(sender, receiver, shifts)  # pairs are enumerated receiver-major: already sorted


# ---------------------------------------------------------------------------------------------- alchemiops
class _AlchemiopsCapacity:
    """Neighbour-matrix width (max neighbours per atom) remembered between calls, per device."""

    width: dict[str, int] = {}


def _alchemiops_backend(geo: WrappedGeometry, cutoff: float, method: str | None = None) -> Edges:
    """nvalchemiops batched neighbour matrix, regrown until no row overflows, then packed to COO.

    ``method`` is ``"batch_naive"`` or ``"batch_cell_list"`` (default: cell list when the largest system
    has more than ``_CELL_LIST_ATOMS`` atoms, naive otherwise; they tie near 200 atoms on CPU). Matrix
    mode silently truncates rows beyond the width but still counts them, so the counts are checked
    and the call repeated with a wide enough matrix; the width is remembered (with 20 % headroom).
    """
    import_warp_quietly()
    from nvalchemiops.torch.neighbors import batch_cell_list, batch_naive_neighbor_list

    dev = geo.positions.device
    n = geo.positions.shape[0]
    if n == 0:
        return _empty_edges(dev)
    counts = geo.offsets[1:] - geo.offsets[:-1]
    max_atoms = int(counts.max())
    if method is None:
        method = "batch_cell_list" if max_atoms > _CELL_LIST_ATOMS else "batch_naive"
    batch_idx = geo.system_index.to(torch.int32)
    batch_ptr = geo.offsets.to(torch.int32)
    # The kernels wrap internally; pass prewrapped positions and the completed (full-rank) cell so that
    # fully or partly non-periodic systems with zero cell rows stay well defined. Shifts are corrected back.
    pos = geo.wrapped
    key = str(dev)
    width = _AlchemiopsCapacity.width.get(key, 64)
    while True:
        if method == "batch_naive":
            nm, num, sh = batch_naive_neighbor_list(
                pos, cutoff, batch_idx=batch_idx, batch_ptr=batch_ptr, pbc=geo.pbc.contiguous(), cell=geo.full_cell,
                max_neighbors=width, max_atoms_per_system=max_atoms, wrap_positions=False,
            )
        elif method == "batch_cell_list":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                nm, num, sh = batch_cell_list(
                    pos, cutoff, geo.full_cell, geo.pbc.contiguous(), batch_idx,
                    max_neighbors=width, batch_ptr=batch_ptr,
                )
        else:
            raise ValueError(f"unknown nvalchemiops method {method!r}")
        need = int(num.max())
        if need <= width:
            break
        width = 16 * math.ceil(need * 1.2 / 16)
    _AlchemiopsCapacity.width[key] = max(16, 16 * math.ceil(need * 1.2 / 16))
    num = num.long()
    mask = torch.arange(nm.shape[1], device=dev)[None, :] < num[:, None]
    receiver = torch.repeat_interleave(torch.arange(n, device=dev), num)
    sender = nm[mask].long()
    shifts = sh[mask].long() - geo.image[sender] + geo.image[receiver]
    return Edges(sender, receiver, shifts)


# ---------------------------------------------------------------------------------------------- triton
def _triton_backend(geo: WrappedGeometry, cutoff: float) -> Edges:
    from geodite_sim.kernels.neighbor_list import triton_neighbor_list

    sender, receiver, shifts = triton_neighbor_list(
        geo.wrapped, geo.cell, geo.n_images, geo.image, geo.offsets, cutoff
    )
    return Edges(sender, receiver, shifts)


# ---------------------------------------------------------------------------------------------- dispatch
def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (the Triton backend then runs on CPU tensors; the variable
    must be set before ``triton`` is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def backend_available(backend: str, device: torch.device | str) -> bool:
    """Whether ``backend`` can run on ``device``."""
    dev = torch.device(device)
    if backend == "torch":
        return True
    if backend == "alchemiops":
        try:
            import_warp_quietly()
            import nvalchemiops.torch.neighbors  # noqa: F401
        except Exception:
            return False
        return True
    if backend == "triton":
        if not (dev.type == "cuda" or triton_interpret()):
            return False
        try:
            from geodite_sim.kernels.neighbor_list import interpreter_active
        except Exception:
            return False
        return dev.type == "cuda" or interpreter_active()
    raise ValueError(f"unknown neighbour-list backend {backend!r}; choose from {('auto',) + BACKENDS}")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend ``"auto"`` stands for on ``device`` (others are checked and returned)."""
    dev = torch.device(device)
    if backend == "auto":
        order = ("triton", "alchemiops", "torch") if dev.type == "cuda" else ("alchemiops", "torch")
        return next(b for b in order if backend_available(b, dev))
    if not backend_available(backend, dev):
        hint = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU)" if backend == "triton" else ""
        raise RuntimeError(f"neighbour-list backend {backend!r} is not available on {dev}{hint}")
    return backend


def neighbor_list(batch: Batch, cutoff: float, backend: str = "auto") -> Edges:
    """Edges of all systems in ``batch`` within ``cutoff`` (Å, strict ``d < cutoff``), receiver-sorted.

    Returns :class:`Edges` (sender [E], receiver [E], shifts [E, 3], all int64 on the batch's device)
    indexing the batch's real atoms; ``positions[sender] + shifts @ cell[system] - positions[receiver]``
    is the edge vector.
    """
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown neighbour-list backend {backend!r}; choose from {('auto',) + BACKENDS}")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    name = resolve_backend(backend, batch.device)
    if batch.n_atoms == 0:
        return _empty_edges(batch.device)
    geo = wrap_batch(batch, cutoff)
    if name == "torch":
        return _torch_backend(geo, cutoff)
    if name == "alchemiops":
        return _alchemiops_backend(geo, cutoff)
    return _triton_backend(geo, cutoff)
