"""The one batched runner behind ``relax_many`` and ``run_md``: the loop, the step and the check.

::

    queue of InputItems ──admit──▶ padded state (A atoms, S slots + padding system) ◀── edge lists
          ▲                                 │  step × check_interval   (device only, static shapes,
          │ refill                          ▼                           zero host reads)
       results ◀──retire── check (host: one small status read; job hooks: frames, monitors,
                                  checkpoints; rebuild parked systems' edges; re-pack)

A **step** (:meth:`Runner.step_fn`) runs the registry entry's step on every slot with a force
function that masks the padded edge list at the cutoff and flags systems whose list may be
stale; afterwards a slot keeps its new state only if it was running and not stale — otherwise
the step is undone for it (``torch.where``) and, if stale, it is parked until the next check,
where its edges are rebuilt and it redoes the step. Per-step failure checks (non-finite
outputs, close contacts, volume blow-up) write a status code per slot on the device.

A **check** (every ``check_interval`` steps, host side) reads the per-slot status once, lets the
job (relax or MD front-end) write frames/run monitors/checkpoint, retires finished or failed
systems into results, admits queued structures into the free slots, re-packs when the slot set
changed, and rebuilds the edges of new and parked systems.

The concepts around this core, one module each: :mod:`.config` (settings and bookkeeping types),
:mod:`.hooks` (the job's and observers' hooks), :mod:`.slots` (padding, re-pack), :mod:`.model_call`
(the model adapter), :mod:`.failures` (device checks and messages), :mod:`.admission` (queue and
admission), :mod:`.verlet` (the edge-list policy) over :mod:`.edges` (the edge-list mechanism),
:mod:`.acceleration` (eager, compiled or captured steps), :mod:`.capacity` (the batch budget).

A system's trajectory is a function of its own inputs only: its edges are always its exact
neighbour list at the cutoff in canonical order, parking only delays it, and step counters,
thermostat chains and noise are per system — so results do not depend on batch-mates, refills,
the check interval or restarts (tests/runner/test_runner.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from geodite_sim.batch import Batch
from geodite_sim.io.structures import InputItem
from geodite_sim.model.geodite import Edges
from geodite_sim.runner.acceleration import Stepper, static_shapes
from geodite_sim.runner.admission import Admission
from geodite_sim.runner.config import AdmissionError, Capacity, CheckEvent, FailureChecks, SlotStatus, StepConfig
from geodite_sim.runner.edges import EdgeBuffer, padding_cell
from geodite_sim.runner.failures import Failures
from geodite_sim.runner.hooks import Job, as_observers
from geodite_sim.runner.model_call import ModelCall
from geodite_sim.runner.registry import Evaluation, Integrator
from geodite_sim.runner.slots import capacities, pad_state, repacked_status, unpad, where_state
from geodite_sim.runner.verlet import VerletPolicy
from geodite_sim.state import concat_states
from geodite_sim.status import Status


class Runner:
    """Drives one job (relax or MD front-end) over a stream of inputs; see the module docstring.

    Args:
        model: any model of the contract (docs/model-contract.md).
        integrator: the registry entry. settings: its run settings (dict of scalars).
        job: the front-end's hooks (:class:`~geodite_sim.runner.hooks.Job`).
        capacity: admission budget. config: engine settings. checks: per-step failure checks.
        admission_checks: checks of the initial evaluation (default ``checks``).
        observers: :class:`~geodite_sim.runner.hooks.Observer` objects (or any objects with some of their hooks).
    """

    def __init__(self, model, integrator: Integrator, settings: dict, job: Job, capacity: Capacity,
                 config: StepConfig | None = None, checks: FailureChecks | None = None, observers: Sequence = (),
                 admission_checks: FailureChecks | None = None):
        self.model = model
        self.entry = integrator
        self.settings = settings
        self.job = job
        self.config = config or StepConfig()
        self.checks = checks or FailureChecks()
        self.observers = as_observers(observers)
        self.dtype, self.device = model.dtype, torch.device(model.device)
        self.cutoff = float(model.cutoff)
        self.static_shapes = static_shapes(self.config, self.device)
        self.model_call = ModelCall(model, integrator.needs_stress, self.config.fused_kernels)
        self.failures = Failures(self.checks, admission_checks or self.checks, self.cutoff,
                                 self.config.neighbor_backend, self.dtype, self.device)
        self.verlet = VerletPolicy(self.config, self.cutoff, self.dtype, self.device, self.model_call.uses_edges,
                                   self.static_shapes, integrator.steps_taken)
        self.admission = Admission(job, integrator, settings, capacity, self.config.refill_fraction,
                                   self.model_call, self.failures, self.evaluate_compact)
        self.stepper = Stepper(self.step_fn, self.config, self.device, self.model_call)
        self.state: Any = None  # padded integrator state (a registry entry's state dataclass)
        self.slots: SlotStatus | None = None
        self.items: list[InputItem | None] = []  # per slot (host)
        self.iteration = 0
        self._since_check = 0
        self._vacant = 0  # atoms of vacated slots still in the batch (until the next re-pack)
        self._pad_cell = padding_cell(self.cutoff + self.config.skin, self.dtype, self.device)

    # ------------------------------------------------------------------ public views
    @property
    def edges(self) -> EdgeBuffer | None:
        """The (outer) edge buffer of the batch."""
        return self.verlet.edges

    @property
    def capacity(self) -> Capacity:
        return self.admission.capacity

    @property
    def queue(self) -> Iterator[InputItem]:
        return self.admission.queue

    @queue.setter
    def queue(self, items: Iterable[InputItem]) -> None:
        self.admission.queue = iter(items)

    @property
    def pending(self) -> InputItem | None:
        """An input taken from the queue that did not fit yet (it is admitted first)."""
        return self.admission.pending

    @property
    def freed(self) -> int:
        """Atoms retired since the last admission."""
        return self.admission.freed

    @property
    def exhausted(self) -> bool:
        return self.admission.exhausted

    @property
    def n_active(self) -> int:
        return sum(it is not None for it in self.items)

    def active_slots(self) -> list[int]:
        """Occupied slots, in order."""
        return [s for s, it in enumerate(self.items) if it is not None]

    def compact(self, slots: Sequence[int]):
        """The compact state of ``slots``."""
        return unpad(self.state, slots)

    def _atoms_in_use(self) -> int:
        return sum(len(it.atoms) for it in self.items if it is not None and it.atoms is not None)

    # ------------------------------------------------------------------ model call
    def evaluate(self, batch: Batch, edges: Edges | None) -> Evaluation:
        """The model on a padded batch (edges given) or, for models that build their own lists, on its real systems."""
        occupied = () if self.model_call.uses_edges else self.active_slots()
        return self.model_call.evaluate(batch, edges, occupied)

    def evaluate_compact(self, batch: Batch) -> Evaluation:
        """Model outputs of a compact batch, through the same padded path as a step (bitwise the same per system)."""
        return self.model_call.evaluate_compact(batch, self._pad_cell, self.cutoff, self.config.neighbor_backend)

    # ------------------------------------------------------------------ the step (device only)
    def step_fn(self, state, slots: SlotStatus, edges: EdgeBuffer):
        """One step of every running slot: ``(state, slots) -> (state, slots)``. No host reads, static shapes."""
        entry = self.entry
        steps0 = entry.steps_taken(state)
        running = slots.occupied & ~slots.parked & (slots.code == 0) & ~entry.finished(state) & (steps0 < slots.horizon)
        box = {}

        def force_fn(batch: Batch) -> Evaluation:
            sys_idx = batch.system_index
            box["stale"] = edges.stale(batch.positions, batch.cell, batch.pbc, sys_idx)
            used = edges.masked(batch.positions, batch.cell, sys_idx)
            box["edges"] = used
            # A system that blew up (non-finite coordinates) must not break its batch-mates' model call (a model
            # may check its inputs): its coordinates are zeroed for the call only; its state stays non-finite and
            # the failure check stops it. Its edges are all padding edges already (NaN lengths never pass).
            pos = batch.positions
            clean = batch.with_positions(torch.where(torch.isfinite(pos), pos, torch.zeros_like(pos)))
            return self.evaluate(clean, used)

        new = entry.step(replace(state), force_fn, self.settings)
        stale = box["stale"]
        accept = running & ~stale
        code, value = self.failures.on_device(new, box["edges"], slots.volume0, self.model_call.uses_edges)
        fresh_fail = accept & (code != 0)
        state = where_state(accept, new, state)
        slots = replace(
            slots,
            parked=slots.parked | (running & stale),
            code=torch.where(fresh_fail, code, slots.code),
            fail_step=torch.where(fresh_fail, entry.steps_taken(state), slots.fail_step),
            fail_value=torch.where(fresh_fail, value, slots.fail_value),
        )
        return state, slots

    def block_length(self) -> int:
        """Steps until the next check: ``check_interval``, or fewer when every running system reaches its horizon
        (frame boundary, last step) sooner (one small host read, at check time)."""
        interval = max(1, int(self.config.check_interval))
        if self.state is None or interval == 1:
            return interval
        k, slots = len(self.items), self.slots
        assert slots is not None
        left = (slots.horizon[:k] - self.entry.steps_taken(self.state)[:k])
        left = torch.where(slots.occupied[:k] & (left > 0), left, torch.full_like(left, interval))
        return max(1, min(interval, int(left.min())))

    def advance(self, n_steps: int) -> None:
        """``n_steps`` device steps of the whole batch (no host reads)."""
        step = self.stepper()
        state, slots = self.state, self.slots
        edges = self.verlet.step_edges
        for _ in range(n_steps):
            state, slots = step(state, slots, edges)
        self.state, self.slots = state, slots
        self.iteration += n_steps
        self._since_check += n_steps

    # ------------------------------------------------------------------ host side: the check
    def read_status(self) -> dict[str, np.ndarray]:
        """One device→host read of the per-slot status (occupied slots only)."""
        k = len(self.items)
        s = self.slots
        st = self.state
        assert s is not None and st is not None
        packed = torch.stack([s.code[:k], s.fail_step[:k], self.entry.finished(st)[:k].long(),
                              s.parked[:k].long(), self.entry.steps_taken(st)[:k]]).cpu().numpy()
        values = s.fail_value[:k].cpu().numpy()
        return {"code": packed[0], "fail_step": packed[1], "finished": packed[2].astype(bool),
                "parked": packed[3].astype(bool), "steps": packed[4], "fail_value": values}

    def _to_retire(self, host: dict) -> tuple[dict[int, tuple[Status | None, str | None]], list[int]]:
        """Slots to retire (with status and message; None: finished normally) and slots parked, from ``host``."""
        retire: dict[int, tuple[Status | None, str | None]] = {}
        parked: list[int] = []
        extra = self.job.at_check(self, host)
        for slot, item in enumerate(self.items):
            if item is None:
                continue
            code = int(host["code"][slot])
            if code != 0:
                one = unpad(self.state, [slot])
                retire[slot] = (Status.from_code(code), self.failures.describe(
                    code, float(host["fail_value"][slot]), int(host["fail_step"][slot]), one))
            elif slot in extra:
                retire[slot] = extra[slot]
            elif host["finished"][slot]:
                retire[slot] = (None, None)
            elif host["parked"][slot]:
                parked.append(slot)
        return retire, parked

    def check(self) -> list:
        """Host work between step blocks; returns the results retired or rejected here (in completion order)."""
        results: list = []
        retire: dict = {}
        parked: list[int] = []
        inner_parked: set[int] = set()  # input indices (two-level lists)
        grow: dict[int, float] = {}
        if self.state is not None and self.slots is not None and self.items:
            host = self.read_status()
            retire, parked = self._to_retire(host)
            parked, inner_parked, grow = self.verlet.plan(host, self.items, parked, retire, self.state,
                                                          self.slots.occupied)
            for slot, (status, message) in retire.items():
                item = self.items[slot]
                assert item is not None
                results.append(self.job.result(item, unpad(self.state, [slot]), status, message))
        n_sys, n_atoms = self.n_active, self._atoms_in_use()
        keep = [s for s, it in enumerate(self.items) if it is not None and s not in retire]
        retired_atoms = sum(len(self.items[s].atoms) for s in retire)
        for slot in retire:
            self.verlet.forget(self.items[slot].index)
            self.items[slot] = None
        in_use = n_atoms - retired_atoms
        started, new_states, admitted = self.admission.refill(in_use, len(keep), retired_atoms)
        results += admitted
        vacant = self._vacant + retired_atoms
        if started or self.state is None or not keep or (
                retire and vacant > self.config.vacant_fraction * (vacant + in_use)):
            self.verlet.grow_skin = {keep.index(s): v for s, v in grow.items()}
            self._repack(keep, started, new_states, parked)
        else:
            self.verlet.grow_skin = dict(grow)
            if retire:
                self.vacate(sorted(retire), retired_atoms)
            if parked:
                self._rebuild(parked)
        if self.verlet.two_level and self.state is not None and self.slots is not None:
            self.verlet.refresh_inner(self.state, self.items, inner_parked)
            self.slots = replace(self.slots, parked=torch.zeros_like(self.slots.parked))
        event = CheckEvent(self.iteration, self._since_check, n_sys, n_atoms, results)
        self._since_check = 0
        for obs in self.observers:
            obs.on_check(event)
        for res in results:
            for obs in self.observers:
                obs.on_result(res)
        return results

    def vacate(self, slots: list[int], n_atoms: int) -> None:
        """Retired ``slots`` leave without a re-pack: not occupied any more, edges dropped, atoms kept (vacant)."""
        assert self.slots is not None
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        occupied = self.slots.occupied.clone()
        occupied[idx] = False
        self.slots = replace(self.slots, occupied=occupied)
        self.verlet.drop(slots, self.state)
        self._vacant += n_atoms

    def _rebuild(self, parked: list[int]) -> None:
        """Rebuild the edges of parked systems in place (no re-pack) and let them run again."""
        self.verlet.rebuild(parked, self.state, self.items)
        assert self.slots is not None
        mask = self.slots.parked.clone()
        mask[torch.as_tensor(parked, dtype=torch.long, device=self.device)] = False
        self.slots = replace(self.slots, parked=mask)

    def _repack(self, keep: list[int], started: list[InputItem], new_states: list, parked: list[int],
                admitted: bool = True) -> None:
        """Rebuild the padded state: survivors (``keep``, in order) + newly started, edges of parked/new rebuilt.
        ``admitted=False``: the new systems are restored (a restart), not started: no ``on_admit``."""
        parts = ([unpad(self.state, keep)] if keep else []) + list(new_states)
        items = [self.items[s] for s in keep] + started
        if not parts:
            self.state, self.slots, self.items = None, None, []
            self.verlet.repacked(None, [], None, [], [])
            return
        compact = concat_states(parts) if len(parts) > 1 else parts[0]
        compact.batch = replace(compact.batch, atom_count=int(compact.batch.offsets[-1]))
        n, k = compact.batch.n_atoms, compact.batch.n_systems
        current = (self.state.batch.positions.shape[0] if self.state is not None else None,
                   len(self.items) if self.items else None)
        a_cap, s_cap = capacities(n, k, current, self.static_shapes)
        old_state = self.state
        state = pad_state(compact, a_cap, s_cap, self._pad_cell)
        # per-slot runner status: survivors keep theirs (parked ones are rebuilt now)
        self.slots = repacked_status(self.slots, keep, k, s_cap, state.batch.cell, self.dtype, self.device)
        self.items = items + [None] * (s_cap - len(items))
        self.state = state
        self._vacant = 0
        # edges: survivors that were not parked keep theirs (remapped); parked and new are rebuilt
        k_old, parked_set = len(keep), set(parked)
        rebuild_slots = [i for i, s in enumerate(keep) if s in parked_set] + list(range(k_old, k))
        self.verlet.repacked(old_state, keep, state, rebuild_slots, self.items)
        new_slots = list(range(k_old, k))
        self.slots.horizon = self.job.horizon(self, self.slots.horizon, new_slots)
        if started and admitted:
            self.job.on_admit(self, new_slots)

    def restore(self, items: list[InputItem], state, freed: int = 0) -> None:
        """Resume ``items`` from their checkpointed compact ``state`` (one system per item, in order).

        Everything else that feeds the arithmetic is rebuilt from scratch: the padded layout, the edge lists at the
        configured skin, and the Verlet policy's host state (margins, grown skins, build steps, vacant atoms);
        ``freed`` (atoms retired since the last admission) is the checkpoint's. The run that writes a checkpoint
        calls this too, so a restarted run continues bit for bit."""
        self.state, self.slots, self.items = None, None, []
        self.verlet.reset()
        self._vacant, self.admission.freed = 0, int(freed)
        state.batch = replace(state.batch, atom_count=int(state.batch.offsets[-1]))
        self._repack([], list(items), [state], [], admitted=False)

    # ------------------------------------------------------------------ the loop
    def run(self, items: Iterable[InputItem] | None = None) -> Iterator:
        """Results (completion order) of every input of ``items`` (None: the queue already set, e.g. a restart's).

        Fires the observers' ``on_start`` first and ``on_close`` last; after each check the job may ask for
        another check before the next steps (:meth:`~geodite_sim.runner.hooks.Job.after_check`)."""
        if items is not None:
            self.queue = items
        try:
            for obs in self.observers:
                obs.on_start(self)
            while True:
                yield from self.check()
                if self.job.after_check(self):
                    continue
                if self.state is None:
                    if self.exhausted:
                        break
                    continue
                self.advance(self.block_length())
            self.job.on_finish(self)
        finally:
            for obs in self.observers:
                obs.on_close()


__all__ = ["AdmissionError", "Capacity", "CheckEvent", "FailureChecks", "Runner", "SlotStatus", "StepConfig"]
