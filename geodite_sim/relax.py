"""``relax_many``: relax many structures with batched FIRE, L-BFGS or BFGS (+ Fréchet cell filter) and continuous
batching.

A front-end of the one runner (:mod:`geodite_sim.runner`, docs/runner.md): it pulls structures
lazily from the input stream, packs as many as fit into the batch capacity, and loops::

    move                                    -> every running system moves one FIRE / L-BFGS / BFGS step
    evaluate the model on the whole batch  -> energy, forces, stress (+ failure checks)
    relax_converged                         -> converged / out of steps systems are done (ASE's test)
    (L-BFGS, BFGS: learn from the step)     -> history pair / Hessian update
    every ``check_interval`` steps: read the status back, emit the finished systems'
    results and refill their places from the queue

A frozen system keeps its state bit for bit until it is retired, so its result and
step count are those of a single-structure run (and of ASE's ``FIRE``, ``LBFGS`` or ``BFGS``,
see :mod:`geodite_sim.dynamics.fire`, :mod:`~geodite_sim.dynamics.lbfgs`, :mod:`~geodite_sim.dynamics.bfgs`;
docs/optimizers.md). A structure that cannot be read, fails a check
(non-finite output, atoms too close, volume blow-up or collapse) or makes the model
raise gets a result whose ``error`` says why; the others go on. Every input yields
exactly one :class:`RelaxResult`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, overload

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from geodite_sim.dynamics.bfgs import BFGSParams
from geodite_sim.dynamics.fire import FireParams
from geodite_sim.dynamics.lbfgs import LBFGSParams
from geodite_sim.evaluate import stress_to_voigt
from geodite_sim.io.structures import MAX_SUPPORTED_Z, InputItem, iter_inputs, like_input
from geodite_sim.model.contract import model_name, supported_elements
from geodite_sim.model.torchsim_adapter import as_engine_model
from geodite_sim.progress import Progress
from geodite_sim.runner import AdmissionError, Capacity, FailureChecks, Job, Runner, StepConfig, get_integrator
from geodite_sim.runner.capacity import PROBE_STRUCTURES, estimate_capacity
from geodite_sim.settings import RelaxSettings
from geodite_sim.status import Status
from geodite_sim.threads import check_threads, thread_limit

log = logging.getLogger(__name__)



@dataclass
class RelaxResult:
    """Outcome of one structure's relaxation.

    Attributes:
        structure: the relaxed structure, same type as the input (ASE Atoms for paths; the input
            itself when it could not be read). ASE Atoms carry a SinglePointCalculator with the results.
        energy: final energy, eV (NaN when there is none). energy_per_atom: eV/atom.
        forces: [n, 3] final forces, eV/Å (None when there are none).
        stress: [3, 3] final stress, eV/Å³, ASE sign (zeros unless fully periodic; None when there is none).
        n_steps: optimiser steps taken. converged: max generalised force norm < fmax.
        error: None, or why this structure failed. index: position in the input stream.
        label: file path or ``index:formula``. fmax: final max generalised force norm (atoms and cell), eV/Å.
        relax_cell: whether the cell was relaxed.
        status: :class:`~geodite_sim.status.Status` (converged, not_converged, or why it failed).
        warnings: admission warnings (e.g. an unsupported element allowed by ``allow_unsupported_elements``).
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

    status: Status = Status.NOT_CONVERGED
    warnings: list = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.error is not None


class _RelaxJob(Job):
    """The relaxation front-end's hooks on the :class:`~geodite_sim.runner.Runner`: per-structure settings,
    results."""

    def __init__(self, relax_cell, max_steps: int, fix_symmetry: bool = False, symprec: float = 0.01,
                 dtype: torch.dtype = torch.float64, device="cpu", refusal: Callable[[int], str | None] | None = None):
        self.refusal = refusal  # n_atoms -> why the optimiser refuses a structure of that size (None: accepted)
        self.relax_cell = relax_cell
        self.max_steps = int(max_steps)
        self.fix_symmetry = bool(fix_symmetry)
        self.symprec = float(symprec)
        self.dtype, self.device = dtype, device

    def _relax_flag(self, item: InputItem) -> bool:
        rc = self.relax_cell
        if callable(rc):
            return bool(rc(item.atoms))
        if isinstance(rc, (bool, np.bool_, int)):
            return bool(rc)
        return bool(rc[item.index])

    def per_system(self, items: list[InputItem]) -> dict:
        """Per-structure settings: relax_cell flags and the input's constraints (AdmissionError names a bad one)."""
        from geodite_sim.dynamics.constraints import BatchConstraints, constraints_from_atoms

        constraints = []
        for it in items:
            atoms = it.atoms
            assert atoms is not None, "admitted items carry their structure"
            too_large = self.refusal(len(atoms)) if self.refusal is not None else None
            if too_large:
                raise AdmissionError(Status.INVALID_SETTINGS, too_large)
            c = constraints_from_atoms(atoms, fix_symmetry=self.fix_symmetry, symprec=self.symprec)
            if isinstance(c, str):
                raise AdmissionError(Status.INVALID_STRUCTURE, c)
            if c.has_symmetry and c.positions is not None:  # FixSymmetry relaxes the refined structure (ASE)
                atoms.set_cell(c.cell, scale_atoms=False, apply_constraint=False)
                atoms.positions = c.positions
            constraints.append(c)
        return {"relax_cell": torch.tensor([self._relax_flag(it) for it in items], dtype=torch.bool),
                "constraints": BatchConstraints.from_list(constraints, self.dtype, self.device)}

    def horizon(self, runner, horizon: torch.Tensor, new_slots: list[int]) -> torch.Tensor:
        return torch.full_like(horizon, self.max_steps + 1)  # the optimiser stops itself at max_steps

    def result(self, item: InputItem, one, status: Status | None, message: str | None) -> RelaxResult:
        """The result of a retired one-system state (``status`` None: finished normally)."""
        b = one.batch
        assert item.atoms is not None, "admitted items carry their structure"
        atoms = item.atoms.copy()
        atoms.calc = None
        atoms.positions = b.positions.detach().cpu().double().numpy()
        relax_cell = bool(one.relax_cell[0])
        if relax_cell:
            atoms.set_cell(b.cell[0].detach().cpu().double().numpy(), scale_atoms=False, apply_constraint=False)
        energy = float(one.energy[0]) if one.energy is not None else float("nan")
        forces = one.forces.detach().cpu().double().numpy() if one.forces is not None else None
        stress = one.stress[0].detach().cpu().double().numpy() if one.stress is not None else None
        converged = bool(one.converged[0]) and status is None
        if status is None:
            status = Status.CONVERGED if converged else Status.NOT_CONVERGED
        if forces is not None and status.ok:
            assert stress is not None, "relaxation entries evaluate the stress (needs_stress)"
            atoms.calc = SinglePointCalculator(atoms, energy=energy, free_energy=energy, forces=forces,
                                               stress=stress_to_voigt(stress))
        error = None if status.ok else f"{item.label}: {message}"
        return RelaxResult(
            structure=like_input(item.original, atoms), energy=energy, energy_per_atom=energy / len(atoms),
            forces=forces, stress=stress, n_steps=int(one.n_steps[0]), converged=converged, error=error,
            index=item.index, label=item.label, fmax=float(one.fmax[0]), relax_cell=relax_cell, status=status,
            warnings=list(getattr(item, "warnings", None) or []),
        )

    def rejected(self, item: InputItem, status: Status, message: str) -> RelaxResult:
        """The result of an input that never started (unreadable, invalid, or failed to initialise)."""
        if not message.startswith(item.label):
            message = f"{item.label}: {message}"
        return RelaxResult(
            structure=item.original, energy=float("nan"), energy_per_atom=float("nan"), forces=None,
            stress=None, n_steps=0, converged=False, error=message, index=item.index, label=item.label,
            status=Status(status), warnings=list(getattr(item, "warnings", None) or []),
        )


_PARAMS = {"fire": FireParams, "lbfgs": LBFGSParams, "bfgs": BFGSParams}


def optimizer_settings(optimizer: str, **given) -> dict:
    """``{optimizer: its parameters}`` from ``relax_many``'s ``fire=``/``lbfgs=``/``bfgs=`` (a params object, a dict
    of its fields or None for ASE's defaults); ValueError for an unknown optimiser or another one's parameters."""
    if optimizer not in _PARAMS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(_PARAMS)}")
    other = sorted(k for k, v in given.items() if v is not None and k != optimizer)
    if other:
        raise ValueError(f"{', '.join(o + '=' for o in other)} given but optimizer={optimizer!r}")
    cls, value = _PARAMS[optimizer], given.get(optimizer)
    return {optimizer: value if isinstance(value, cls) else cls(**(value or {}))}


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
    optimizer: str = "fire",
    fire: FireParams | dict | None = None,
    lbfgs: LBFGSParams | dict | None = None,
    bfgs: BFGSParams | dict | None = None,
    cell_factor: float | None = None,
    min_distance_factor: float | None = 0.5,
    max_volume_ratio: float | None = 3.0,
    progress: bool = True,
    total: int | None = None,
    config: StepConfig | None = None,
    observers: Sequence = (),
    executor=None,
    allow_unsupported_elements: bool = False,
    fix_symmetry: bool = False,
    symprec: float = 0.01,
    threads: int | None = None,
) -> list[RelaxResult] | Iterator[RelaxResult]:
    """Relax many structures with batched FIRE, L-BFGS or BFGS (ASE's algorithms), optionally with the cell
    (Fréchet filter).

    Args:
        structures: ASE Atoms, pymatgen Structures/Molecules, file paths (anything ``ase.io.read``
            reads; last frame), or any iterable of them, consumed lazily.
        model: a Geodite model (default ``load_model()``) or any model with the same call signature
            (``model(batch, edges=..., compute_forces=..., compute_stress=...)``, ``cutoff``, ``dtype``, ``device``).
        fmax: convergence threshold on the max norm of the generalised forces (atoms, and cell rows
            of the Fréchet filter for cell relaxations), eV/Å; converged when below it, as ASE.
        max_steps: optimiser steps per structure at most (ASE's ``run(steps=...)``).
        relax_cell: bool for all, a sequence indexed by input position, or ``callable(atoms) -> bool``.
            Only fully periodic structures relax their cell.
        stream: return a generator of results in completion order (each with ``.index``)
            instead of a list in input order.
        max_atoms, max_systems: batch capacity (default: :func:`estimate_capacity` probed with the first
            structures of the stream).
        memory_budget_bytes: cap the batch so one step's predicted peak memory (bytes, from the
            fitted memory model, :mod:`geodite_sim.memory`) stays within it, on any device.
        check_interval: steps between checks (retire/refill, the only host reads); default 1 on the
            CPU, 10 on CUDA. Finished systems are frozen in between, so results do not depend on it.
        config: engine settings (:class:`~geodite_sim.runner.StepConfig`: neighbour backend, skin,
            acceleration); ``check_interval`` overrides its field.
        observers: objects with optional ``on_check(event)`` / ``on_result(result)`` / ``on_close()`` hooks.
        executor: run elsewhere (e.g. :class:`geodite_sim.executors.RayExecutor`; it receives every setting as one
            :class:`~geodite_sim.settings.RelaxSettings`); None runs in this process.
        allow_unsupported_elements: run structures with elements outside the model's supported set
            (recorded as a warning on the result) instead of rejecting them.
        fix_symmetry: keep each structure's space group (ASE's ``FixSymmetry`` semantics, found once with spglib
            at admission with tolerance ``symprec``; the refined structure is relaxed). Constraints on input
            Atoms (``FixAtoms``, ``FixCartesian``, ``FixSymmetry``) are always honoured; any other constraint
            gives that structure an ``invalid_structure`` error.
        optimizer: ``"fire"`` (default; ASE's ``FIRE``), ``"lbfgs"`` (ASE's ``LBFGS``) or ``"bfgs"`` (ASE's ``BFGS``;
            structures above ``BFGSParams.max_atoms`` get an ``invalid_settings`` error); docs/optimizers.md.
        fire, lbfgs, bfgs: parameters of that optimiser (:class:`FireParams`, :class:`LBFGSParams`,
            :class:`BFGSParams`, or a dict of their fields), ASE's defaults; only the chosen optimiser's may be given.
        cell_factor: ASE's ``exp_cell_factor`` (default: number of atoms of each structure).
        min_distance_factor, max_volume_ratio: failure thresholds (:class:`FailureChecks`; None = off).
        progress: show a progress bar (the summary is logged either way).
        total: number of inputs for the bar when ``structures`` has no ``len``.
        threads: CPU threads of this call (None: torch's setting, i.e. ``OMP_NUM_THREADS`` or one per core;
            :mod:`geodite_sim.threads`; warns once when the machine is oversubscribed). Ray workers use their own.
    Returns:
        One :class:`RelaxResult` per input (list in input order, or a generator with ``stream=True``).
    """
    settings = RelaxSettings(
        fmax=fmax, max_steps=max_steps, relax_cell=relax_cell, max_atoms=max_atoms, max_systems=max_systems,
        memory_budget_bytes=memory_budget_bytes, check_interval=check_interval, optimizer=optimizer, fire=fire,
        lbfgs=lbfgs, bfgs=bfgs, cell_factor=cell_factor, min_distance_factor=min_distance_factor,
        max_volume_ratio=max_volume_ratio, config=config, observers=tuple(observers),
        allow_unsupported_elements=allow_unsupported_elements, fix_symmetry=fix_symmetry, symprec=symprec,
        threads=threads)
    if executor is not None:
        return executor.relax_many(structures, model, settings, stream=stream, progress=progress, total=total)
    return run_relax(structures, model, settings, stream=stream, progress=progress, total=total)


@overload
def run_relax(structures: Any, model, settings: RelaxSettings, *, stream: Literal[False] = ..., progress: bool = ...,
              total: int | None = ...) -> list[RelaxResult]: ...


@overload
def run_relax(structures: Any, model, settings: RelaxSettings, *, stream: Literal[True], progress: bool = ...,
              total: int | None = ...) -> Iterator[RelaxResult]: ...


@overload
def run_relax(structures: Any, model, settings: RelaxSettings, *, stream: bool = ..., progress: bool = ...,
              total: int | None = ...) -> list[RelaxResult] | Iterator[RelaxResult]: ...


def run_relax(structures: Any, model, settings: RelaxSettings, *, stream: bool = False, progress: bool = True,
              total: int | None = None) -> list[RelaxResult] | Iterator[RelaxResult]:
    """:func:`relax_many` in this process with its settings as one :class:`~geodite_sim.settings.RelaxSettings`
    (what the executors run)."""
    if model is None:
        from geodite_sim.model import load_model

        model = load_model()
    model = as_engine_model(model)  # a torch-sim ModelInterface runs behind TorchSimAdapter
    s = settings
    fmax, max_steps, relax_cell, observers = s.fmax, s.max_steps, s.relax_cell, tuple(s.observers)
    max_atoms, max_systems, min_distance_factor = s.max_atoms, s.max_systems, s.min_distance_factor
    if not fmax > 0:
        raise ValueError(f"fmax must be positive, got {fmax}")
    if int(max_steps) < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    optimizer = s.optimizer
    params = optimizer_settings(optimizer, fire=s.fire, lbfgs=s.lbfgs, bfgs=s.bfgs)
    config = s.config or StepConfig()
    check_interval = s.check_interval
    if check_interval is None:
        check_interval = config.check_interval if config.check_interval != 1 else (
            10 if torch.device(model.device).type == "cuda" else 1)
    config = replace(config, check_interval=max(1, int(check_interval)))
    if optimizer != "fire" and config.inner_skin == "auto":
        # one Verlet list: quasi-Newton step lengths jump (a step of maxstep after small ones), which the two-level
        # lists' pace-based margins do not foresee; parked steps cost L-BFGS 2-3x its model work (docs/optimizers.md)
        config = replace(config, inner_skin=None)
    checks = FailureChecks(min_distance_factor=min_distance_factor, max_volume_ratio=s.max_volume_ratio)
    any_cell = relax_cell is not False and not (isinstance(relax_cell, (bool, np.bool_)) and not relax_cell)
    integrator = get_integrator(optimizer + ("_frechet" if any_cell else ""))
    step_settings = {"fmax": float(fmax), "max_steps": int(max_steps), **params, "cell_factor": s.cell_factor}
    refusal = params["bfgs"].refusal if optimizer == "bfgs" else None
    job = _RelaxJob(relax_cell, max_steps, s.fix_symmetry, s.symprec, model.dtype, model.device, refusal=refusal)
    if total is None and hasattr(structures, "__len__") and not isinstance(structures, (str, Atoms)):
        try:
            total = len(structures)
        except TypeError:
            total = None

    threads = check_threads(s.threads)

    def generate() -> Iterator[RelaxResult]:
        with thread_limit(threads):
            yield from _generate()

    def _generate() -> Iterator[RelaxResult]:
        bar = Progress(total=total, desc="relax", unit="structure", enabled=progress,
                       outcomes=("converged", "not_converged", "failed"))
        items = iter_inputs(structures, supported_elements=supported_elements(model) or range(1, MAX_SUPPORTED_Z + 1),
                            allow_unsupported_elements=s.allow_unsupported_elements,
                            min_distance_factor=min_distance_factor, model_name=model_name(model))
        probe, known_atoms = None, None
        if max_atoms is None:  # the first structures of the stream are the capacity probe
            head = list(itertools.islice(items, PROBE_STRUCTURES))
            probe = [it.atoms for it in head if it.atoms is not None] or None
            if len(head) < PROBE_STRUCTURES:  # that was the whole input
                known_atoms = sum(len(a) for a in probe or [])
            items = itertools.chain(head, items)
        capacity = estimate_capacity(model, model.device, max_atoms=max_atoms, max_systems=max_systems,
                                     probe=probe, total_atoms=known_atoms, memory_budget_bytes=s.memory_budget_bytes)
        runner = Runner(model, integrator, step_settings, job, capacity, config, checks, observers,
                        admission_checks=FailureChecks())  # contacts: iter_inputs
        try:
            for res in runner.run(items):
                bar.finish(res.status.value if res.status.ok else "failed")
                bar.set_active(runner.n_active)
                yield res
        finally:
            bar.close()
            log.info(bar.summary())

    if stream:
        return generate()
    results = list(generate())
    results.sort(key=lambda r: r.index)
    return results


__all__ = ["BFGSParams", "Capacity", "FailureChecks", "FireParams", "LBFGSParams", "RelaxResult", "RelaxSettings",
           "estimate_capacity", "optimizer_settings", "relax_many", "run_relax"]
