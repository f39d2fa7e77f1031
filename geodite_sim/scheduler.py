"""Continuous batching: keep the device full by refilling finished systems' places from a queue.

The scheduler pulls inputs lazily from an iterator of :class:`InputItem`,
starts as many as fit into an atom budget (``max_atoms``), and, whenever the
driver retires finished systems, removes them from the packed state and appends
new ones. Items that failed to load are passed straight through as failures, so
that every input produces exactly one result.

Re-packing (a gather of the surviving systems plus a concatenation of the new
ones) costs O(N) memory traffic once per retire event, negligible next to a
model evaluation; keeping atoms contiguous avoids holes in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from geodite_sim.io.structures import InputItem
from geodite_sim.state import SimState, concat_states, select_systems


@dataclass
class Capacity:
    """Limits of one packed batch: total atoms and (optionally) systems."""

    max_atoms: int = 2048
    max_systems: int | None = None

    def fits(self, n_atoms: int, n_systems: int, extra_atoms: int) -> bool:
        if self.max_systems is not None and n_systems + 1 > self.max_systems:
            return False
        # A structure larger than the whole budget still runs (alone) rather than failing.
        return n_atoms == 0 or n_atoms + extra_atoms <= self.max_atoms


@dataclass
class Scheduler:
    """Owns the queue, the packed state and the item of each active system.

    Args:
        items: lazy iterator of inputs (consumed one at a time).
        capacity: atom/system budget of the packed batch.
        init_state: builds the integrator state of a list of new (valid) items.
    """

    items: Iterator[InputItem]
    capacity: Capacity
    init_state: Callable[[list[InputItem]], SimState]
    active: list[InputItem] = field(default_factory=list)
    state: SimState | None = None
    failed_on_load: list[InputItem] = field(default_factory=list)
    _pending: InputItem | None = None
    _exhausted: bool = False
    n_started: int = 0

    def _next_item(self) -> InputItem | None:
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        if self._exhausted:
            return None
        try:
            return next(self.items)
        except StopIteration:
            self._exhausted = True
            return None

    @property
    def done(self) -> bool:
        """True when no system is active and the queue is empty."""
        return not self.active and self._exhausted and self._pending is None

    def refill(self) -> list[InputItem]:
        """Append queued systems while they fit; return items that failed to load (to report)."""
        n_atoms = self.state.n_atoms if self.state is not None else 0
        n_sys = len(self.active)
        new: list[InputItem] = []
        failed: list[InputItem] = []
        while True:
            item = self._next_item()
            if item is None:
                break
            if item.atoms is None:
                failed.append(item)
                continue
            if not self.capacity.fits(n_atoms, n_sys, len(item.atoms)):
                self._pending = item
                break
            new.append(item)
            n_atoms += len(item.atoms)
            n_sys += 1
        if new:
            try:
                added = self.init_state(new)
            except Exception:
                # One bad structure must not sink its batch-mates: start them one by one.
                added_states = []
                ok_items = []
                for item in new:
                    try:
                        added_states.append(self.init_state([item]))
                        ok_items.append(item)
                    except Exception as exc:  # reported as this item's error
                        item.error = f"{type(exc).__name__}: {exc}"
                        failed.append(item)
                new = ok_items
                added = concat_states(added_states) if added_states else None
            if added is not None:
                self.state = added if self.state is None else concat_states([self.state, added])
                self.active.extend(new)
                self.n_started += len(new)
        return failed

    def retire(self, finished: torch.Tensor) -> list[tuple[InputItem, SimState]]:
        """Remove systems where ``finished`` [S] is True; return (item, one-system state) pairs."""
        idx = torch.nonzero(finished).squeeze(1).tolist()
        if not idx:
            return []
        out = [(self.active[i], select_systems(self.state, [i])) for i in idx]
        keep = [i for i in range(len(self.active)) if i not in set(idx)]
        self.active = [self.active[i] for i in keep]
        self.state = select_systems(self.state, keep) if keep else None
        return out
