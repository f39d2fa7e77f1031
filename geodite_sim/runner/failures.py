"""Device-side failure checks of every step (non-finite outputs, close contacts, volume blow-up) and their
messages. A check writes a :class:`~geodite_sim.status.Status` device code and the offending value per slot;
the host reads them once per check and turns them into messages (:meth:`Failures.describe`)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from ase.data import covalent_radii

from geodite_sim.model.geodite import Edges
from geodite_sim.model.strain import cell_volumes
from geodite_sim.runner.config import FailureChecks
from geodite_sim.status import Status


class Failures:
    """The failure checks of a run: ``checks`` for every step, ``admission`` for the initial evaluation."""

    def __init__(self, checks: FailureChecks, admission: FailureChecks, cutoff: float, neighbor_backend: str,
                 dtype: torch.dtype, device: torch.device):
        self.checks, self.admission = checks, admission
        self.cutoff, self.backend = cutoff, neighbor_backend
        self.dtype, self.device = dtype, device
        self.radii = torch.as_tensor(covalent_radii, dtype=dtype, device=device)

    def on_device(self, state, edges: Edges, volume0: torch.Tensor, contacts: bool,
                  checks: FailureChecks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[S] device failure codes and values of an evaluated state (non-finite, contact, volume).

        ``contacts``: whether ``edges`` are the state's edges (the contact check needs them; a model that builds
        its own lists gives the step none). ``checks``: default the per-step ones."""
        checks = checks or self.checks
        b = state.batch
        sys_idx, n_sys = b.system_index, b.cell.shape[0]
        code = torch.zeros(n_sys, dtype=torch.long, device=self.device)
        value = torch.zeros(n_sys, dtype=self.dtype, device=self.device)
        r = checks.max_volume_ratio
        relax_cell = getattr(state, "relax_cell", None)  # a state field (relaxations), not a hook
        if r is not None and relax_cell is not None:
            ratio = cell_volumes(b.cell) / volume0
            bad = relax_cell & ((ratio > r) | (ratio < 1.0 / r) | ~torch.isfinite(ratio))
            code = torch.where(bad, Status.VOLUME.code, code)
            value = torch.where(bad, ratio, value)
        f = checks.min_distance_factor
        if f is not None and contacts:
            shift_vec = torch.einsum("ei,eij->ej", edges.shifts, b.cell[sys_idx[edges.receiver]])
            vec = b.positions[edges.sender] + shift_vec - b.positions[edges.receiver]
            ratio = torch.linalg.vector_norm(vec, dim=-1) / (self.radii[b.numbers[edges.sender]]
                                                              + self.radii[b.numbers[edges.receiver]])
            pad_atom = b.positions.shape[0] - 1  # padding edges start and end there (self-images are real edges)
            ratio = torch.where(edges.receiver == pad_atom, math.inf, ratio)
            min_ratio = torch.full((n_sys,), math.inf, dtype=self.dtype, device=self.device)
            min_ratio = min_ratio.scatter_reduce(0, sys_idx[edges.receiver], ratio, reduce="amin")
            close = min_ratio < f
            code = torch.where(close, Status.ATOMS_TOO_CLOSE.code, code)
            value = torch.where(close, min_ratio, value)
        bad_atom = ~torch.isfinite(state.forces).all(1) | ~torch.isfinite(b.positions).all(1)
        bad = torch.zeros(n_sys, dtype=torch.long, device=self.device).index_add_(0, sys_idx, bad_atom.long()) > 0
        bad = bad | ~torch.isfinite(state.energy) | ~torch.isfinite(state.stress).flatten(1).all(1)
        code = torch.where(bad, Status.NON_FINITE.code, code)
        return code, value

    def initial(self, state, uses_edges: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and values of a freshly initialised compact state (the admission checks; the contact check
        searches its own edges, whatever the model uses)."""
        from geodite_sim.neighbors import neighbor_list

        checks = self.admission
        edges = neighbor_list(state.batch, self.cutoff, self.backend if uses_edges else "torch") \
            if checks.min_distance_factor is not None else None
        if edges is None:
            none = torch.zeros(0, dtype=torch.long, device=self.device)
            edges = Edges(none, none.clone(), torch.zeros(0, 3, dtype=self.dtype, device=self.device))
        edges = Edges(edges.sender, edges.receiver, edges.shifts.to(self.dtype))
        return self.on_device(state, edges, cell_volumes(state.batch.cell), contacts=True, checks=checks)

    def describe(self, code: int, value: float, step: int, one=None) -> str:
        """Message of a device failure code (``one``: the failed system's compact state, for contact details)."""
        status = Status.from_code(code)
        if status is Status.NON_FINITE:
            return f"non-finite energy, forces, stress or positions (NaN/Inf) at step {step}"
        if status is Status.VOLUME:
            r = self.checks.max_volume_ratio
            return (f"volume {'blow-up' if value > 1 else 'collapse'}: V/V0 = {value:.3g} outside "
                    f"[1/{r:g}, {r:g}] at step {step}")
        if status is Status.ATOMS_TOO_CLOSE:
            factor = self.checks.min_distance_factor or self.admission.min_distance_factor or 0.0
            detail = self._contact_detail(one, factor) if one is not None else ""
            return (f"atoms too close at step {step}: " + (detail or f"distance {value:.3g} × covalent-radius sum "
                    f"< {factor:g}"))
        return f"{status.value} at step {step}"

    def _contact_detail(self, one, factor: float) -> str:
        from ase.data import chemical_symbols

        from geodite_sim.model.strain import edge_vectors
        from geodite_sim.neighbors import neighbor_list

        try:
            b = replace(one.batch, atom_count=None)
            edges = neighbor_list(b, self.cutoff, "torch")
            d = torch.linalg.vector_norm(edge_vectors(b.positions, b.cell, b.system_index, edges), dim=-1)
            rsum = self.radii[b.numbers[edges.sender]] + self.radii[b.numbers[edges.receiver]]
            k = int(torch.argmin(d / rsum))
            i, j = int(edges.receiver[k]), int(edges.sender[k])
            zi, zj = chemical_symbols[int(b.numbers[i])], chemical_symbols[int(b.numbers[j])]
            return (f"{zi}{i}-{zj}{j} at {float(d[k]):.3f} Å < {factor:g} × "
                    f"covalent-radius sum {float(rsum[k]):.3f} Å")
        except Exception:  # the message must never fail
            return ""


def blown_up(max_move: float, step: int) -> tuple[Status, str]:
    """The status and message of a system whose atoms outrun the largest skin."""
    return Status.NON_FINITE, (f"atoms move more than {max_move:.3g} Å between two steps (at step {step}): the "
                               "simulation has blown up")


__all__ = ["Failures", "blown_up"]
