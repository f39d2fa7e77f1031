"""Fused CPU edge kernels: hand-written backward passes and whole-model agreement with eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from geodite_sim.batch import Batch
from geodite_sim.model import edge_ops

pytestmark = pytest.mark.skipif(not edge_ops.fused_available("cpu"), reason="no C++ compiler for the fused kernels")


def _random_graph(seed: int, n: int = 6, e: int = 23, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (e,), generator=g)
    dst = torch.randint(0, n, (e,), generator=g)  # unsorted, repeated, self-loops: any order must work
    Y = torch.randn(e, 8, generator=g, dtype=torch.float64)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    return n, e, c, src, dst, Y.requires_grad_(True), leaf


@pytest.mark.parametrize("seed", [0, 1])
def test_message_matches_eager_and_gradcheck(seed):
    n, e, c, src, dst, Y, leaf = _random_graph(seed)
    X, od, ot = leaf(n, 8, c), leaf(e, c), leaf(e, c)
    if seed == 1:  # o_d, o_t as column blocks of the attention output (strided rows), as in the model
        od, ot = leaf(e, 3 * c)[:, c:].split(c, dim=-1)
    fused = edge_ops.message(X, od, ot, Y, src, dst, fused=True)
    eager = edge_ops.message_eager(X, od, ot, Y, src, dst)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: edge_ops.message(*a, src, dst, fused=True), (X, od, ot, Y))


@pytest.mark.parametrize("seed", [0, 1])
def test_invariant_matches_eager_and_gradcheck(seed):
    n, e, c, src, dst, Y, leaf = _random_graph(seed)
    Q, K = leaf(n, 8, c), leaf(n, 8, c)
    fused = edge_ops.invariant(Q, K, Y, src, dst, fused=True)
    eager = edge_ops.invariant_eager(Q, K, Y, src, dst)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: edge_ops.invariant(*a, src, dst, fused=True), (Q, K, Y))


@pytest.mark.parametrize("seed", [0, 1])
def test_attention_matches_eager_and_gradcheck(seed):
    n, e, c, src, dst, Y, leaf = _random_graph(seed, c=8)
    heads, scale = 4, 0.37  # value heads of 3C/4 = 6 columns: head 1 straddles the scalar/vector boundary at C
    wide = leaf(e, 5 * c)  # a_pre and f as column blocks of one tensor (strided rows), as in the model
    args = (leaf(n, c), leaf(n, c), leaf(n, 3 * c), leaf(n, 3 * c), wide[:, :c], wide[:, c : 4 * c])
    fused = edge_ops.attention(*args, src, dst, heads, scale, fused=True)
    eager = edge_ops.attention_eager(*args, src, dst, heads, scale)
    for x, y in zip(fused, eager):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: edge_ops.attention(*a, src, dst, heads, scale, fused=True), args)
    assert torch.autograd.gradcheck(
        lambda w, *a: edge_ops.attention(*a, w[:, :c], w[:, c : 4 * c], src, dst, heads, scale, fused=True),
        (wide, *args[:4]))
    # only one of the two outputs used: the other gradient arrives as None
    for part in range(3):
        assert torch.autograd.gradcheck(
            lambda *a, part=part: edge_ops.attention(*a, src, dst, heads, scale, fused=True)[part], args)


def test_gated_residual_matches_eager_and_gradcheck():
    _, e, c, _, _, _, leaf = _random_graph(4)
    args = (leaf(e, c), leaf(e, c) * 3, leaf(e, c))
    torch.testing.assert_close(edge_ops.gated_residual(*args, fused=True), edge_ops.gated_residual(*args),
                               rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: edge_ops.gated_residual(*a, fused=True), args)


def test_float32_kernels_agree_with_eager():
    n, e, c, src, dst, Y, leaf = _random_graph(3, n=40, e=700, c=32)
    X, od, ot = (t.float() for t in (leaf(n, 8, c), leaf(e, c), leaf(e, c)))
    torch.testing.assert_close(edge_ops.message(X, od, ot, Y.float(), src, dst, fused=True),
                               edge_ops.message_eager(X, od, ot, Y.float(), src, dst), rtol=1e-5, atol=1e-4)


def _mixed_structures():
    nacl = bulk("NaCl", "rocksalt", 5.64) * (2, 1, 1)
    nacl.rattle(0.05, seed=1)
    slab = bulk("Cu", "fcc", 3.61, cubic=True)
    slab.pbc = [True, True, False]
    slab.rattle(0.03, seed=2)
    water = molecule("H2O")
    water.center(vacuum=4.0)
    lone = Atoms("Li", positions=[[0.0, 0.0, 0.0]], cell=np.eye(3) * 12.0, pbc=True)
    return [nacl, slab, water, lone]


@pytest.mark.parametrize("threads", [1, 2])
def test_whole_model_fused_equals_eager_float64(reference_model_fp64, threads):
    model = reference_model_fp64
    batch = Batch.from_atoms(_mixed_structures(), dtype=torch.float64)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        eager = model(batch, fused=False)
        assert model.use_fused()
        fused = model(batch)
    finally:
        torch.set_num_threads(old)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(fused[key], eager[key], rtol=0, atol=1e-10)


def test_training_and_second_order_use_eager(reference_model_fp64):
    model = reference_model_fp64
    assert not model.use_fused(create_graph=True)
    p = next(model.parameters())
    p.requires_grad_(True)
    try:
        assert not model.use_fused()
    finally:
        p.requires_grad_(False)


def test_kernels_do_not_depend_on_batch_composition():
    """With 2 threads, a graph's node sums are bit-for-bit the same alone and after another graph in
    the same batch (scatters run in edge order): a resumed relaxation, which runs in other batches,
    then reproduces the uninterrupted one (tests/workflows/test_stability.py::test_cli_resume_after_sigkill)."""
    n, e, c, src, dst, Y, leaf = _random_graph(7, n=30, e=900, c=32)
    m, f, c2, src2, dst2, Y2, leaf2 = _random_graph(8, n=20, e=700, c=32)
    X, od, ot = (t.float().detach() for t in (leaf(n, 8, c), leaf(e, c), leaf(e, c)))
    X2, od2, ot2 = (t.float().detach() for t in (leaf2(m, 8, c), leaf2(f, c), leaf2(f, c)))
    Yf, Y2f = Y.float().detach(), Y2.float().detach()
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def run(parts):
            Xs = torch.cat([p[0] for p in parts]).requires_grad_(True)
            offs, srcs, dsts = 0, [], []
            for p in parts:
                srcs.append(p[4] + offs)
                dsts.append(p[5] + offs)
                offs += p[0].shape[0]
            out = edge_ops.message(Xs, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
                                   torch.cat([p[3] for p in parts]), torch.cat(srcs), torch.cat(dsts), fused=True)
            (g,) = torch.autograd.grad((out * out).sum(), Xs)
            return out.detach(), g

        a = (X, od, ot, Yf, src, dst)
        b = (X2, od2, ot2, Y2f, src2, dst2)
        alone, g_alone = run([a])
        both, g_both = run([b, a])
        assert torch.equal(alone, both[m:]) and torch.equal(g_alone, g_both[m:])
    finally:
        torch.set_num_threads(old)
