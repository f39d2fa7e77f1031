"""Triton kernel: neighbour lists of a whole batch, deterministic COO output, no overflow.

Layout. One program per block of ``BLOCK_I`` receiver atoms of one system (blocks never straddle
systems; the block -> system map is built on the host, vectorised). The program walks its system's
*candidate* axis ``c = image * n_atoms + sender`` in chunks of ``BLOCK_J``, so every periodic image
(``(2 n_a + 1)`` per axis, ``n_a = ceil(cutoff * |b_a|)``, 0 along non-periodic axes) of every atom of
the system — the receiver's own images included — is tested against the ``BLOCK_I`` receivers in one
``[BLOCK_I, BLOCK_J]`` tile. Thin cells (thousands of images, one atom) and large systems (hundreds of
atoms, 27 images) fill tiles equally well.

Passes. The same kernel runs twice (``FILL`` is a compile-time switch):

1. count: ``counts[i]`` = number of neighbours of receiver ``i``;
2. host: ``row_ptr = exclusive_cumsum(counts)``, total ``E`` (one device -> host sync), buffers
   of exactly ``E`` edges (reused and regrown when a caller passes an :class:`EdgeBuffer`);
3. fill: each tile writes its hits at ``row_ptr[i] + hits so far + in-tile prefix sum`` — no atomics,
   receiver-sorted, and the order within a receiver (image, then sender) is deterministic.

Positions are wrapped on the host; a hit at image ``n`` between wrapped atoms is reported with shift
``n - image[j] + image[i]``, i.e. relative to the positions as given (the ASE convention).
Runs compiled on CUDA, and on CPU tensors under Triton's interpreter: ``TRITON_INTERPRET=1`` must be in
the environment before ``triton`` is first imported (Triton's own library functions are decorated then).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

#: Tile shape compiled for the GPU, and a larger one for the interpreter (where each op costs ~0.1 ms).
BLOCK_I, BLOCK_J = 32, 64
INTERPRET_BLOCK_I, INTERPRET_BLOCK_J = 64, 1024


@triton.jit
def _neighbor_kernel(
    pos_ptr,  # [N, 3] wrapped positions (float32/float64), contiguous
    cell_ptr,  # [S, 3, 3] cell rows, contiguous, same dtype
    nimg_ptr,  # [S, 3] int64 images each way per axis
    image_ptr,  # [N, 3] int64 lattice translations removed by the wrap
    offsets_ptr,  # [S + 1] int64
    block_sys_ptr,  # [B] int64 system of each receiver block
    block_start_ptr,  # [B] int64 first receiver of each block
    counts_ptr,  # [N] int32 (count pass: output)
    row_ptr_ptr,  # [N] int64 first edge of each receiver (fill pass)
    sender_ptr,  # [E] int64 (fill pass: output)
    receiver_ptr,  # [E] int64 (fill pass: output)
    shift_ptr,  # [E, 3] int64 (fill pass: output)
    cutoff2_ptr,  # [1] squared cutoff, Å^2, in the positions' dtype (a Python float would be passed as fp32)
    FILL: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.load(block_sys_ptr + pid)
    i0 = tl.load(block_start_ptr + pid)
    a0 = tl.load(offsets_ptr + s)
    a1 = tl.load(offsets_ptr + s + 1)
    n_at = (a1 - a0).to(tl.int32)  # candidate arithmetic in int32 (the host checks it cannot overflow)
    nx = tl.load(nimg_ptr + 3 * s).to(tl.int32)
    ny = tl.load(nimg_ptr + 3 * s + 1).to(tl.int32)
    nz = tl.load(nimg_ptr + 3 * s + 2).to(tl.int32)
    wy = 2 * ny + 1
    wz = 2 * nz + 1
    n_cand = (2 * nx + 1) * wy * wz * n_at
    c00 = tl.load(cell_ptr + 9 * s)
    c01 = tl.load(cell_ptr + 9 * s + 1)
    c02 = tl.load(cell_ptr + 9 * s + 2)
    c10 = tl.load(cell_ptr + 9 * s + 3)
    c11 = tl.load(cell_ptr + 9 * s + 4)
    c12 = tl.load(cell_ptr + 9 * s + 5)
    c20 = tl.load(cell_ptr + 9 * s + 6)
    c21 = tl.load(cell_ptr + 9 * s + 7)
    c22 = tl.load(cell_ptr + 9 * s + 8)

    ri = i0 + tl.arange(0, BLOCK_I)
    mi = ri < a1
    xi = tl.load(pos_ptr + 3 * ri, mask=mi, other=0.0)
    yi = tl.load(pos_ptr + 3 * ri + 1, mask=mi, other=0.0)
    zi = tl.load(pos_ptr + 3 * ri + 2, mask=mi, other=0.0)
    if FILL:
        base = tl.load(row_ptr_ptr + ri, mask=mi, other=0)
        fix = tl.load(image_ptr + 3 * ri, mask=mi, other=0)
        fiy = tl.load(image_ptr + 3 * ri + 1, mask=mi, other=0)
        fiz = tl.load(image_ptr + 3 * ri + 2, mask=mi, other=0)
    cutoff2 = tl.load(cutoff2_ptr)
    hits = tl.zeros([BLOCK_I], dtype=tl.int32)

    for c0 in range(0, n_cand, BLOCK_J):
        c = c0 + tl.arange(0, BLOCK_J)
        mc = c < n_cand
        k = c // n_at
        j = a0 + (c - k * n_at).to(tl.int64)
        kx = k // (wy * wz) - nx
        rem = k % (wy * wz)
        ky = rem // wz - ny
        kz = rem % wz - nz
        fx = kx.to(xi.dtype)
        fy = ky.to(xi.dtype)
        fz = kz.to(xi.dtype)
        xj = tl.load(pos_ptr + 3 * j, mask=mc, other=0.0) + (fx * c00 + fy * c10 + fz * c20)
        yj = tl.load(pos_ptr + 3 * j + 1, mask=mc, other=0.0) + (fx * c01 + fy * c11 + fz * c21)
        zj = tl.load(pos_ptr + 3 * j + 2, mask=mc, other=0.0) + (fx * c02 + fy * c12 + fz * c22)
        dx = xj[None, :] - xi[:, None]
        dy = yj[None, :] - yi[:, None]
        dz = zj[None, :] - zi[:, None]
        d2 = dx * dx + dy * dy + dz * dz
        origin = (kx == 0) & (ky == 0) & (kz == 0)
        is_self = (ri[:, None] == j[None, :]) & origin[None, :]
        hit = (d2 < cutoff2) & mi[:, None] & mc[None, :] & (is_self == 0)
        h = hit.to(tl.int32)
        if FILL:
            slot = base[:, None] + (hits[:, None] + tl.cumsum(h, axis=1) - 1).to(tl.int64)
            zero = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int64)
            fjx = tl.load(image_ptr + 3 * j, mask=mc, other=0)
            fjy = tl.load(image_ptr + 3 * j + 1, mask=mc, other=0)
            fjz = tl.load(image_ptr + 3 * j + 2, mask=mc, other=0)
            tl.store(sender_ptr + slot, zero + j[None, :], mask=hit)
            tl.store(receiver_ptr + slot, zero + ri[:, None], mask=hit)
            tl.store(shift_ptr + 3 * slot, zero + (kx.to(tl.int64) - fjx)[None, :] + fix[:, None], mask=hit)
            tl.store(shift_ptr + 3 * slot + 1, zero + (ky.to(tl.int64) - fjy)[None, :] + fiy[:, None], mask=hit)
            tl.store(shift_ptr + 3 * slot + 2, zero + (kz.to(tl.int64) - fjz)[None, :] + fiz[:, None], mask=hit)
        hits += tl.sum(h, axis=1)

    if not FILL:
        tl.store(counts_ptr + ri, hits, mask=mi)


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 set before import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_neighbor_kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


@dataclass
class EdgeBuffer:
    """Reusable output storage (grown, never truncated, when a build needs more edges)."""

    capacity: int = 0
    sender: torch.Tensor | None = field(default=None, repr=False)
    receiver: torch.Tensor | None = field(default=None, repr=False)
    shifts: torch.Tensor | None = field(default=None, repr=False)
    n_regrows: int = 0

    def reserve(self, n_edges: int, device: torch.device) -> None:
        """Make room for ``n_edges`` edges on ``device`` (grows by at least 25 % to amortise)."""
        if self.sender is not None and self.capacity >= n_edges and self.sender.device == device:
            return
        if self.sender is not None:
            self.n_regrows += 1
        cap = max(n_edges, int(self.capacity * 1.25))
        self.sender = torch.empty(cap, dtype=torch.long, device=device)
        self.receiver = torch.empty(cap, dtype=torch.long, device=device)
        self.shifts = torch.empty(cap, 3, dtype=torch.long, device=device)
        self.capacity = cap


def triton_neighbor_list(
    wrapped: torch.Tensor,
    cell: torch.Tensor,
    n_images: torch.Tensor,
    image: torch.Tensor,
    offsets: torch.Tensor,
    cutoff: float,
    out: EdgeBuffer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbour list of wrapped atoms (strict ``d < cutoff``, Å), receiver-sorted COO.

    Args:
        wrapped: [N, 3] positions wrapped into the cell along periodic axes (N real atoms).
        cell: [S, 3, 3] lattice vectors as rows (values along non-periodic axes are unused).
        n_images: [S, 3] images to scan each way per axis (0 along non-periodic axes).
        image: [N, 3] integer lattice translations removed by the wrap (given = wrapped + image @ cell).
        offsets: [S + 1] atom offsets of the systems.
        out: optional reusable buffer; the returned tensors are then views into it.

    Returns:
        sender [E], receiver [E], shifts [E, 3] (int64): ``given[j] + shifts @ cell - given[i]`` is the edge.
    """
    dev = wrapped.device
    interpret = interpreter_active()
    if dev.type != "cuda" and not interpret:
        raise RuntimeError(
            "the Triton neighbour list needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported"
        )
    block_i, block_j = (INTERPRET_BLOCK_I, INTERPRET_BLOCK_J) if interpret else (BLOCK_I, BLOCK_J)
    n = wrapped.shape[0]
    pos = wrapped.contiguous()
    cell = cell.to(pos.dtype).contiguous()
    n_images = n_images.to(torch.long).contiguous()
    image = image.to(torch.long).contiguous()
    offsets = offsets.to(torch.long).contiguous()

    counts_sys = offsets[1:] - offsets[:-1]
    blocks = (counts_sys + block_i - 1) // block_i
    block_ptr = torch.cumsum(blocks, 0)
    n_blocks = int(block_ptr[-1]) if blocks.numel() else 0
    counts = torch.zeros(n, dtype=torch.int32, device=dev)
    if n_blocks == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty.clone(), torch.zeros(0, 3, dtype=torch.long, device=dev)
    block_sys = torch.repeat_interleave(torch.arange(blocks.numel(), device=dev), blocks, output_size=n_blocks)
    block_rank = torch.arange(n_blocks, device=dev) - (block_ptr - blocks)[block_sys]
    block_start = offsets[block_sys] + block_rank * block_i

    n_cand = (2 * n_images + 1).prod(1) * counts_sys
    if int(n_cand.max()) >= 2**31 - block_j:
        raise ValueError("a system has more than 2^31 (image, atom) candidates; use the alchemiops backend")
    kernel = _neighbor_kernel
    cutoff2 = torch.full((1,), float(cutoff) ** 2, dtype=pos.dtype, device=dev)
    dummy_i64 = torch.zeros(1, dtype=torch.long, device=dev)
    grid = (n_blocks,)
    kernel[grid](
        pos, cell, n_images, image, offsets, block_sys, block_start, counts,
        dummy_i64, dummy_i64, dummy_i64, dummy_i64, cutoff2,
        FILL=False, BLOCK_I=block_i, BLOCK_J=block_j,
    )
    ends = torch.cumsum(counts.to(torch.long), 0)
    n_edges = int(ends[-1]) if n else 0
    row_ptr = ends - counts
    if out is None:
        out = EdgeBuffer()
    out.reserve(n_edges, dev)
    if n_edges:
        kernel[grid](
            pos, cell, n_images, image, offsets, block_sys, block_start, counts,
            row_ptr, out.sender, out.receiver, out.shifts, cutoff2,
            FILL=True, BLOCK_I=block_i, BLOCK_J=block_j,
        )
    return out.sender[:n_edges], out.receiver[:n_edges], out.shifts[:n_edges]
