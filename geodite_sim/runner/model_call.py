"""The model adapter: how the runner calls a model of the contract (docs/model-contract.md).

The model's call signature is read once, at construction: a model that takes ``check`` skips its host-side
input checks (admission validated the structures), one that takes ``fused`` gets the engine's fused-kernel
choice. A model that uses the runner's edges gets the padded batch and its masked edge list; one that builds
its own lists (``uses_edges`` false) is called on the occupied systems only.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from geodite_sim.batch import Batch, atom_indices
from geodite_sim.model.contract import uses_edges
from geodite_sim.model.geodite import Edges
from geodite_sim.runner.edges import make_buffer
from geodite_sim.runner.registry import Evaluation
from geodite_sim.runner.slots import Bare, pad_state


def _parameters(model) -> frozenset[str]:
    fn = getattr(model, "forward", model)
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


class ModelCall:
    """Calls ``model`` for the runner: ``evaluate`` on a padded batch, ``evaluate_compact`` on a compact one.

    Attributes:
        kwargs: keyword arguments of every call (``check=False``, ``fused=False`` where the model takes them).
        uses_edges: whether the model takes the runner's edge list.
        takes_fused: whether the model has a ``fused`` argument (compile mode switches it off).
    """

    def __init__(self, model, needs_stress: bool, fused_kernels: bool | str = "auto"):
        self.model = model
        self.needs_stress = needs_stress
        self.dtype, self.device = model.dtype, torch.device(model.device)
        self.uses_edges = uses_edges(model)
        params = _parameters(model)
        self.takes_fused = "fused" in params
        self.kwargs: dict = {}
        if "check" in params:
            self.kwargs["check"] = False
        if self.takes_fused and fused_kernels is False:
            self.kwargs["fused"] = False

    def no_fused_kernels(self) -> None:
        """Switch the fused C++ kernels off (they are opaque to ``torch.compile``)."""
        if self.takes_fused:
            self.kwargs["fused"] = False

    def evaluate(self, batch: Batch, edges: Edges | None, occupied: Sequence[int] = ()) -> Evaluation:
        """The model on a padded batch (edges given) or, for models that build their own lists, on its
        ``occupied`` systems."""
        need_stress = self.needs_stress
        if self.uses_edges:
            out = self.model(batch, edges=edges, compute_forces=True, compute_stress=need_stress, **self.kwargs)
            stress = out.get("stress")
            return Evaluation(out["energy"], out["forces"],
                              stress if stress is not None else torch.zeros_like(batch.cell))
        energy = torch.zeros(batch.n_systems, dtype=self.dtype, device=self.device)
        forces = torch.zeros_like(batch.positions)
        stress = torch.zeros_like(batch.cell)
        if occupied:
            sub = batch.select(list(occupied))
            out = self.model(sub, compute_forces=True, compute_stress=need_stress)
            idx = torch.as_tensor(list(occupied), device=self.device)
            energy[idx] = out["energy"]
            forces[atom_indices(batch.offsets, idx)] = out["forces"]
            if out.get("stress") is not None:
                stress[idx] = out["stress"]
        return Evaluation(energy, forces, stress)

    def evaluate_compact(self, batch: Batch, pad_cell: torch.Tensor, cutoff: float, backend: str) -> Evaluation:
        """Model outputs of a compact batch, through the same padded path as a step (bitwise the same per
        system)."""
        n, k = batch.n_atoms, batch.n_systems
        padded = pad_state(Bare(batch=batch), n + 1, k, pad_cell).batch
        real = torch.arange(k, device=self.device)
        buf = make_buffer(padded, real, cutoff, 0.0, backend, static=False)
        edges = buf.masked(padded.positions, padded.cell, padded.system_index) if self.uses_edges else None
        ev = self.evaluate(padded, edges, range(k))
        return Evaluation(ev.energy[:k], ev.forces[:n], ev.stress[:k])


__all__ = ["ModelCall"]
