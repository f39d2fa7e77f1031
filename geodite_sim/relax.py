"""``relax_many``: relax many structures with batched FIRE (+ Fréchet cell filter) and continuous batching.

The engine pulls structures lazily from the input stream, packs as many as fit
into the batch capacity, and loops::

    evaluate the model on the whole batch  -> energy, forces, stress (+ failure checks)
    fire_step                               -> converged / out of steps / failed systems freeze,
                                               the others move one FIRE step
    every ``check_interval`` steps: read the done mask back, emit the finished systems'
    results and refill their places from the queue

A frozen system keeps its state bit for bit until it is retired, so its result and
step count are those of a single-structure run (and of ASE's ``FIRE``, see
:mod:`geodite_sim.dynamics.fire`). A structure that cannot be read, fails a check
(non-finite output, atoms too close, volume blow-up or collapse) or makes the model
raise gets a result whose ``error`` says why; the others go on. Every input yields
exactly one :class:`RelaxResult`.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols, covalent_radii

from geodite_sim.batch import Batch
from geodite_sim.dynamics.fire import FireParams, FireState, fire_init, fire_step, per_system_sum
from geodite_sim.evaluate import stress_to_voigt
from geodite_sim.io.structures import InputItem, iter_inputs, like_input
from geodite_sim.model.geodite import Edges
from geodite_sim.model.strain import edge_vectors
from geodite_sim.neighbors import neighbor_list
from geodite_sim.progress import Progress
from geodite_sim.scheduler import Capacity, Scheduler
from geodite_sim.state import system_field

log = logging.getLogger(__name__)

#: Failure codes kept per system on the device (0 = fine).
NONFINITE, CONTACT, VOLUME, MODEL_ERROR = 1, 2, 3, 4



@dataclass
class RelaxResult:
    """Outcome of one structure's relaxation.

    Attributes:
        structure: the relaxed structure, same type as the input (ASE Atoms for paths; the input
            itself when it could not be read). ASE Atoms carry a SinglePointCalculator with the results.
        energy: final energy, eV (NaN when there is none). energy_per_atom: eV/atom.
        forces: [n, 3] final forces, eV/Å (None when there are none).
        stress: [3, 3] final stress, eV/Å³, ASE sign (zeros unless fully periodic; None when there is none).
        n_steps: FIRE steps taken. converged: max generalised force norm < fmax.
        error: None, or why this structure failed. index: position in the input stream.
        label: file path or ``index:formula``. fmax: final max generalised force norm (atoms and cell), eV/Å.
        relax_cell: whether the cell was relaxed.
    """

    structure: Any
    energy: float
    energy_per_atom: float
    forces: np.ndarray | None
    stress: np.ndarray | None
    n_steps: int
    converged: bool
    error: str | None
    index: int
    label: str = ""
    fmax: float = float("nan")
    relax_cell: bool = False

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def status(self) -> str:
        """``converged``, ``not_converged`` or ``failed``."""
        return "failed" if self.failed else ("converged" if self.converged else "not_converged")


@dataclass
class FailureChecks:
    """Per-system checks run after every model evaluation (None switches one off).

    Attributes:
        min_distance_factor: fail when two atoms are closer than this × (r_cov,i + r_cov,j)
            (``ase.data.covalent_radii``; pairs within the model cutoff).
        max_volume_ratio: fail a cell-relaxing system whose volume leaves [V0 / r, r · V0].
    """

    min_distance_factor: float | None = 0.5
    max_volume_ratio: float | None = 3.0


@dataclass
class RelaxState(FireState):
    """FIRE state plus failure bookkeeping: ``failure`` [S] code, ``fail_step`` [S], ``volume0`` [S] Å³,
    ``fail_value`` [S] (distance ratio or volume ratio at the failure)."""

    failure: torch.Tensor = system_field(default=None)
    fail_step: torch.Tensor = system_field(default=None)
    volume0: torch.Tensor = system_field(default=None)
    fail_value: torch.Tensor = system_field(default=None)


#: Structures read ahead from the input stream to probe the batch capacity.
PROBE_STRUCTURES = 8
#: Batch sizes (atoms) tried by the CPU probe of :func:`estimate_capacity`.
CPU_PROBE_SIZES = (32, 64, 128, 256, 512)
#: Inputs known to hold at most this many atoms in all run as one batch (no probe).
SMALL_WORKLOAD_ATOMS = 64
_CPU_CAPACITY_CACHE: dict = {}


def _probe_batch(structures: Sequence[Atoms], n_atoms: int, dtype, device) -> Batch:
    """Whole structures cycled from ``structures`` until the batch holds at least ``n_atoms`` atoms."""
    chosen, total, k = [], 0, 0
    while total < n_atoms:
        a = structures[k % len(structures)]
        chosen.append(a)
        total += len(a)
        k += 1
    return Batch.from_atoms(chosen, dtype=dtype, device=device)


def _time_step(model, batch: Batch, repeats: int = 1) -> float:
    """Best-of-``repeats`` seconds of one relaxation step's model work (neighbour list + energy/forces/stress)."""
    import time

    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        edges = neighbor_list(batch, model.cutoff, getattr(model, "neighbor_backend", "auto"))
        model(batch, edges=edges, compute_forces=True, compute_stress=True)
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_heuristic(model) -> int:
    """Atoms per CPU batch from the model's width: keep per-layer edge activations cache-sized.

    Measured on a 2-core CPU (float32, 1 thread): a 64-channel Geodite runs fastest per atom at
    64-128 atoms a batch, the 192-channel Geodite-MP configuration at 32-64; pair potentials have
    no such cliff.
    """
    config = getattr(model, "config", None)
    channels = getattr(config, "hidden_channels", None)
    if not channels:
        return 256
    return int(min(256, max(32, 8192 // channels)))


def _tune_cpu(model, probe: Sequence[Atoms], device, budget_s: float) -> int:
    """Time the model on probe batches of :data:`CPU_PROBE_SIZES` atoms; the largest size within 5 % of
    the best time per atom wins (stops past the cache cliff or when ``budget_s`` is spent)."""
    import time

    t_start = time.perf_counter()
    per_atom: dict[int, float] = {}
    _time_step(model, _probe_batch(probe, CPU_PROBE_SIZES[0], model.dtype, device))  # warm-up
    for n in CPU_PROBE_SIZES:
        batch = _probe_batch(probe, n, model.dtype, device)
        per_atom[n] = _time_step(model, batch, repeats=2 if n <= 128 else 1) / batch.n_atoms
        if per_atom[n] > 1.5 * min(per_atom.values()) or time.perf_counter() - t_start > budget_s:
            break
    best = min(per_atom.values())
    n = max(k for k, v in per_atom.items() if v <= 1.05 * best)
    log.info("estimate_capacity (cpu probe): %s ms/atom -> max_atoms=%d",
             {k: round(v * 1e3, 3) for k, v in per_atom.items()}, n)
    return n


def estimate_capacity(
    model,
    device: torch.device | str | None = None,
    max_atoms: int | None = None,
    max_systems: int | None = None,
    probe: Atoms | Sequence[Atoms] | None = None,
    memory_fraction: float = 0.8,
    total_atoms: int | None = None,
    tune: bool = False,
    tune_budget_s: float = 10.0,
    memory_budget_bytes: float | None = None,
) -> Capacity:
    """Batch capacity (``max_atoms``, atoms per batch) for ``model`` on ``device``.

    An explicit ``max_atoms`` wins (capped by ``memory_budget_bytes`` when given). ``total_atoms``
    (atoms of the whole input, when known): a workload of at most :data:`SMALL_WORKLOAD_ATOMS` atoms
    runs as one batch. ``probe``: structures representative of the workload (relax_many passes the
    first ones of its input stream); default a 256-atom fcc Cu cell (dense, so estimates err on the
    safe side).

    - CPU: throughput, not memory, is the limit: a batch too large for the caches costs more per atom
      (measured: +30 to +180 % per edge from 64 to 512 atoms for Geodite). Default: a rule on the
      model's width (:func:`_cpu_heuristic`, deterministic and free); ``tune=True`` times the model on
      probe batches instead (cached per model, dtype and device; at most ``tune_budget_s``).
    - CUDA: the memory model of :mod:`geodite_sim.memory` (peak bytes of one energy+forces+stress
      step, fixed + per atom + per edge, fitted on probe batches and cached per model, dtype and
      device) sized to ``memory_fraction`` of the free device memory (bytes, ``torch.cuda.mem_get_info``
      plus the allocator's unused cache), at the densest probe structure's edges per atom.
    - ``memory_budget_bytes`` (bytes, any device): additionally caps the capacity so that one step's
      predicted peak is at most ``memory_fraction · memory_budget_bytes`` (on CUDA the smaller of this
      budget and the free memory applies).

    ``memory_fraction`` is the share of a memory budget a step may use (1 - safety margin).
    """
    device = torch.device(device if device is not None else model.device)
    from ase.build import bulk

    if probe is None:
        probe = [bulk("Cu", "fcc", 3.61, cubic=True) * (4, 4, 4)]
    elif isinstance(probe, Atoms):
        probe = [probe]
    probe = list(probe)
    margin = 1.0 - memory_fraction

    def capped(n: int) -> Capacity:
        if memory_budget_bytes is not None:
            from geodite_sim.memory import memory_capacity

            cap = memory_capacity(model, memory_budget_bytes, probe, margin=margin, device=device)
            if cap < n:
                log.info("estimate_capacity: memory budget %.3g B caps max_atoms %d -> %d",
                         memory_budget_bytes, n, cap)
                n = cap
        return Capacity(max_atoms=int(n), max_systems=max_systems)

    if max_atoms is not None:
        return capped(int(max_atoms))
    if total_atoms is not None and total_atoms <= SMALL_WORKLOAD_ATOMS:
        return capped(SMALL_WORKLOAD_ATOMS)
    if device.type != "cuda":
        if not tune:
            return capped(_cpu_heuristic(model))
        key = (id(model), model.dtype, str(device))
        if key not in _CPU_CAPACITY_CACHE:
            _CPU_CAPACITY_CACHE[key] = _tune_cpu(model, probe, device, tune_budget_s)
        return capped(_CPU_CAPACITY_CACHE[key])
    from geodite_sim.memory import device_free_bytes, memory_capacity

    torch.cuda.empty_cache()
    n = memory_capacity(model, device_free_bytes(device), probe, margin=margin, device=device)
    log.info("estimate_capacity (cuda): max_atoms=%d from the memory model", n)
    return capped(n)


class _Relaxer:
    """The engine behind :func:`relax_many` (one instance per call)."""

    def __init__(self, model, fmax, max_steps, relax_cell, params, cell_factor, checks, check_interval):
        self.model = model
        self.fmax = float(fmax)
        self.max_steps = int(max_steps)
        self.relax_cell = relax_cell
        self.params = params
        self.cell_factor = cell_factor
        self.checks = checks
        self.check_interval = max(1, int(check_interval))
        self.dtype, self.device = model.dtype, model.device
        self.backend = getattr(model, "neighbor_backend", "auto")
        self.radii = torch.as_tensor(covalent_radii, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ per-structure setup
    def _relax_flag(self, item: InputItem) -> bool:
        rc = self.relax_cell
        if callable(rc):
            return bool(rc(item.atoms))
        if isinstance(rc, (bool, np.bool_, int)):
            return bool(rc)
        return bool(rc[item.index])

    def init_state(self, items: list[InputItem]) -> RelaxState:
        batch = Batch.from_atoms([it.atoms for it in items], dtype=self.dtype, device=self.device)
        flags = torch.tensor([self._relax_flag(it) for it in items], dtype=torch.bool, device=self.device)
        s = batch.n_systems
        zeros_l = torch.zeros(s, dtype=torch.long, device=self.device)
        return fire_init(
            batch, flags, self.params, self.cell_factor, state_cls=RelaxState,
            failure=zeros_l, fail_step=zeros_l.clone(), volume0=torch.linalg.det(batch.cell).abs(),
            fail_value=torch.zeros(s, dtype=self.dtype, device=self.device),
        )

    # ------------------------------------------------------------------ model evaluation
    def _model(self, batch: Batch) -> tuple[dict, Edges]:
        edges = neighbor_list(batch, self.model.cutoff, self.backend)
        out = self.model(batch, edges=edges, compute_forces=True, compute_stress=True)
        return out, edges

    def _model_isolating(self, batch: Batch, active: list[InputItem]) -> tuple[dict, Edges, torch.Tensor]:
        """Evaluate the batch; if the model raises, evaluate each system alone and mark the culprits."""
        bad = torch.zeros(batch.n_systems, dtype=torch.bool, device=self.device)
        try:
            out, edges = self._model(batch)
            return out, edges, bad
        except Exception as exc:  # isolate the system(s) responsible
            if batch.n_systems == 1:
                active[0].error = f"model error: {type(exc).__name__}: {exc}"
                return self._placeholder(batch), self._no_edges(), bad | True
            log.warning("model raised on a batch of %d systems (%s); evaluating them one by one",
                        batch.n_systems, exc)
        energies, forces, stresses, senders, receivers, shifts = [], [], [], [], [], []
        offsets = batch.offsets.tolist()
        for i in range(batch.n_systems):
            sub = batch.select([i])
            try:
                out, edges = self._model(sub)
                senders.append(edges.sender + offsets[i])
                receivers.append(edges.receiver + offsets[i])
                shifts.append(edges.shifts)
            except Exception as exc:
                active[i].error = f"model error: {type(exc).__name__}: {exc}"
                bad[i] = True
                out = self._placeholder(sub)
            energies.append(out["energy"])
            forces.append(out["forces"])
            stresses.append(out["stress"])
        out = {"energy": torch.cat(energies), "forces": torch.cat(forces), "stress": torch.cat(stresses)}
        if senders:
            edges = Edges(torch.cat(senders), torch.cat(receivers), torch.cat(shifts))
        else:
            edges = self._no_edges()
        return out, edges, bad

    def _placeholder(self, batch: Batch) -> dict:
        return {
            "energy": torch.full((batch.n_systems,), float("nan"), dtype=self.dtype, device=self.device),
            "forces": torch.zeros_like(batch.positions),
            "stress": torch.zeros_like(batch.cell),
        }

    def _no_edges(self) -> Edges:
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        return Edges(empty, empty, torch.zeros(0, 3, dtype=torch.long, device=self.device))

    def evaluate(self, state: RelaxState, active: list[InputItem]) -> RelaxState:
        """Model outputs at the current positions, and the failure checks (no host sync on the good path)."""
        b = state.batch
        out, edges, model_bad = self._model_isolating(b, active)
        energy, forces, stress = out["energy"], out["forces"], out["stress"]
        sys_idx, n_sys = b.system_index, b.n_systems
        code = torch.zeros(n_sys, dtype=torch.long, device=self.device)
        value = torch.zeros(n_sys, dtype=self.dtype, device=self.device)
        # volume (cell-relaxing systems only)
        r = self.checks.max_volume_ratio
        if r is not None:
            ratio = torch.linalg.det(b.cell).abs() / state.volume0
            vol_bad = state.relax_cell & ((ratio > r) | (ratio < 1.0 / r) | ~torch.isfinite(ratio))
            code = torch.where(vol_bad, VOLUME, code)
            value = torch.where(vol_bad, ratio, value)
        # close contacts
        f = self.checks.min_distance_factor
        if f is not None and edges.sender.numel() > 0:
            d = torch.linalg.vector_norm(edge_vectors(b.positions, b.cell, sys_idx, edges), dim=-1)
            ratio = d / (self.radii[b.numbers[edges.sender]] + self.radii[b.numbers[edges.receiver]])
            min_ratio = torch.full((n_sys,), math.inf, dtype=self.dtype, device=self.device)
            min_ratio = min_ratio.scatter_reduce(0, sys_idx[edges.receiver], ratio, reduce="amin")
            close = min_ratio < f
            code = torch.where(close, CONTACT, code)
            value = torch.where(close, min_ratio, value)
        # non-finite model output
        bad_atoms = per_system_sum((~torch.isfinite(forces).all(dim=1)).long(), sys_idx, n_sys) > 0
        nonfinite = bad_atoms | ~torch.isfinite(energy) | ~torch.isfinite(stress).flatten(1).all(dim=1)
        code = torch.where(nonfinite, NONFINITE, code)
        code = torch.where(model_bad, MODEL_ERROR, code)
        new = (state.failure == 0) & (code != 0) & ~state.done
        keep = state.done
        if state.energy is not None:  # a finished system keeps its final evaluation bit for bit
            energy = torch.where(keep, state.energy, energy)
            forces = torch.where(keep[sys_idx, None], state.forces, forces)
            stress = torch.where(keep[:, None, None], state.stress, stress)
        return replace(
            state, energy=energy, forces=forces, stress=stress,
            failure=torch.where(new, code, state.failure),
            fail_step=torch.where(new, state.n_steps, state.fail_step),
            fail_value=torch.where(new, value, state.fail_value),
        )

    def step(self, state: RelaxState, active: list[InputItem], cell: bool = True) -> RelaxState:
        state = self.evaluate(state, active)
        return fire_step(state, self.fmax, self.max_steps, self.params, frozen=state.failure != 0, cell=cell)

    # ------------------------------------------------------------------ results
    def _error_message(self, item: InputItem, one: RelaxState) -> str | None:
        code = int(one.failure[0])
        if code == 0:
            return None
        step = int(one.fail_step[0])
        value = float(one.fail_value[0])
        if code == MODEL_ERROR:
            return f"{item.error or 'model error'} (step {step})"
        if code == NONFINITE:
            return f"non-finite energy, forces or stress (NaN/Inf) from the model at step {step}"
        if code == VOLUME:
            return (f"volume {'blow-up' if value > 1 else 'collapse'}: V/V0 = {value:.3g} outside "
                    f"[1/{self.checks.max_volume_ratio:g}, {self.checks.max_volume_ratio:g}] at step {step}")
        if code == CONTACT:
            return f"atoms too close at step {step}: {self._contact_detail(one)}"
        return f"failure code {code} at step {step}"

    def _contact_detail(self, one: RelaxState) -> str:
        b = one.batch
        try:
            edges = neighbor_list(b, self.model.cutoff, self.backend)
            d = torch.linalg.vector_norm(edge_vectors(b.positions, b.cell, b.system_index, edges), dim=-1)
            rsum = self.radii[b.numbers[edges.sender]] + self.radii[b.numbers[edges.receiver]]
            k = int(torch.argmin(d / rsum))
            i, j = int(edges.receiver[k]), int(edges.sender[k])
            zi, zj = chemical_symbols[int(b.numbers[i])], chemical_symbols[int(b.numbers[j])]
            return (f"{zi}{i}-{zj}{j} at {float(d[k]):.3f} Å < {self.checks.min_distance_factor:g} × "
                    f"covalent-radius sum {float(rsum[k]):.3f} Å")
        except Exception:  # the message must never fail
            return f"distance < {float(one.fail_value[0]):.3g} × covalent-radius sum"

    def result(self, item: InputItem, one: RelaxState) -> RelaxResult:
        """The result of a retired one-system state."""
        error = self._error_message(item, one)
        b = one.batch
        atoms = item.atoms.copy()
        atoms.calc = None
        atoms.positions = b.positions.detach().cpu().double().numpy()
        if bool(one.relax_cell[0]):
            atoms.set_cell(b.cell[0].detach().cpu().double().numpy(), scale_atoms=False)
        energy = float(one.energy[0]) if one.energy is not None else float("nan")
        forces = one.forces.detach().cpu().double().numpy() if one.forces is not None else None
        stress = one.stress[0].detach().cpu().double().numpy() if one.stress is not None else None
        if forces is not None and error is None:
            atoms.calc = SinglePointCalculator(atoms, energy=energy, free_energy=energy, forces=forces,
                                               stress=stress_to_voigt(stress))
        n = len(atoms)
        return RelaxResult(
            structure=like_input(item.original, atoms),
            energy=energy,
            energy_per_atom=energy / n,
            forces=forces,
            stress=stress,
            n_steps=int(one.n_steps[0]),
            converged=bool(one.converged[0]) and error is None,
            error=error,
            index=item.index,
            label=item.label,
            fmax=float(one.fmax[0]),
            relax_cell=bool(one.relax_cell[0]),
        )

    @staticmethod
    def load_failure(item: InputItem) -> RelaxResult:
        """The result of an input that never started (unreadable, invalid, or failed to initialise)."""
        return RelaxResult(
            structure=item.original, energy=float("nan"), energy_per_atom=float("nan"), forces=None,
            stress=None, n_steps=0, converged=False, error=item.error or "could not be started",
            index=item.index, label=item.label,
        )

    # ------------------------------------------------------------------ the loop
    def run(self, items: Iterator[InputItem], capacity: Capacity, progress: Progress) -> Iterator[RelaxResult]:
        sched = Scheduler(items, capacity, self.init_state)
        while True:
            for item in sched.refill():
                res = self.load_failure(item)
                progress.finish(res.status)
                yield res
            progress.set_active(len(sched.active))
            if sched.state is None:
                if sched.done:
                    return
                continue
            state = sched.state
            any_cell = bool(state.relax_cell.any())  # read once per refill; skips the filter when False
            for _ in range(self.check_interval):
                state = self.step(state, sched.active, any_cell)
            sched.state = state
            for item, one in sched.retire(state.done):
                res = self.result(item, one)
                progress.finish(res.status)
                yield res
            if sched.done:
                return


def relax_many(
    structures: Any,
    model=None,
    fmax: float = 0.05,
    max_steps: int = 500,
    relax_cell: bool | Sequence[bool] | Callable[[Atoms], bool] = True,
    *,
    stream: bool = False,
    max_atoms: int | None = None,
    max_systems: int | None = None,
    memory_budget_bytes: float | None = None,
    check_interval: int | None = None,
    fire: FireParams | dict | None = None,
    cell_factor: float | None = None,
    min_distance_factor: float | None = 0.5,
    max_volume_ratio: float | None = 3.0,
    progress: bool = True,
    total: int | None = None,
) -> list[RelaxResult] | Iterator[RelaxResult]:
    """Relax many structures with batched FIRE (ASE's algorithm), optionally with the cell (Fréchet filter).

    Args:
        structures: ASE Atoms, pymatgen Structures/Molecules, file paths (anything ``ase.io.read``
            reads; last frame), or any iterable of them, consumed lazily.
        model: a Geodite model (default ``load_model()``) or any model with the same call signature
            (``model(batch, edges=..., compute_forces=..., compute_stress=...)``, ``cutoff``, ``dtype``, ``device``).
        fmax: convergence threshold on the max norm of the generalised forces (atoms, and cell rows
            of the Fréchet filter for cell relaxations), eV/Å; converged when below it, as ASE.
        max_steps: FIRE steps per structure at most (ASE's ``run(steps=...)``).
        relax_cell: bool for all, a sequence indexed by input position, or ``callable(atoms) -> bool``.
            Only fully periodic structures relax their cell.
        stream: return a generator of results in completion order (each with ``.index``)
            instead of a list in input order.
        max_atoms, max_systems: batch capacity (default: :func:`estimate_capacity` probed with the first
            structures of the stream).
        memory_budget_bytes: cap the batch so one step's predicted peak memory (bytes, from the
            fitted memory model, :mod:`geodite_sim.memory`) stays within it, on any device.
        check_interval: steps between reads of the done mask (retire/refill); default 1 on the
            CPU, 10 on CUDA. Finished systems are frozen in between, so results do not depend on it.
        fire: FIRE parameters (:class:`FireParams` or a dict of its fields), ASE's defaults.
        cell_factor: ASE's ``exp_cell_factor`` (default: number of atoms of each structure).
        min_distance_factor, max_volume_ratio: failure thresholds (:class:`FailureChecks`; None = off).
        progress: show a progress bar (the summary is logged either way).
        total: number of inputs for the bar when ``structures`` has no ``len``.
    Returns:
        One :class:`RelaxResult` per input (list in input order, or a generator with ``stream=True``).
    """
    if model is None:
        from geodite_sim.model import load_model

        model = load_model()
    params = fire if isinstance(fire, FireParams) else FireParams(**(fire or {}))
    if check_interval is None:
        check_interval = 10 if torch.device(model.device).type == "cuda" else 1
    checks = FailureChecks(min_distance_factor=min_distance_factor, max_volume_ratio=max_volume_ratio)
    engine = _Relaxer(model, fmax, max_steps, relax_cell, params, cell_factor, checks, check_interval)
    if total is None and hasattr(structures, "__len__") and not isinstance(structures, (str, Atoms)):
        try:
            total = len(structures)
        except TypeError:
            total = None

    def generate() -> Iterator[RelaxResult]:
        bar = Progress(total=total, desc="relax", unit="structure", enabled=progress,
                       outcomes=("converged", "not_converged", "failed"))
        items = iter_inputs(structures)
        probe, known_atoms = None, None
        if max_atoms is None:  # the first structures of the stream are the capacity probe
            head = list(itertools.islice(items, PROBE_STRUCTURES))
            probe = [it.atoms for it in head if it.atoms is not None] or None
            if len(head) < PROBE_STRUCTURES:  # that was the whole input
                known_atoms = sum(len(a) for a in probe or [])
            items = itertools.chain(head, items)
        capacity = estimate_capacity(model, model.device, max_atoms=max_atoms, max_systems=max_systems,
                                     probe=probe, total_atoms=known_atoms, memory_budget_bytes=memory_budget_bytes)
        try:
            yield from engine.run(items, capacity, bar)
        finally:
            bar.close()
            log.info(bar.summary())

    if stream:
        return generate()
    results = list(generate())
    results.sort(key=lambda r: r.index)
    return results


__all__ = ["FailureChecks", "RelaxResult", "estimate_capacity", "relax_many"]
