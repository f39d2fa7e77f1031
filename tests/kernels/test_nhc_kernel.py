"""The Triton Nosé–Hoover chain kernel (kernels/nhc_chain.py, the CUDA path of ``geodite_sim::nhc_chain``) equals
the tensor recursion (ASE's ``integrate_nhc`` order) in float64, run on the CPU under Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def test_kernel_under_interpreter():
    """Run the comparison below in a fresh interpreter with TRITON_INTERPRET=1 (set before triton is imported)."""
    if INTERPRETED:
        pytest.skip("the interpreter is active in this process: test_kernel_equals_reference runs here")
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
           "-k", "equals_reference"]
    res = subprocess.run(cmd, cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "2 passed" in res.stdout.strip().splitlines()[-1], res.stdout[-2000:]


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton is imported; "
                                            "run by test_kernel_under_interpreter")
@pytest.mark.parametrize("S,M,tloop", [(37, 10, 1), (33, 3, 2)])
def test_kernel_equals_reference(S, M, tloop):
    from geodite_sim.kernels.nhc_chain import triton_nhc_chain

    from geodite_sim.dynamics.nhc_chain import _reference

    g = torch.Generator().manual_seed(S * 100 + M)
    k2 = torch.rand(S, generator=g, dtype=torch.float64) * 2
    n3kT = torch.rand(S, generator=g, dtype=torch.float64) * 2
    kT = torch.rand(S, generator=g, dtype=torch.float64) * 0.1 + 0.01
    Q = torch.rand(S, M, generator=g, dtype=torch.float64) * 50 + 1
    p_eta = torch.randn(S, M, generator=g, dtype=torch.float64)
    eta = torch.randn(S, M, generator=g, dtype=torch.float64)
    got = triton_nhc_chain(k2, n3kT, kT, Q, p_eta, eta, 0.7, tloop)
    ref = _reference(k2, n3kT, kT, Q, p_eta, eta, 0.7, tloop)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert not torch.equal(got[0], p_eta)  # the sweep moved the chain
