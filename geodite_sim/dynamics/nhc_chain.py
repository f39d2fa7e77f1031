"""The Nosé–Hoover chain sweep (ASE's ``integrate_nhc``) as ONE operation of the step.

The recursion over the M thermostats of a chain is sequential (thermostat j is updated with
the freshly updated j ± 1), repeated for every Suzuki–Yoshida weight and ``tloop`` sub-step:
written as tensor operations it costs ~20 · M small operations per half step (~600 per MD step
for M = 10), each a kernel launch on a GPU. Here it is a custom operator
``geodite_sim::nhc_chain`` (one node in a traced/compiled graph, one launch on CUDA):

* CUDA: the Triton kernel of ``kernels/nhc_chain.py``, one lane per system, loops over tloop × weights × chain in
  registers (tested against the tensor recursion under Triton's interpreter);
* CPU: the same recursion in C++ (one loop per system, in the fused-kernel extension of
  :mod:`geodite_sim.model.edge_ops`, built once per configuration); without a compiler, in numpy;
* anything else, or no Triton: :func:`chain_sweeps` on tensors.

All implementations evaluate ASE's formulas in ASE's order (see ``nose_hoover.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from geodite_sim.core.ops import FOURTH_ORDER_COEFFS
from geodite_sim.model.edge_ops import _load_extension

_OP_NAME = "geodite_sim::nhc_chain"


def chain_sweeps(k2, n3kT, kT, Q: list, p_eta: list, eta, delta: float, tloop: int, exp, stack):
    """ASE's ``integrate_nhc`` on per-system columns; returns (p_eta columns, eta, momentum scale).

    Works on numpy arrays (CPU) or torch tensors alike: ``k2``, ``n3kT``, ``kT`` are [S], ``Q`` and
    ``p_eta`` lists of M [S] columns, ``eta`` [S, M]; ``exp``/``stack`` are the array library's.
    The atoms' momenta are not touched: the returned [S] factor scales them.
    """
    M = len(p_eta)
    pe = list(p_eta)
    scale = None
    Qs = stack(Q, 1)

    def update(j: int, d2: float, d4: float) -> None:
        if j < M - 1:
            a = exp(-d4 * pe[j + 1] / Q[j + 1])
            pe[j] = pe[j] * a
        g = k2 - n3kT if j == 0 else pe[j - 1] ** 2 / Q[j - 1] - kT
        pe[j] = pe[j] + d2 * g
        if j < M - 1:
            pe[j] = pe[j] * a

    for _ in range(tloop):
        for coeff in FOURTH_ORDER_COEFFS:
            d = coeff * delta / tloop
            d2, d4 = d / 2, d / 4
            for j in range(M - 1, -1, -1):
                update(j, d2, d4)
            eta = eta + d * stack(pe, 1) / Qs
            f = exp(-d * pe[0] / Q[0])
            scale = f if scale is None else scale * f
            k2 = k2 * f * f
            for j in range(M):
                update(j, d2, d4)
    return pe, eta, scale


def _reference(k2, n3kT, kT, Q, p_eta, eta, delta: float, tloop: int):
    pe, eta, scale = chain_sweeps(k2, n3kT, kT, list(Q.unbind(1)), list(p_eta.unbind(1)), eta, delta, tloop,
                                  torch.exp, lambda cols, dim: torch.stack(cols, dim))
    return torch.stack(pe, 1), eta, scale


def _cpu(k2, n3kT, kT, Q, p_eta, eta, delta: float, tloop: int):
    ext = _load_extension()
    if ext is not None and hasattr(ext, "nhc_chain"):
        pe, eta_new, scale = ext.nhc_chain(k2, n3kT, kT, Q, p_eta, eta, float(delta), int(tloop))
        return pe, eta_new, scale
    return _numpy(k2, n3kT, kT, Q, p_eta, eta, delta, tloop)


def _numpy(k2, n3kT, kT, Q, p_eta, eta, delta: float, tloop: int):
    arrays = [np.asarray(t.detach().contiguous()) for t in (k2, n3kT, kT, Q, p_eta, eta)]
    k2_, n3kT_, kT_, Q_, pe_, eta_ = arrays
    pe, eta_new, scale = chain_sweeps(k2_, n3kT_, kT_, list(Q_.T), list(pe_.T), eta_, delta, tloop, np.exp,
                                      lambda cols, dim: np.stack(cols, dim))
    return (torch.from_numpy(np.ascontiguousarray(np.stack(pe, 1))), torch.from_numpy(np.ascontiguousarray(eta_new)),
            torch.from_numpy(np.ascontiguousarray(np.asarray(scale))))


@torch.library.custom_op(_OP_NAME, mutates_args=())
def nhc_chain(k2: torch.Tensor, n3kT: torch.Tensor, kT: torch.Tensor, Q: torch.Tensor, p_eta: torch.Tensor,
              eta: torch.Tensor, delta: float, tloop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p_eta' [S, M], eta' [S, M], momentum scale [S]) after ``tloop`` × Suzuki–Yoshida sweeps of length ``delta``.

    ``k2`` [S] = Σ p²/m, ``n3kT`` [S] = 3N kT, ``kT`` [S] eV, ``Q`` [S, M] eV·t², ``p_eta`` [S, M], ``eta`` [S, M].
    """
    if k2.device.type == "cpu":
        return _cpu(k2, n3kT, kT, Q, p_eta, eta, delta, tloop)
    if k2.device.type == "cuda":
        from geodite_sim.kernels.nhc_chain import triton_nhc_chain  # kernels/nhc_chain.py

        return triton_nhc_chain(k2, n3kT, kT, Q, p_eta, eta, delta, tloop)
    return _reference(k2, n3kT, kT, Q, p_eta, eta, delta, tloop)


@nhc_chain.register_fake
def _(k2, n3kT, kT, Q, p_eta, eta, delta, tloop):
    return torch.empty_like(p_eta), torch.empty_like(eta), torch.empty_like(k2)


def chain_sweeps_fused(k2, n3kT, kT, Q, p_eta, eta, delta: float, tloop: int):
    """:func:`nhc_chain` on contiguous inputs (the entry point the integrator uses)."""
    return nhc_chain(k2.contiguous(), n3kT.contiguous(), kT.contiguous(), Q.contiguous(), p_eta.contiguous(),
                     eta.contiguous(), float(delta), int(tloop))


__all__ = ["chain_sweeps", "chain_sweeps_fused", "nhc_chain"]
