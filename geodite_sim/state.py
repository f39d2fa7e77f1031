"""Simulation state: a Batch plus per-atom and per-system tensors, and how to re-pack them.

Integrators keep their variables (velocities, FIRE dt/alpha, thermostat chains,
step counters...) in dataclasses derived from :class:`SimState`. Each extra
field is declared per atom (leading dim N) or per system (leading dim S) with
:func:`atom_field` / :func:`system_field`; :func:`select_systems` and
:func:`concat_states` then re-pack any state generically when the scheduler
retires finished systems and appends new ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from geodite_sim.batch import Batch, atom_indices

PER = "per"
#: Metadata key of a per-system field sized by its largest system (:func:`sized_field`).
SIZE = "size"


def atom_field(**kw):
    """Declare a dataclass field whose leading dimension is the atom index."""
    return field(metadata={PER: "atom"}, **kw)


def system_field(**kw):
    """Declare a dataclass field whose leading dimension is the system index."""
    return field(metadata={PER: "system"}, **kw)


def sized_field(size, **kw):
    """Declare a per-system field [S, D, ..., D] whose trailing dims D = ``size(n)`` follow the largest system
    (n atoms) of the batch (e.g. BFGS's dense Hessian, D = 3 n + 9). :func:`select_systems` trims it to the
    selected systems' largest ``size``, :func:`concat_states` zero-pads the parts to the largest."""
    return field(metadata={PER: "system", SIZE: size}, **kw)


def packed_field(**kw):
    """Declare a field holding an object that re-packs itself: ``value.select(systems)``,
    ``type(value).concat(parts)`` and ``type(value).padding(counts, dtype, device)`` (e.g. constraints).
    It is constant during a step (the runner never merges it)."""
    return field(metadata={PER: "packed"}, **kw)


@dataclass
class SimState:
    """Base state: the batch (positions, cell, numbers, masses...) being simulated.

    ``energy`` [S] eV, ``forces`` [N, 3] eV/Å and ``stress`` [S, 3, 3] eV/Å^3
    hold the last model evaluation at the current positions.
    """

    batch: Batch
    energy: torch.Tensor = system_field(default=None)
    forces: torch.Tensor = atom_field(default=None)
    stress: torch.Tensor = system_field(default=None)

    @property
    def n_systems(self) -> int:
        return self.batch.n_systems

    @property
    def n_atoms(self) -> int:
        return self.batch.n_atoms

    @property
    def positions(self) -> torch.Tensor:
        return self.batch.positions

    @property
    def cell(self) -> torch.Tensor:
        return self.batch.cell

    @property
    def system_index(self) -> torch.Tensor:
        return self.batch.system_index


def _per(f) -> str | None:
    return f.metadata.get(PER)


def select_systems[S: SimState](state: S, systems: Sequence[int] | torch.Tensor) -> S:
    """A new state holding only ``systems`` (in that order)."""
    idx = torch.as_tensor(systems, dtype=torch.long, device=state.batch.device)
    atoms = atom_indices(state.batch.offsets, idx)
    changes = {"batch": state.batch.select(idx)}
    for f in fields(state):
        value = getattr(state, f.name)
        if value is None or f.name == "batch":
            continue
        if _per(f) == "atom":
            changes[f.name] = value[atoms]
        elif _per(f) == "system":
            changes[f.name] = value[idx]
            size = f.metadata.get(SIZE)
            if size is not None and idx.numel():
                d = int(size(int(state.batch.atoms_per_system[idx].max())))
                changes[f.name] = changes[f.name][(slice(None),) + (slice(0, d),) * (value.dim() - 1)]  # type: ignore[index]
        elif _per(f) == "packed":
            changes[f.name] = value.select(idx)
    return replace(state, **changes)


def _zero_pad(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pad the trailing dims of ``values`` to the largest of each (leading dim unchanged)."""
    shape = [max(v.shape[k] for v in values) for k in range(1, values[0].dim())]
    out = []
    for v in values:
        if list(v.shape[1:]) != shape:
            padded = v.new_zeros((v.shape[0], *shape))
            padded[(slice(None),) + tuple(slice(0, n) for n in v.shape[1:])] = v
            v = padded
        out.append(v)
    return out


def concat_states[S: SimState](states: Sequence[S]) -> S:
    """Pack several states of the same type into one (systems in order)."""
    states = [s for s in states if s is not None and s.n_systems > 0]
    if len(states) == 1:
        return states[0]
    if not states:
        raise ValueError("nothing to concatenate")
    first = states[0]
    changes = {"batch": Batch.concatenate([s.batch for s in states])}
    for f in fields(first):
        if f.name == "batch" or _per(f) is None:
            continue
        values = [getattr(s, f.name) for s in states]
        if _per(f) == "packed" and any(v is not None for v in values):
            # a state without the field gets the type's neutral value (e.g. no constraints) for its systems
            kind = type(next(v for v in values if v is not None))
            values = [v if v is not None else kind.padding(s.batch.atoms_per_system.tolist(), s.batch.dtype,
                                                           s.batch.device) for v, s in zip(values, states)]
            changes[f.name] = kind.concat(values)
            continue
        if any(v is None for v in values):
            changes[f.name] = None  # type: ignore[assignment]
            continue
        if _per(f) == "atom":
            values = [v[: s.n_atoms] for v, s in zip(values, states)]
        if f.metadata.get(SIZE) is not None:
            values = _zero_pad(values)
        changes[f.name] = torch.cat(values)
    return replace(first, **changes)
