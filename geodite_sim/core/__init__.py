"""The leaf layer: types and small tensor operations that several packages share.

Modules here import only torch (and the standard library), never another ``geodite_sim`` module, so that every
other package can import them at module level without an import cycle (``tests/project/test_import_graph.py``):

- :mod:`geodite_sim.core.graph`: :class:`~geodite_sim.core.graph.Edges` (the edge list every model and neighbour
  list exchanges), :func:`~geodite_sim.core.graph.edge_vectors` and
  :func:`~geodite_sim.core.graph.min_contact_ratio` (the contact measure of the failure checks and monitors).
- :mod:`geodite_sim.core.ops`: segment sums, 3×3 determinants and cell volumes (the triple product: no solver,
  no host read), the Suzuki–Yoshida weights.

This ``__init__`` imports nothing, so ``import geodite_sim.core`` stays free of torch.
"""
