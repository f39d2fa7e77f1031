"""Triton kernel: the Nosé–Hoover chain sweep (ASE's ``integrate_nhc``) of every system in one launch.

One lane per system (``BLOCK`` systems per program). A system's chain — thermostat momenta ``p_eta``,
positions ``eta`` and masses ``Q``, ``M`` of each — is held as one ``[BLOCK, MP]`` register tile; column
``j`` is read with a masked row sum and written with ``tl.where``, so the sequential recursion
(thermostat j updated with the freshly updated j ± 1, for every ``tloop`` sub-step and Suzuki–Yoshida
weight) runs unrolled in registers with no memory traffic between updates. The formulas and their order are
those of :func:`geodite_sim.dynamics.nhc_chain.chain_sweeps` (and so of ASE). Compiled on CUDA; on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1`` before ``triton`` is imported), as the tests run it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from geodite_sim.core.ops import FOURTH_ORDER_COEFFS

BLOCK = 32


@triton.jit
def _col(x, cols, j: tl.constexpr):
    """Column ``j`` of a [BLOCK, MP] tile as a [BLOCK] vector."""
    return tl.sum(tl.where(cols[None, :] == j, x, 0.0), axis=1)


@triton.jit
def _update(pe, Q, cols, k2, n3kT, kT, d2, d4, j: tl.constexpr, M: tl.constexpr):
    """One thermostat's half update (ASE's order): scale by a, kick by d2·G_j, scale by a."""
    pej = _col(pe, cols, j)
    if j < M - 1:
        a = tl.exp(-d4 * _col(pe, cols, j + 1) / _col(Q, cols, j + 1))
        pej = pej * a
    if j == 0:
        g = k2 - n3kT
    else:
        prev = _col(pe, cols, j - 1)
        g = prev * prev / _col(Q, cols, j - 1) - kT
    pej = pej + d2 * g
    if j < M - 1:
        pej = pej * a
    return tl.where(cols[None, :] == j, pej[:, None], pe)


@triton.jit
def _nhc_kernel(k2_ptr, n3kT_ptr, kT_ptr, Q_ptr, pe_ptr, eta_ptr, w_ptr, pe_out, eta_out, scale_out, S, delta,
                TLOOP: tl.constexpr, NW: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < S
    cols = tl.arange(0, MP)
    m2 = rmask[:, None] & (cols[None, :] < M)
    offs = rows[:, None] * M + cols[None, :]
    Q = tl.load(Q_ptr + offs, mask=m2, other=1.0)
    pe = tl.load(pe_ptr + offs, mask=m2, other=0.0)
    eta = tl.load(eta_ptr + offs, mask=m2, other=0.0)
    k2 = tl.load(k2_ptr + rows, mask=rmask, other=0.0)
    n3kT = tl.load(n3kT_ptr + rows, mask=rmask, other=0.0)
    kT = tl.load(kT_ptr + rows, mask=rmask, other=1.0)
    scale = tl.full([BLOCK], 1.0, k2.dtype)
    for _t in tl.static_range(TLOOP):
        for w in tl.static_range(NW):
            d = tl.load(w_ptr + w) * delta / TLOOP
            d2 = d / 2
            d4 = d / 4
            for jj in tl.static_range(M):
                pe = _update(pe, Q, cols, k2, n3kT, kT, d2, d4, M - 1 - jj, M)
            eta = eta + d * pe / Q
            f = tl.exp(-d * _col(pe, cols, 0) / _col(Q, cols, 0))
            scale = scale * f
            k2 = k2 * f * f
            for j in tl.static_range(M):
                pe = _update(pe, Q, cols, k2, n3kT, kT, d2, d4, j, M)
    tl.store(pe_out + offs, pe, mask=m2)
    tl.store(eta_out + offs, eta, mask=m2)
    tl.store(scale_out + rows, scale, mask=rmask)


def triton_nhc_chain(k2: torch.Tensor, n3kT: torch.Tensor, kT: torch.Tensor, Q: torch.Tensor, p_eta: torch.Tensor,
                     eta: torch.Tensor, delta: float, tloop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p_eta' [S, M], eta' [S, M], momentum scale [S]); inputs as :func:`geodite_sim.dynamics.nhc_chain.nhc_chain`."""
    S, M = p_eta.shape
    weights = torch.tensor(FOURTH_ORDER_COEFFS, dtype=k2.dtype, device=k2.device)
    pe_out, eta_out, scale = torch.empty_like(p_eta), torch.empty_like(eta), torch.empty_like(k2)
    if S == 0:
        return pe_out, eta_out, scale
    grid = (triton.cdiv(S, BLOCK),)
    _nhc_kernel[grid](k2.contiguous(), n3kT.contiguous(), kT.contiguous(), Q.contiguous(), p_eta.contiguous(),
                      eta.contiguous(), weights, pe_out, eta_out, scale, S, float(delta), TLOOP=int(tloop),
                      NW=len(FOURTH_ORDER_COEFFS), M=M, MP=triton.next_power_of_2(M), BLOCK=BLOCK)
    return pe_out, eta_out, scale
