"""The one batched runner behind ``relax_many`` and ``run_md``.

::

    queue of InputItems ──admit──▶ padded state (A atoms, S slots + padding system) ◀── EdgeBuffer
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

A system's trajectory is a function of its own inputs only: its edges are always its exact
neighbour list at the cutoff in canonical order, parking only delays it, and step counters,
thermostat chains and noise are per system — so results do not depend on batch-mates, refills,
the check interval or restarts (tests/test_runner.py).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from ase.data import covalent_radii

from geodite_sim.batch import Batch
from geodite_sim.io.structures import InputItem
from geodite_sim.model.contract import uses_edges
from geodite_sim.model.geodite import Edges
from geodite_sim.model.strain import cell_volumes
from geodite_sim.runner.edges import EdgeBuffer, drop, inner, make_buffer, padding_cell, rebuild, remap
from geodite_sim.runner.registry import Evaluation, Integrator
from geodite_sim.state import PER, concat_states, select_systems
from geodite_sim.status import Status

log = logging.getLogger(__name__)

#: Atomic number of padding atoms (their energies are dropped).
PAD_Z = 1
#: Smallest capacities (atoms incl. one padding atom, system slots).
MIN_ATOMS, MIN_SLOTS = 16, 2
#: Two-level edge lists: smallest inner margin (Å) and the multiple of a system's last step it gets.
INNER_MIN_MARGIN, INNER_PACE_FACTOR = 0.05, 3.0


class AdmissionError(ValueError):
    """A structure that cannot start for a reason with its own status (raised by a job's ``per_system``)."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Capacity:
    """Admission budget of one packed batch: total real atoms and (optionally) systems.

    A structure larger than ``max_atoms`` still runs, alone.
    """

    max_atoms: int = 2048
    max_systems: int | None = None

    def fits(self, n_atoms: int, n_systems: int, extra_atoms: int) -> bool:
        if self.max_systems is not None and n_systems + 1 > self.max_systems:
            return False
        return n_atoms == 0 or n_atoms + extra_atoms <= self.max_atoms


@dataclass
class StepConfig:
    """Engine settings of a run (never stored on the model).

    Attributes:
        neighbor_backend: ``"auto"``, ``"triton"``, ``"alchemiops"`` or ``"torch"`` (builds at checks).
        skin: Verlet skin, Å (edges are built at cutoff + skin).
        check_interval: steps between checks (host reads); results do not depend on it.
        accelerate: ``"auto"`` (CUDA graph of the whole step on CUDA, eager elsewhere), ``"off"``/``"eager"``,
            ``"compile"`` (``torch.compile(fullgraph=True)`` of the step) or ``"cuda_graph"``.
        fused_kernels: Geodite's fused CPU edge kernels: ``"auto"`` or False (compile needs False).
        compile_options: extra ``torch.compile`` arguments in ``"compile"`` mode (e.g. ``{"backend": "aot_eager"}``).
        rebuild_every_check: rebuild every system's edges at every check (protocols that ask for a neighbour list
            rebuilt every step use this with ``check_interval=1``).
        inner_skin: two-level edge lists (``"auto"``: on when the step is neither compiled nor captured, a check
            comes every step and ``skin`` ≥ 0.3 Å, with 0.1 Å; a float: on, with that start margin, Å; None: off).
            The edges built by a neighbour search at ``cutoff + skin`` (the outer list) are filtered at every
            check, without a search, into the list the steps use: the pairs now within ``cutoff + m_s``, with a
            per-system margin ``m_s`` of :data:`INNER_PACE_FACTOR` × the system's pace per step × the check
            interval (at least :data:`INNER_MIN_MARGIN`; doubled for a parked one), so the model sees few shell
            edges while the outer list is rebuilt only when it can no longer supply ``m_s``. Trajectories do not
            depend on it (docs/runner.md).
        refill_fraction: admit queued structures at a check only once the systems retired since the last
            admission hold at least this fraction of the batch's atoms (or nothing runs): an admission is a model
            evaluation of its own, whose fixed cost does not shrink with the number of structures it starts.
        vacant_fraction: systems that retire at a check with nothing to admit leave their atoms in the batch
            (their slots vacated, their edges dropped: no model work on edges) until such vacant atoms would
            exceed this fraction of the batch's atoms; only then is the batch re-packed.
    """

    neighbor_backend: str = "auto"
    skin: float = 0.5
    check_interval: int = 1
    accelerate: str = "auto"
    fused_kernels: bool | str = "auto"
    compile_options: dict = field(default_factory=dict)
    rebuild_every_check: bool = False
    inner_skin: float | str | None = "auto"
    refill_fraction: float = 0.125
    vacant_fraction: float = 0.125


@dataclass
class FailureChecks:
    """Per-step device checks (None switches one off): non-finite outputs always; ``min_distance_factor``:
    two atoms closer than this × their covalent-radius sum; ``max_volume_ratio``: a cell-relaxing system whose
    volume leaves [V0 / r, r · V0]."""

    min_distance_factor: float | None = None
    max_volume_ratio: float | None = None


@dataclass
class SlotStatus:
    """Runner bookkeeping per slot ([S + 1]: the last row is the padding system), on the device.

    occupied: slot holds a system. parked: waits for an edge rebuild at the next check.
    code: 0 or a :class:`~geodite_sim.status.Status` device code. fail_step: the system's step at failure.
    fail_value: the offending value (distance ratio, volume ratio). horizon: steps a system may reach before
    the next check (frames, targets). volume0: cell volume at admission, Å³.
    """

    occupied: torch.Tensor
    parked: torch.Tensor
    code: torch.Tensor
    fail_step: torch.Tensor
    fail_value: torch.Tensor
    horizon: torch.Tensor
    volume0: torch.Tensor


@dataclass
class CheckEvent:
    """What observers see at a check: ``steps`` engine steps since the previous check, ``iteration`` in all,
    ``n_systems`` / ``n_atoms`` active during them, ``finished`` results retired at this check."""

    iteration: int
    steps: int
    n_systems: int
    n_atoms: int
    finished: list = field(default_factory=list)


def _where_state(keep: torch.Tensor, new, old):
    """Field by field: ``new`` where ``keep`` [S] (per-atom fields by their system), else ``old``."""
    sys_idx = old.batch.system_index
    keep_atom = keep[sys_idx]
    changes = {}
    for f in fields(old):
        if f.name == "batch":
            continue
        a, b = getattr(new, f.name), getattr(old, f.name)
        if a is None or b is None or a is b:
            changes[f.name] = a
            continue
        per = f.metadata.get(PER)
        if per == "packed":  # constant during a step
            changes[f.name] = b
            continue
        mask = keep_atom if per == "atom" else keep
        changes[f.name] = torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)
    nb, ob = new.batch, old.batch
    batch = ob.with_positions(torch.where(keep_atom[:, None], nb.positions, ob.positions),
                              torch.where(keep[:, None, None], nb.cell, ob.cell))
    return replace(old, batch=batch, **changes)


def _pad_state(state, n_atoms_cap: int, n_slots: int, pad_cell: torch.Tensor):
    """A compact state (k systems, n atoms) padded to ``n_atoms_cap`` atoms and ``n_slots`` slots + 1 padding system.

    Empty slots hold 0 atoms; padding atoms (``n_atoms_cap - n`` ≥ 1, at the end) belong to the padding system
    (index ``n_slots``). Per-system fields of empty/padding rows copy row 0 (finite, valid values); per-atom
    fields of padding atoms are 0 (masses 1, Z = :data:`PAD_Z`).
    """
    b = state.batch
    k, n = b.n_systems, b.n_atoms
    n_pad, s_pad = n_atoms_cap - n, n_slots + 1 - k
    dev, dt = b.device, b.dtype
    counts = torch.cat([b.atoms_per_system, torch.zeros(s_pad - 1, dtype=torch.long, device=dev),
                        torch.tensor([n_pad], dtype=torch.long, device=dev)])
    offsets = torch.zeros(n_slots + 2, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    rows = torch.zeros(s_pad, dtype=torch.long, device=dev)
    cell = torch.cat([b.cell, b.cell[rows]])
    cell[-1] = pad_cell
    pbc = torch.cat([b.pbc, torch.zeros(s_pad, 3, dtype=torch.bool, device=dev)])
    batch = Batch(
        positions=torch.cat([b.positions[:n], torch.zeros(n_pad, 3, dtype=dt, device=dev)]),
        numbers=torch.cat([b.numbers[:n], torch.full((n_pad,), PAD_Z, dtype=torch.long, device=dev)]),
        cell=cell, pbc=pbc,
        system_index=torch.cat([b.system_index[:n], torch.full((n_pad,), n_slots, dtype=torch.long, device=dev)]),
        offsets=offsets,
        masses=torch.cat([b.masses[:n], torch.ones(n_pad, dtype=dt, device=dev)]),
        atom_count=n_atoms_cap,
    )
    changes = {}
    for f in fields(state):
        if f.name == "batch":
            continue
        v = getattr(state, f.name)
        per = f.metadata.get(PER)
        if v is None or per is None:
            changes[f.name] = v
        elif per == "atom":
            changes[f.name] = torch.cat([v[:n], v.new_zeros((n_pad,) + v.shape[1:])])
        elif per == "packed":
            pad_counts = [0] * (s_pad - 1) + [n_pad]
            changes[f.name] = type(v).concat([v, type(v).padding(pad_counts, dt, dev)])
        else:
            pad = v[rows].clone()
            if f.name == "relax_cell":
                pad[:] = False
            changes[f.name] = torch.cat([v, pad])
    return replace(state, batch=batch, **changes)


def _unpad(state, slots: Sequence[int]):
    """The compact state of ``slots`` (host-side gather; used at checks)."""
    out = select_systems(state, list(slots))
    out.batch = replace(out.batch, atom_count=None)
    out.batch = replace(out.batch, atom_count=out.batch.n_atoms)
    return out


class Runner:
    """Drives one job (relax or MD front-end) over a stream of inputs; see the module docstring.

    Args:
        model: any model of the contract (docs/model-contract.md).
        integrator: the registry entry. settings: its run settings (dict of scalars).
        job: the front-end's hooks (``per_system``, ``result``, ``rejected``, optional ``on_admit``,
            ``at_check``, ``horizon``).
        capacity: admission budget. config: engine settings. checks: per-step failure checks.
        admission_checks: checks of the initial evaluation (default ``checks``).
        observers: objects with optional ``on_check(CheckEvent)``, ``on_result(result)``, ``on_close()``.
    """

    def __init__(self, model, integrator: Integrator, settings: dict, job, capacity: Capacity,
                 config: StepConfig | None = None, checks: FailureChecks | None = None, observers: Sequence = (),
                 admission_checks: FailureChecks | None = None):
        self.model = model
        self.entry = integrator
        self.settings = settings
        self.job = job
        self.capacity = capacity
        self.config = config or StepConfig()
        self.checks = checks or FailureChecks()
        self.admission_checks = admission_checks or self.checks
        self.observers = list(observers)
        self.dtype, self.device = model.dtype, torch.device(model.device)
        self.cutoff = float(model.cutoff)
        self.uses_edges = uses_edges(model)
        self.state = None  # padded integrator state
        self.slots: SlotStatus | None = None
        self.edges: EdgeBuffer | None = None
        self.items: list[InputItem | None] = []  # per slot (host)
        self.iteration = 0
        self._since_check = 0
        self._pending: InputItem | None = None
        self._exhausted = False
        self.queue: Iterator[InputItem] = iter(())
        self.radii = torch.as_tensor(covalent_radii, dtype=self.dtype, device=self.device)
        self._pad_cell = padding_cell(self.cutoff + self.config.skin, self.dtype, self.device)
        self._model_kwargs = self._model_call_kwargs(model, self.config)
        self._compiled = None
        self._grow_skin: dict[int, float] = {}  # new slot -> skin for the next build
        self._built_at: dict[int, int] = {}  # input index -> its steps at its last edge build
        self._vacant = 0  # atoms of vacated slots still in the batch (until the next re-pack)
        self._inner: EdgeBuffer | None = None  # two-level lists: the steps' list, filtered from self.edges
        self._margin: dict[int, float] = {}  # input index -> its inner margin, Å
        self._outer_bound: dict[int, tuple] = {}  # input index -> (outer staleness bound, steps) at the last check
        self._freed = 0  # atoms retired since the last admission
        self.max_skin = 4.0 * self.cutoff

    # ------------------------------------------------------------------ model call
    @staticmethod
    def _model_call_kwargs(model, config: StepConfig) -> dict:
        """Keyword arguments for the model's call: skip its host-side input checks (admission validated the
        structures) and pass the engine's fused-kernel choice, where its signature has them."""
        try:
            params = inspect.signature(model.forward if hasattr(model, "forward") else model).parameters
        except (TypeError, ValueError):
            return {}
        kwargs = {}
        if "check" in params:
            kwargs["check"] = False
        if "fused" in params and config.fused_kernels is False:
            kwargs["fused"] = False
        return kwargs

    def evaluate(self, batch: Batch, edges: Edges | None) -> Evaluation:
        """The model on a padded batch (edges given) or, for models that build their own lists, on its real systems."""
        need_stress = self.entry.needs_stress
        if self.uses_edges:
            out = self.model(batch, edges=edges, compute_forces=True, compute_stress=need_stress,
                             **self._model_kwargs)
            stress = out.get("stress")
            return Evaluation(out["energy"], out["forces"],
                              stress if stress is not None else torch.zeros_like(batch.cell))
        occupied = [s for s, it in enumerate(self.items) if it is not None] if self.items else []
        energy = torch.zeros(batch.n_systems, dtype=self.dtype, device=self.device)
        forces = torch.zeros_like(batch.positions)
        stress = torch.zeros_like(batch.cell)
        if occupied:
            sub = batch.select(occupied)
            out = self.model(sub, compute_forces=True, compute_stress=need_stress)
            from geodite_sim.batch import atom_indices

            idx = torch.as_tensor(occupied, device=self.device)
            energy[idx] = out["energy"]
            forces[atom_indices(batch.offsets, idx)] = out["forces"]
            if out.get("stress") is not None:
                stress[idx] = out["stress"]
        return Evaluation(energy, forces, stress)

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
        code, value = self._failures(new, box["edges"], slots)
        fresh_fail = accept & (code != 0)
        state = _where_state(accept, new, state)
        slots = replace(
            slots,
            parked=slots.parked | (running & stale),
            code=torch.where(fresh_fail, code, slots.code),
            fail_step=torch.where(fresh_fail, entry.steps_taken(state), slots.fail_step),
            fail_value=torch.where(fresh_fail, value, slots.fail_value),
        )
        return state, slots

    def _failures(self, state, edges: Edges, slots: SlotStatus) -> tuple[torch.Tensor, torch.Tensor]:
        """[S] device failure codes and values of an evaluated state (non-finite, contact, volume)."""
        b = state.batch
        sys_idx, n_sys = b.system_index, b.cell.shape[0]
        code = torch.zeros(n_sys, dtype=torch.long, device=self.device)
        value = torch.zeros(n_sys, dtype=self.dtype, device=self.device)
        r = self.checks.max_volume_ratio
        if r is not None and hasattr(state, "relax_cell"):
            ratio = cell_volumes(b.cell) / slots.volume0
            bad = state.relax_cell & ((ratio > r) | (ratio < 1.0 / r) | ~torch.isfinite(ratio))
            code = torch.where(bad, Status.VOLUME.code, code)
            value = torch.where(bad, ratio, value)
        f = self.checks.min_distance_factor
        if f is not None and self.uses_edges:
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

    def _stepper(self) -> Callable:
        mode = self.config.accelerate
        if mode in ("auto", "off", "eager") or not self.uses_edges:
            if mode == "auto" and self.device.type == "cuda" and self.uses_edges:
                return self._graph_stepper()
            return self.step_fn
        if mode == "compile":
            if self._compiled is None:
                if "fused" in self._model_call_kwargs(self.model, StepConfig()) or self._has_fused_param():
                    self._model_kwargs["fused"] = False  # the fused C++ kernels are opaque to the compiler
                torch._dynamo.config.trace_autograd_ops = True
                # one compiled entry per runner and per capacity bucket: the step's code object is shared by every
                # Runner of the process, so dynamo's default limit (8) would end the 9th run with fullgraph=True
                cfg = torch._dynamo.config
                cfg.recompile_limit = max(int(cfg.recompile_limit), 256)
                if hasattr(cfg, "accumulated_recompile_limit"):
                    cfg.accumulated_recompile_limit = max(int(cfg.accumulated_recompile_limit), 4096)
                self._compiled = torch.compile(self.step_fn, **{"fullgraph": True, "dynamic": False,
                                                                **self.config.compile_options})
            return self._compiled
        if mode == "cuda_graph":
            if self.device.type != "cuda":
                raise ValueError("accelerate='cuda_graph' needs a CUDA device; use 'compile' or 'eager' on the CPU")
            return self._graph_stepper()
        raise ValueError(f"unknown accelerate mode {mode!r}; choose from auto, off, eager, compile, cuda_graph")

    def _has_fused_param(self) -> bool:
        try:
            return "fused" in inspect.signature(self.model.forward).parameters
        except (AttributeError, TypeError, ValueError):
            return False

    def _graph_stepper(self) -> Callable:
        from geodite_sim.runner.capture import GraphStep

        if not isinstance(self._compiled, GraphStep):
            self._compiled = GraphStep(self.step_fn)
        return self._compiled

    def block_length(self) -> int:
        """Steps until the next check: ``check_interval``, or fewer when every running system reaches its horizon
        (frame boundary, last step) sooner (one small host read, at check time)."""
        interval = max(1, int(self.config.check_interval))
        if self.state is None or interval == 1:
            return interval
        k = len(self.items)
        left = (self.slots.horizon[:k] - self.entry.steps_taken(self.state)[:k])
        left = torch.where(self.slots.occupied[:k] & (left > 0), left, torch.full_like(left, interval))
        return max(1, min(interval, int(left.min())))

    @property
    def static_shapes(self) -> bool:
        """Whether the step is compiled or captured (then capacities keep headroom so shapes rarely change)."""
        mode = self.config.accelerate
        return mode in ("compile", "cuda_graph") or (mode == "auto" and self.device.type == "cuda")

    @property
    def two_level(self) -> bool:
        """Whether the steps use an inner list filtered from the outer one at each check
        (:attr:`StepConfig.inner_skin`)."""
        c = self.config
        if c.inner_skin is None or c.rebuild_every_check or not self.uses_edges:
            return False
        return c.inner_skin != "auto" or (c.skin >= 0.3 and c.check_interval == 1 and not self.static_shapes)

    @property
    def _start_margin(self) -> float:
        value = self.config.inner_skin
        return 0.1 if value == "auto" else float(value)

    def advance(self, n_steps: int) -> None:
        """``n_steps`` device steps of the whole batch (no host reads)."""
        step = self._stepper()
        state, slots = self.state, self.slots
        edges = self._inner if self.two_level and self._inner is not None else self.edges
        for _ in range(n_steps):
            state, slots = step(state, slots, edges)
        self.state, self.slots = state, slots
        self.iteration += n_steps
        self._since_check += n_steps

    # ------------------------------------------------------------------ host side: admission
    def _next_item(self) -> InputItem | None:
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        if self._exhausted:
            return None
        try:
            return next(self.queue)
        except StopIteration:
            self._exhausted = True
            return None

    def restore(self, items: list[InputItem], state, freed: int = 0) -> None:
        """Resume ``items`` from their checkpointed compact ``state`` (one system per item, in order).

        Everything else that feeds the arithmetic is rebuilt from scratch: the padded layout, the edge lists at the
        configured skin, and the Verlet policy's host state (margins, grown skins, build steps, vacant atoms);
        ``freed`` (atoms retired since the last admission) is the checkpoint's. The run that writes a checkpoint
        calls this too, so a restarted run continues bit for bit."""
        self.state, self.slots, self.edges, self._inner, self.items = None, None, None, None, []
        self._built_at, self._margin, self._outer_bound, self._grow_skin = {}, {}, {}, {}
        self._vacant, self._freed = 0, int(freed)
        state.batch = replace(state.batch, atom_count=int(state.batch.offsets[-1]))
        self._repack([], list(items), [state], [], admitted=False)

    @property
    def exhausted(self) -> bool:
        return self._exhausted and self._pending is None

    @property
    def n_active(self) -> int:
        return sum(it is not None for it in self.items)

    def _atoms_in_use(self) -> int:
        return sum(len(it.atoms) for it in self.items if it is not None)

    def _take_new(self) -> tuple[list[InputItem], list]:
        """Queued items that fit (admitted), and results of those rejected."""
        new, rejected = [], []
        n_atoms, n_sys = self._atoms_in_use(), self.n_active
        while True:
            item = self._next_item()
            if item is None:
                break
            if item.atoms is None or item.error is not None:
                rejected.append(self.job.rejected(item, getattr(item, "status", None) or Status.UNREADABLE,
                                                  item.error or "could not be read"))
                continue
            if not self.capacity.fits(n_atoms, n_sys, len(item.atoms)):
                self._pending = item
                break
            new.append(item)
            n_atoms += len(item.atoms)
            n_sys += 1
        return new, rejected

    def evaluate_compact(self, batch: Batch) -> Evaluation:
        """Model outputs of a compact batch, through the same padded path as a step (bitwise the same per system)."""
        n = batch.n_atoms
        padded = _pad_state(_Bare(batch=batch), n + 1, batch.n_systems, self._pad_cell).batch
        real = torch.arange(batch.n_systems, device=self.device)
        buf = make_buffer(padded, real, self.cutoff, 0.0, self.config.neighbor_backend, static=False)
        edges = buf.masked(padded.positions, padded.cell, padded.system_index) if self.uses_edges else None
        saved, self.items = self.items, list(range(batch.n_systems))  # evaluate() needs the occupied slots
        try:
            ev = self.evaluate(padded, edges)
        finally:
            self.items = saved
        k = batch.n_systems
        return Evaluation(ev.energy[:k], ev.forces[:n], ev.stress[:k])

    def _admit(self, items: list[InputItem]) -> tuple[list[InputItem], list, list]:
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
            s_items, s_states, s_failed = self._admit([item])
            started += s_items
            states += s_states
            failed += s_failed
        return started, states, failed

    def _admit_group(self, items: list[InputItem]):
        per_system = self.job.per_system(items)
        batch = Batch.from_atoms([it.atoms for it in items], dtype=self.dtype, device=self.device)
        ev = self.evaluate_compact(batch)
        state = self.entry.init(batch, ev, per_system, self.settings)
        code, value = self._initial_failures(state)
        code_h, value_h = code.cpu().numpy(), value.cpu().numpy()
        # a relaxation converged at the start is finished before any step (MD writes its step-0 frame first)
        done_h = self.entry.finished(state).cpu().numpy() & (self.entry.kind == "relax")
        started, states, failed = [], [], []
        for i, item in enumerate(items):
            if code_h[i] != 0:
                one = select_systems(state, [i])
                failed.append(self.job.result(item, one, Status.from_code(int(code_h[i])),
                                              self.describe(int(code_h[i]), float(value_h[i]), 0, one)))
            elif done_h[i]:
                failed.append(self.job.result(item, select_systems(state, [i]), None, None))
            else:
                started.append(item)
                states.append(i)
        return started, ([select_systems(state, states)] if states else []), failed

    def _initial_failures(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        n = state.batch.n_systems
        slots = SlotStatus(*(torch.zeros(n, dtype=torch.bool, device=self.device) for _ in range(2)),
                           torch.zeros(n, dtype=torch.long, device=self.device),
                           torch.zeros(n, dtype=torch.long, device=self.device),
                           torch.zeros(n, dtype=self.dtype, device=self.device),
                           torch.zeros(n, dtype=torch.long, device=self.device),
                           cell_volumes(state.batch.cell))
        from geodite_sim.neighbors import neighbor_list

        checks = self.admission_checks
        edges = neighbor_list(state.batch, self.cutoff, "torch" if not self.uses_edges else
                              self.config.neighbor_backend) if checks.min_distance_factor is not None else None
        if edges is None:
            edges = Edges(*(torch.zeros(0, dtype=torch.long, device=self.device) for _ in range(2)),
                          torch.zeros(0, 3, dtype=self.dtype, device=self.device))
        edges = Edges(edges.sender, edges.receiver, edges.shifts.to(self.dtype))
        saved = self.uses_edges, self.checks
        self.uses_edges, self.checks = True, checks  # the contact check needs edges whatever the model uses
        try:
            return self._failures(state, edges, slots)
        finally:
            self.uses_edges, self.checks = saved

    def describe(self, code: int, value: float, step: int, one=None) -> str:
        """Message of a device failure code."""
        status = Status.from_code(code)
        if status is Status.NON_FINITE:
            return f"non-finite energy, forces, stress or positions (NaN/Inf) at step {step}"
        if status is Status.VOLUME:
            r = self.checks.max_volume_ratio
            return (f"volume {'blow-up' if value > 1 else 'collapse'}: V/V0 = {value:.3g} outside "
                    f"[1/{r:g}, {r:g}] at step {step}")
        if status is Status.ATOMS_TOO_CLOSE:
            factor = self.checks.min_distance_factor or self.admission_checks.min_distance_factor
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

    # ------------------------------------------------------------------ host side: the check
    def read_status(self) -> dict[str, np.ndarray]:
        """One device→host read of the per-slot status (occupied slots only)."""
        k = len(self.items)
        s = self.slots
        st = self.state
        packed = torch.stack([s.code[:k], s.fail_step[:k], self.entry.finished(st)[:k].long(),
                              s.parked[:k].long(), self.entry.steps_taken(st)[:k]]).cpu().numpy()
        values = s.fail_value[:k].cpu().numpy()
        return {"code": packed[0], "fail_step": packed[1], "finished": packed[2].astype(bool),
                "parked": packed[3].astype(bool), "steps": packed[4], "fail_value": values}

    def check(self) -> list:
        """Host work between step blocks; returns the results retired or rejected here (in completion order)."""
        results: list = []
        retire: dict[int, tuple[Status, str | None]] = {}
        parked: list[int] = []
        inner_parked: set[int] = set()  # input indices (two-level lists)
        grow: dict[int, float | None] = {}
        if self.state is not None and self.items:
            host = self.read_status()
            extra = self.job.at_check(self, host) if hasattr(self.job, "at_check") else {}
            for slot, item in enumerate(self.items):
                if item is None:
                    continue
                code = int(host["code"][slot])
                if code != 0:
                    one = _unpad(self.state, [slot])
                    retire[slot] = (Status.from_code(code),
                                    self.describe(code, float(host["fail_value"][slot]), int(host["fail_step"][slot]),
                                                  one))
                elif slot in extra:
                    retire[slot] = extra[slot]
                elif host["finished"][slot]:
                    retire[slot] = (None, None)
                elif host["parked"][slot]:
                    parked.append(slot)
            if self.two_level:  # parked on the inner list: a wider margin at the refresh, no search here
                for slot in parked:
                    index = self.items[slot].index
                    if 2.0 * self._margin.get(index, self._start_margin) > self.max_skin:
                        retire[slot] = (Status.NON_FINITE, f"atoms move more than {self.max_skin:.3g} Å between "
                                        f"two steps (at step {int(host['steps'][slot])}): the simulation has "
                                        "blown up")
                    else:
                        inner_parked.add(index)
                parked = []
            grow = self._outrun(host, parked)
            if self.config.rebuild_every_check:
                parked += [s for s, it in enumerate(self.items) if it is not None and s not in retire
                           and s not in parked]
            elif not self.two_level:  # (two-level lists: the outer list's rebuilds are decided at the refresh)
                parked += [s for s in self._half_used() if s not in retire and s not in parked]
            for slot in list(grow):
                if grow[slot] is None:  # cannot keep up even with the largest skin
                    parked.remove(slot)
                    retire[slot] = (Status.NON_FINITE, f"atoms move more than {self.max_skin:.3g} Å between two "
                                    f"steps (at step {int(host['steps'][slot])}): the simulation has blown up")
                    del grow[slot]
            for slot, (status, message) in retire.items():
                one = _unpad(self.state, [slot])
                res = self.job.result(self.items[slot], one, status, message)
                results.append(res)
        n_sys, n_atoms = self.n_active, self._atoms_in_use()
        keep = [s for s, it in enumerate(self.items) if it is not None and s not in retire]
        retired_atoms = sum(len(self.items[s].atoms) for s in retire)
        self._freed += retired_atoms
        for slot in retire:
            self._margin.pop(self.items[slot].index, None)
            self._built_at.pop(self.items[slot].index, None)
            self.items[slot] = None
        started, new_states = [], []
        in_use = n_atoms - retired_atoms
        if not keep or self._freed >= self.config.refill_fraction * (in_use + self._freed):
            new_items, rejected = self._take_new()
            results += rejected
            started, new_states, failed = self._admit(new_items)
            results += failed
            # a failed admission frees its budget: take more from the queue until nothing new fits
            while failed and not self.exhausted:
                more, rejected = self._take_new()
                results += rejected
                if not more:
                    break
                s2, st2, failed = self._admit(more)
                started += s2
                new_states += st2
                results += failed
            if new_items:
                self._freed = 0
        vacant = self._vacant + retired_atoms
        if started or self.state is None or not keep or (
                retire and vacant > self.config.vacant_fraction * (vacant + in_use)):
            self._grow_skin = {keep.index(s): v for s, v in grow.items()}
            self._repack(keep, started, new_states, parked)
        else:
            self._grow_skin = dict(grow)
            if retire:
                self._vacate(sorted(retire), retired_atoms)
            if parked:
                self._rebuild_parked(parked)
        if self.two_level and self.state is not None:
            self._refresh_inner(inner_parked)
        event = CheckEvent(self.iteration, self._since_check, n_sys, n_atoms, results)
        self._since_check = 0
        for obs in self.observers:
            if hasattr(obs, "on_check"):
                obs.on_check(event)
        for res in results:
            for obs in self.observers:
                if hasattr(obs, "on_result"):
                    obs.on_result(res)
        return results

    def _refresh_inner(self, parked: set[int]) -> None:
        """Two-level lists (:attr:`StepConfig.inner_skin`): per-system margins, outer rebuilds where the outer list
        cannot supply them, then the inner list the next steps use (``parked``: input indices whose last step was
        undone)."""
        b = self.state.batch
        k = len(self.items)
        bound = self.edges.stale_bound(b.positions, b.cell, b.pbc, b.system_index)
        steps = self.entry.steps_taken(self.state)[:k].to(bound.dtype)
        host = torch.stack([bound[:k], self.edges.skin[:k].to(bound.dtype), steps]).cpu().numpy()
        lo, factor = INNER_MIN_MARGIN, INNER_PACE_FACTOR
        margin = [0.0] * (b.cell.shape[0])
        prev, self._outer_bound = self._outer_bound, {}
        need, half, grow = [], [], {}
        for slot, item in enumerate(self.items):
            if item is None:
                continue
            index = item.index
            o, skin, n = float(host[0, slot]), float(host[1, slot]), float(host[2, slot])
            if index in parked:
                m = 2.0 * self._margin.get(index, self._start_margin)
            elif index in prev and math.isfinite(o) and n > prev[index][1]:
                # a multiple of the growth of the bound per step since the last check, for the steps to the next
                m = max(factor * (o - prev[index][0]) / (n - prev[index][1]) * self.config.check_interval, lo)
            else:  # new, or made no step since (MD at a frame boundary): keep its margin
                m = self._margin.get(index, self._start_margin)
            if not math.isfinite(o):
                m = lo  # blown up: the failure checks stop it; nothing to protect
            elif m + o > skin:
                need.append(slot)
                if m > 0.5 * skin:
                    grow[slot] = 2.0 * m
            elif o > 0.5 * skin:
                half.append(slot)
            margin[slot] = m
            self._margin[index] = m
            self._outer_bound[index] = (o, n)
        if need:  # outer rebuilds (one search for all; the half-used join it)
            need += half
            self._grow_skin = grow
            self._rebuild_parked(need)
            for slot in need:
                index = self.items[slot].index
                self._outer_bound[index] = (0.0, self._outer_bound[index][1])
        self.slots = replace(self.slots, parked=torch.zeros_like(self.slots.parked))
        margin_t = torch.as_tensor(margin, dtype=self.dtype, device=self.device)
        self._inner = inner(self.edges, b, margin_t, self._inner.capacity if self._inner is not None else None,
                            static=self.static_shapes)

    def _vacate(self, slots: list[int], n_atoms: int) -> None:
        """Retired ``slots`` leave without a re-pack: not occupied any more, edges dropped, atoms kept (vacant)."""
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        occupied = self.slots.occupied.clone()
        occupied[idx] = False
        self.slots = replace(self.slots, occupied=occupied)
        self.edges = drop(self.edges, self.state.batch, idx, self.static_shapes)
        self._vacant += n_atoms

    def _rebuild_parked(self, parked: list[int]) -> None:
        """Rebuild the edges of parked systems in place (no re-pack) and let them run again."""
        dev = self.device
        slots_t = torch.as_tensor(parked, dtype=torch.long, device=dev)
        if self._grow_skin:
            skin = self.edges.skin.clone()
            for slot, value in self._grow_skin.items():
                skin[slot] = value
            self.edges = replace(self.edges, skin=skin)
            self._grow_skin = {}
        self.edges = rebuild(self.edges, self.state.batch, slots_t, self.config.neighbor_backend, self.static_shapes)
        parked_mask = self.slots.parked.clone()
        parked_mask[slots_t] = False
        self.slots = replace(self.slots, parked=parked_mask)
        steps = self.entry.steps_taken(self.state)[slots_t].cpu().tolist()
        for slot, st in zip(parked, steps):
            self._built_at[self.items[slot].index] = int(st)

    def _half_used(self) -> list[int]:
        """Occupied slots that have used more than half of their skin since their build: rebuilt at this check
        (before they would park in the next block of steps)."""
        b = self.state.batch
        bound = self.edges.stale_bound(b.positions, b.cell, b.pbc, b.system_index)
        k = len(self.items)
        half = (bound[:k] > 0.5 * self.edges.skin[:k]) & self.slots.occupied[:k]
        return [int(s) for s in torch.nonzero(half).flatten().tolist()]

    def _outrun(self, host: dict, parked: list[int]) -> dict[int, float | None]:
        """Parked systems that made no step since their last build (one step moves them beyond their skin):
        slot -> a doubled skin, or None when it would exceed :attr:`max_skin`."""
        out = {}
        skins = self.edges.skin.cpu().numpy() if parked else None
        for slot in parked:
            index = self.items[slot].index
            if self._built_at.get(index) == int(host["steps"][slot]):
                new = max(2.0 * float(skins[slot]), 0.05)
                out[slot] = new if new <= self.max_skin else None
        return out

    def _repack(self, keep: list[int], started: list[InputItem], new_states: list, parked: list[int],
                admitted: bool = True) -> None:
        """Rebuild the padded state: survivors (``keep``, in order) + newly started, edges of parked/new rebuilt.
        ``admitted=False``: the new systems are restored (a restart), not started: no ``on_admit``."""
        parts = []
        if keep:
            parts.append(_unpad(self.state, keep))
        parts += new_states
        items = [self.items[s] for s in keep] + started
        if not parts:
            self.state, self.slots, self.edges, self.items, self._inner = None, None, None, [], None
            return
        compact = concat_states(parts) if len(parts) > 1 else parts[0]
        compact.batch = replace(compact.batch, atom_count=int(compact.batch.offsets[-1]))
        n, k = compact.batch.n_atoms, compact.batch.n_systems
        from geodite_sim.accelerate import next_capacity

        cur = self.state.batch.positions.shape[0] if self.state is not None else None
        cur_s = len(self.items) if self.items else None
        if self.static_shapes:  # compiled / captured step: bucketed capacities, so shapes rarely change
            a_cap = next_capacity(n + 1, cur, MIN_ATOMS, 1.0 / 16.0, 0.5)
            s_cap = next_capacity(k, cur_s, MIN_SLOTS, 1.0 / 16.0, 0.5)
        else:  # eager: every padding atom is model work for nothing; shapes may change at any check
            a_cap, s_cap = n + 1, k
        old_slots = self.slots
        old_state, old_edges = self.state, self.edges
        state = _pad_state(compact, a_cap, s_cap, self._pad_cell)
        # per-slot runner status: survivors keep theirs (parked ones are rebuilt now)
        dev = self.device
        k_old = len(keep)
        keep_t = torch.as_tensor(keep, dtype=torch.long, device=dev)

        def carry(old, fill, dtype):
            out = torch.full((s_cap + 1,), fill, dtype=dtype, device=dev)
            if k_old:
                out[:k_old] = old[keep_t]
            return out

        horizon = torch.full((s_cap + 1,), 0, dtype=torch.long, device=dev)
        self.items = items + [None] * (s_cap - len(items))
        occupied = torch.zeros(s_cap + 1, dtype=torch.bool, device=dev)
        occupied[:k] = True
        volume0 = torch.ones(s_cap + 1, dtype=self.dtype, device=dev)
        volume0[:k] = cell_volumes(state.batch.cell[:k])
        if k_old:
            volume0[:k_old] = old_slots.volume0[keep_t]
            horizon[:k_old] = old_slots.horizon[keep_t]
        self.slots = SlotStatus(occupied, torch.zeros(s_cap + 1, dtype=torch.bool, device=dev),
                                carry(old_slots.code if old_slots else None, 0, torch.long),
                                carry(old_slots.fail_step if old_slots else None, 0, torch.long),
                                carry(old_slots.fail_value if old_slots else None, 0.0, self.dtype),
                                horizon, volume0)
        self.state = state
        self._vacant = 0
        # edges: survivors that were not parked keep theirs (remapped); parked and new are rebuilt
        rebuild_slots = [i for i, s in enumerate(keep) if s in set(parked)] + list(range(k_old, k))
        self.edges = self._remap_edges(old_state, old_edges, keep, state, rebuild_slots)
        self._grow_skin = {}
        if rebuild_slots:
            steps = self.entry.steps_taken(state)[torch.as_tensor(rebuild_slots, device=dev)].cpu().tolist()
            for slot, st in zip(rebuild_slots, steps):
                self._built_at[self.items[slot].index] = int(st)
        if hasattr(self.job, "horizon"):
            self.slots.horizon = self.job.horizon(self, self.slots.horizon, list(range(k_old, k)))
        if hasattr(self.job, "on_admit") and started and admitted:
            self.job.on_admit(self, list(range(k_old, k)))

    def _remap_edges(self, old_state, old_edges: EdgeBuffer | None, keep: list[int], state,
                     rebuild_slots: list[int]) -> EdgeBuffer:
        """The edge buffer after a re-pack (:func:`~geodite_sim.runner.edges.remap`; a fresh one when no
        survivor has edges to keep)."""
        batch = state.batch
        dev = self.device
        n_slots = batch.cell.shape[0]
        skin = torch.full((n_slots,), self.config.skin, dtype=self.dtype, device=dev)
        keep_t = torch.as_tensor(keep, dtype=torch.long, device=dev)
        if old_edges is not None and keep:
            skin[: len(keep)] = old_edges.skin[keep_t]
        for slot, value in self._grow_skin.items():
            skin[slot] = value
        if old_edges is None or not keep or old_edges.n_valid == 0:
            everything = torch.as_tensor([s for s, it in enumerate(self.items) if it is not None], dtype=torch.long,
                                         device=dev)
            return make_buffer(batch, everything, self.cutoff, skin, self.config.neighbor_backend,
                               static=self.static_shapes)
        return remap(old_edges, old_state.batch, keep_t, batch, torch.as_tensor(rebuild_slots, dtype=torch.long,
                     device=dev), skin, self.config.neighbor_backend, self.static_shapes)

    # ------------------------------------------------------------------ the loop
    def run(self, items: Iterator[InputItem]) -> Iterator:
        """Results (completion order) of every input of ``items``."""
        self.queue = iter(items)
        try:
            while True:
                yield from self.check()
                if self.state is None:
                    if self.exhausted:
                        return
                    continue
                self.advance(self.block_length())
        finally:
            for obs in self.observers:
                if hasattr(obs, "on_close"):
                    obs.on_close()


@dataclass
class _Bare:
    """A state with only a batch (for padding a batch alone)."""

    batch: Batch


__all__ = ["Capacity", "CheckEvent", "FailureChecks", "Runner", "SlotStatus", "StepConfig"]
