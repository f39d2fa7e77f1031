"""Admission: the runner's input queue and the start of new systems.

At a check, queued structures that fit the :class:`~geodite_sim.runner.config.Capacity` are started together:
the job's per-structure settings, one model evaluation (through the same padded path as a step), the registry
entry's ``init`` and the admission failure checks. A group whose settings or evaluation raise is started one by
one to find the culprit, which gets a result of its own; the others start. Refills wait until the systems retired
since the last admission free :attr:`~geodite_sim.runner.config.StepConfig.refill_fraction` of the batch (an
admission is a model evaluation of its own).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from geodite_sim.batch import Batch
from geodite_sim.io.structures import InputItem
from geodite_sim.runner.config import AdmissionError, Capacity
from geodite_sim.runner.failures import Failures
from geodite_sim.runner.hooks import Job
from geodite_sim.runner.model_call import ModelCall
from geodite_sim.runner.registry import Integrator
from geodite_sim.state import select_systems
from geodite_sim.status import Status

log = logging.getLogger(__name__)


class Admission:
    """The queue of inputs and the admission of new systems (see the module docstring).

    Attributes:
        queue: the input iterator. pending: an item taken from the queue that did not fit (admitted first next
            time). freed: atoms retired since the last admission (part of an MD checkpoint).
    """

    def __init__(self, job: Job, entry: Integrator, settings: dict, capacity: Capacity, refill_fraction: float,
                 model_call: ModelCall, failures: Failures, evaluate_compact):
        self.job, self.entry, self.settings, self.capacity = job, entry, settings, capacity
        self.refill_fraction = refill_fraction
        self.model_call, self.failures, self.evaluate_compact = model_call, failures, evaluate_compact
        self.queue: Iterator[InputItem] = iter(())
        self.pending: InputItem | None = None
        self.freed = 0
        self._exhausted = False

    @property
    def exhausted(self) -> bool:
        """Every input has been taken from the queue."""
        return self._exhausted and self.pending is None

    def _next_item(self) -> InputItem | None:
        if self.pending is not None:
            item, self.pending = self.pending, None
            return item
        if self._exhausted:
            return None
        try:
            return next(self.queue)
        except StopIteration:
            self._exhausted = True
            return None

    def refill(self, n_atoms: int, n_systems: int, retired_atoms: int) -> tuple[list[InputItem], list, list]:
        """Admit queued structures into a batch with ``n_atoms`` atoms of ``n_systems`` running systems, once
        enough atoms are free (``retired_atoms``: retired at this check). Returns (started items, their compact
        states, results of inputs rejected or failed at admission)."""
        self.freed += retired_atoms
        if n_systems and self.freed < self.refill_fraction * (n_atoms + self.freed):
            return [], [], []
        results: list = []
        new_items, rejected = self._take_new(n_atoms, n_systems)
        results += rejected
        started, new_states, failed = self.admit(new_items)
        results += failed
        # a failed admission frees its budget: take more from the queue until nothing new fits
        while failed and not self.exhausted:
            more, rejected = self._take_new(n_atoms, n_systems)
            results += rejected
            if not more:
                break
            s2, st2, failed = self.admit(more)
            started += s2
            new_states += st2
            results += failed
        if new_items:
            self.freed = 0
        return started, new_states, results

    def _take_new(self, n_atoms: int, n_sys: int) -> tuple[list[InputItem], list]:
        """Queued items that fit (admitted), and results of those rejected."""
        new, rejected = [], []
        while True:
            item = self._next_item()
            if item is None:
                break
            if item.atoms is None or item.error is not None:
                rejected.append(self.job.rejected(item, getattr(item, "status", None) or Status.UNREADABLE,
                                                  item.error or "could not be read"))
                continue
            if not self.capacity.fits(n_atoms, n_sys, len(item.atoms)):
                self.pending = item
                break
            new.append(item)
            n_atoms += len(item.atoms)
            n_sys += 1
        return new, rejected

    def admit(self, items: list[InputItem]) -> tuple[list[InputItem], list, list]:
        """Start ``items``: per-structure settings, initial evaluation, integrator init, step-0 checks.

        Returns (started items, their compact states, results of those that failed to start). A structure
        whose settings or initial evaluation fails is started alone to find the culprit.
        """
        if not items:
            return [], [], []
        try:
            return self._admit_group(items)
        except Exception as exc:
            if len(items) == 1:
                item = items[0]
                if isinstance(exc, AdmissionError):
                    return [], [], [self.job.rejected(item, exc.status, str(exc))]
                return [], [], [self.job.rejected(item, Status.MODEL_ERROR if not isinstance(exc, ValueError)
                                                  else Status.INVALID_SETTINGS, f"{type(exc).__name__}: {exc}")]
            log.info("admission of %d structures raised (%s); starting them one by one", len(items), exc)
        started, states, failed = [], [], []
        for item in items:
            s_items, s_states, s_failed = self.admit([item])
            started += s_items
            states += s_states
            failed += s_failed
        return started, states, failed

    def _admit_group(self, items: list[InputItem]):
        per_system = self.job.per_system(items)
        mc = self.model_call
        batch = Batch.from_atoms([it.atoms for it in items], dtype=mc.dtype, device=mc.device)
        ev = self.evaluate_compact(batch)
        state = self.entry.init(batch, ev, per_system, self.settings)
        code, value = self.failures.initial(state, mc.uses_edges)
        code_h, value_h = code.cpu().numpy(), value.cpu().numpy()
        # a relaxation converged at the start is finished before any step (MD writes its step-0 frame first)
        done_h = self.entry.finished(state).cpu().numpy() & (self.entry.kind == "relax")
        started, states, failed = [], [], []
        for i, item in enumerate(items):
            if code_h[i] != 0:
                one = select_systems(state, [i])
                failed.append(self.job.result(item, one, Status.from_code(int(code_h[i])),
                                              self.failures.describe(int(code_h[i]), float(value_h[i]), 0, one)))
            elif done_h[i]:
                failed.append(self.job.result(item, select_systems(state, [i]), None, None))
            else:
                started.append(item)
                states.append(i)
        return started, ([select_systems(state, states)] if states else []), failed


__all__ = ["Admission"]
