"""geodite_sim.core: the leaf layer's shared operations (issue 24: one implementation per concept)."""

from __future__ import annotations

import math

import torch

from geodite_sim.core.graph import Edges, edge_vectors, min_contact_ratio
from geodite_sim.core.ops import cell_volumes, det3, segment_sum


def test_det3_and_cell_volumes_equal_linalg():
    cells = torch.randn(7, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(det3(cells), torch.linalg.det(cells), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cell_volumes(cells), torch.linalg.det(cells).abs(), rtol=1e-12, atol=1e-12)


def test_segment_sum():
    values = torch.arange(10.0).reshape(5, 2)
    out = segment_sum(values, torch.tensor([0, 2, 0, 2, 2]), 4)
    assert out.tolist() == [[4.0, 6.0], [0.0, 0.0], [16.0, 19.0], [0.0, 0.0]]


def test_edge_vectors_and_contact_ratio():
    positions = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    cell = torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * 4.0
    system_index = torch.tensor([0, 0, 1])
    edges = Edges(torch.tensor([1, 0, 2]), torch.tensor([0, 1, 2]), torch.tensor([[0, 0, 0], [-1, 0, 0], [1, 0, 0]]))
    vec = edge_vectors(positions, cell, system_index, *edges)
    assert vec.tolist() == [[1.0, 0.0, 0.0], [-5.0, 0.0, 0.0], [4.0, 0.0, 0.0]]
    radii = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    numbers = torch.tensor([1, 2, 1])
    ratio = min_contact_ratio(vec, radii, numbers, edges.sender, edges.receiver, system_index, 3)
    assert ratio.tolist() == [1.0 / 1.5, 4.0, math.inf]  # system 2 has no edge
    real = torch.tensor([False, True, True])
    assert min_contact_ratio(vec, radii, numbers, edges.sender, edges.receiver, system_index, 2,
                             real=real).tolist() == [5.0 / 1.5, 4.0]
