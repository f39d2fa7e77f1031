"""Batched molecular dynamics: ``run_md``, the MD front-end of the one runner (:mod:`geodite_sim.runner`).

Many independent structures are packed into one padded batch and advanced together by an
integrator of the runner's registry (velocity Verlet, Nosé–Hoover chain, Langevin, ...: ASE's
equations, per-system targets and thermostat states). Steps run on the device without host
reads; at checks (every ``check_interval`` steps, default the monitors' ``check_every``) this
front-end writes frames to HDF5, runs the stability monitors, writes checkpoints and reports
progress, and the runner replaces finished systems by queued ones.

A system pauses at its frame boundaries and at its last step until the next check, so frames and
results are exactly those of a one-step-at-a-time run. See ``docs/md.md`` and ``docs/runner.md``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms, units

from geodite_sim.dynamics.velocities import maxwell_boltzmann, system_seed
from geodite_sim.dynamics.verlet import kinetic_energy, temperature
from geodite_sim.interrupt import Interrupted, deferred_interrupt
from geodite_sim.io.runs import match_runs
from geodite_sim.io.structures import MAX_SUPPORTED_Z, InputItem, iter_inputs, like_input
from geodite_sim.md_checkpoint import check_compatible, load_checkpoint, save_checkpoint, state_from_dict, state_to_dict
from geodite_sim.model.contract import model_fingerprint, model_name, supported_elements
from geodite_sim.model.strain import edge_vectors
from geodite_sim.model.torchsim_adapter import as_engine_model
from geodite_sim.monitors import Monitors, temperature_limit_factor
from geodite_sim.progress import Progress
from geodite_sim.runner import (
    REGISTRY,  # noqa: E402
    Capacity,
    FailureChecks,
    Runner,
    StepConfig,
    get_integrator,
)
from geodite_sim.runner.engine import AdmissionError, _unpad
from geodite_sim.settings import MDSettings
from geodite_sim.status import Status
from geodite_sim.threads import thread_limit

#: Admission refuses two atoms closer than this × their covalent-radius sum (whatever the monitors say).
ADMISSION_MIN_DISTANCE_FACTOR = 0.5

#: The MD entries of the runner registry (nve, nvt_nhc, nvt_langevin, nvt_bussi, npt_mtk_iso, npt_mtk).
ENSEMBLES = tuple(name for name, entry in REGISTRY.items() if entry.kind == "md")
log = logging.getLogger(__name__)
#: Settings that must match between a checkpointed run and its restart: the :class:`MDSettings` fields marked
#: ``restart`` (``ensemble_params`` stands for the registry entry's resolved parameters, e.g. NPT's pressure,
#: pdamp_fs and barostat chain), the dtype and the model. (The skin is not one: trajectories do not depend on it.)
RESTART_KEYS = (*MDSettings.restart_keys(), "dtype", "model_fingerprint")


#: Default atom budget per device type (CPU: cache-sized batches are fastest, see docs/md.md). CUDA uses
#: the memory model instead (:func:`_default_max_atoms`); the "cuda" entry serves other accelerators.
DEFAULT_MAX_ATOMS = {"cpu": 512, "cuda": 8192}


def _default_max_atoms(model, structures, max_atoms: int | None, memory_budget_bytes: float | None) -> int:
    """run_md's atom budget: ``max_atoms`` if given, else :data:`DEFAULT_MAX_ATOMS` on the CPU and, on CUDA,
    the memory model (:mod:`geodite_sim.memory`) sized to 80 % of the free device memory; capped so that a
    step's predicted peak is at most 80 % of ``memory_budget_bytes`` (bytes) when that is given. Edges per
    atom: the densest of the first inputs when ``structures`` is a list of Atoms, else dense default probes."""
    from geodite_sim.memory import device_free_bytes, memory_capacity

    device = torch.device(model.device)
    if isinstance(structures, Atoms):
        structures = [structures]
    probe = [a for a in structures[:8] if isinstance(a, Atoms)] if isinstance(structures, (list, tuple)) else None
    if max_atoms is None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            max_atoms = memory_capacity(model, device_free_bytes(device), probe, device=device)
        else:
            max_atoms = DEFAULT_MAX_ATOMS.get(device.type, DEFAULT_MAX_ATOMS["cuda"])
    if memory_budget_bytes is not None:
        max_atoms = min(max_atoms, memory_capacity(model, memory_budget_bytes, probe, device=device))
    return int(max_atoms)


@dataclass
class MDResult:
    """Outcome of one input structure.

    Attributes:
        index: position in the input stream.
        final: the structure after its last step, same type as the input (ASE Atoms carry momenta
            and a single-point calculator with energy and forces); None if it never started.
        n_steps: steps taken.
        error: None, or why the system stopped early / could not start.
        trajectory: ``(file, group)`` of its HDF5 frames, when a trajectory was written.
        label: the input's label (file name or "index:formula").
        energy: potential energy at the last step, eV.
        temperature: temperature at the last step, K.
        status: :class:`~geodite_sim.status.Status` (done, or why it stopped / could not start).
        warnings: admission warnings.
    """

    index: int
    final: Any
    n_steps: int
    error: str | None
    trajectory: tuple[str, str] | None = None
    label: str = ""
    energy: float | None = None
    temperature: float | None = None
    status: Status = Status.DONE
    warnings: list = field(default_factory=list)


def _per_structure(value, index: int, name: str):
    """A float/int setting, or the ``index``-th entry of a per-structure sequence."""
    if value is None or isinstance(value, (int, float, np.integer, np.floating)):
        return value
    try:
        return value[index]
    except (IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"{name} has no entry for structure {index}") from exc



class _CountedItems:
    """Iterator over InputItems that remembers the index after the last one handed out."""

    def __init__(self, items, next_index: int = 0):
        self._items = items
        self.next_index = next_index

    def __iter__(self):
        return self

    def __next__(self) -> InputItem:
        item = next(self._items)
        self.next_index = item.index + 1
        return item


def run_md(
    structures,
    model=None,
    ensemble: str = "nvt_nhc",
    temperature: float | Sequence[float] | None = None,
    timestep: float = 1.5,
    steps: int | Sequence[int] = 1000,
    trajectory: str | Path | None = None,
    *,
    frame_every: int = 10,
    tdamp: float | None = None,
    chain_length: int | None = None,
    tloop: int = 1,
    friction: float = 0.01,
    fix_com: bool = False,
    seed: int = 0,
    max_atoms: int | None = None,
    skin: float | None = None,
    monitors: Monitors | bool | None = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    restart: bool = False,
    progress: bool = True,
    save_momenta: bool = False,
    memory_budget_bytes: float | None = None,
    accelerate: str = "auto",
    config: StepConfig | None = None,
    observers: Sequence = (),
    executor=None,
    allow_unsupported_elements: bool = False,
    threads: int | None = None,
    **ensemble_params,
) -> list[MDResult]:
    """Run molecular dynamics on many structures at once; one :class:`MDResult` per input, in input order.

    Args:
        structures: ASE Atoms, pymatgen structures, file paths, or any iterable of them (streamed).
            Initial momenta are taken from the input when it has them (ASE ``momenta``), otherwise drawn
            from Maxwell–Boltzmann at ``temperature`` with zero total momentum, seeded by (``seed``, index).
            An input Atoms' ``FixAtoms``/``FixCartesian`` constraints are honoured in NVE/NVT (fixed
            components do not move, temperatures count the free degrees of freedom; docs/constraints.md);
            constraints MD cannot honour (NPT, FixSymmetry, other classes) are that input's error.
        model: any model of the contract (docs/model-contract.md); None loads the packaged default.
            The model's dtype and device are used.
        ensemble: a registered MD integrator: ``"nve"`` (velocity Verlet), ``"nvt_nhc"`` (Nosé–Hoover chain,
            ASE's ``NoseHooverChainNVT``), ``"nvt_langevin"`` (ASE's ``Langevin``), and any others registered
            (:data:`geodite_sim.runner.REGISTRY`).
        temperature: target temperature, K — a float, one value per input (indexed by input index), or N
            values for a single structure (a sweep: N runs of it). Lists of another length are refused before
            anything runs (:func:`geodite_sim.io.runs.match_runs`; ``steps`` and per-structure ensemble
            parameters such as ``pressure`` follow the same rule). Required for NVT; for NVE it only sets the
            initial velocities.
        timestep: fs.
        steps: steps per structure (an int or one per input).
        trajectory: HDF5 file for frames (``/systems/<index>/...``); None writes none.
        frame_every: write a frame every this many steps of a system (plus its first and last).
        tdamp: thermostat damping time, fs (default 100 × timestep; Bussi's ``taut``).
        chain_length: thermostats per chain (default 10 for ``nvt_nhc`` as the paper's protocol, ASE's 3 for the
            NPT ensembles). tloop: NHC sub-steps (ASE's default 1).
        friction: Langevin friction, 1/fs (ASE's ``friction`` is in 1/ASE-time: ``friction / units.fs``).
        fix_com: Langevin: ASE's deprecated ``fixcm=True`` behaviour, per system.
        seed: run seed; per-structure seeds derive from (seed, input index).
        max_atoms: atom budget of the packed batch (systems beyond it wait in the queue). Default:
            on the CPU :data:`DEFAULT_MAX_ATOMS`; on CUDA the memory model (docs/memory-model.md)
            at 80 % of the free device memory; a restart reuses the checkpointed run's value.
        skin: Verlet neighbour-list skin, Å (default 0.5). On the CPU a check every step filters the list
            searched at this skin into a tight one (two-level lists, docs/runner.md: every stored edge beyond the
            cutoff costs model time there); elsewhere checks are every ``check_every`` steps. Results do not
            depend on it.
        monitors: :class:`~geodite_sim.monitors.Monitors` thresholds; True for the defaults, False/None for
            the NaN/Inf check only. ``monitors.check_every`` is the check interval (host reads).
        checkpoint: checkpoint file (default ``<trajectory>.ckpt`` when ``checkpoint_every`` is set).
        checkpoint_every: engine steps between checkpoints; None writes none.
        restart: continue from ``checkpoint`` when it exists (same inputs, settings and model), appending to
            the trajectory; without a checkpoint file the run starts afresh.
        progress: show a progress bar (system-steps, ETA, ns/day per system, atom-steps/s).
        save_momenta: also store momenta in the trajectory.
        memory_budget_bytes: bytes one model step may use on any device; caps ``max_atoms``.
        accelerate: ``"auto"`` (the whole step captured in a CUDA graph on CUDA, eager elsewhere), ``"off"``,
            ``"eager"``, ``"compile"`` (``torch.compile(fullgraph=True)`` of the step) or ``"cuda_graph"``.
        config: engine settings (:class:`~geodite_sim.runner.StepConfig`); ``skin``/``accelerate`` override it.
        observers: objects with optional ``on_check(event)`` / ``on_result(result)`` / ``on_close()`` hooks
            (:class:`~geodite_sim.runner.CheckEvent`: steps, iteration, n_systems, n_atoms).
        executor: run elsewhere (e.g. :class:`geodite_sim.executors.RayExecutor`); None runs in this process.
        allow_unsupported_elements: run structures with elements outside the model's set (warning recorded).
        threads: CPU threads of this call (None: torch's setting, i.e. ``OMP_NUM_THREADS`` or one per core;
            :mod:`geodite_sim.threads`; warns once when the machine is oversubscribed). Ray workers use their own.
        ensemble_params: parameters of other registered ensembles. NPT (``npt_mtk_iso`` = ASE's
            ``IsotropicMTKNPT``, ``npt_mtk`` = ``MTKNPT``): ``pressure`` (GPa, one value or one per input; default 0),
            ``pdamp`` (fs, default 1000 × timestep, ASE's suggestion), ``barostat_chain_length`` (3), ``ploop`` (1).
    """
    settings = MDSettings(
        ensemble=ensemble, temperature=temperature, timestep=timestep, steps=steps, trajectory=trajectory,
        frame_every=frame_every, tdamp=tdamp, chain_length=chain_length, tloop=tloop, friction=friction,
        fix_com=fix_com, seed=seed, max_atoms=max_atoms, skin=skin, monitors=monitors, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, restart=restart, save_momenta=save_momenta,
        memory_budget_bytes=memory_budget_bytes, accelerate=accelerate, config=config, observers=tuple(observers),
        allow_unsupported_elements=allow_unsupported_elements, threads=threads, ensemble_params=dict(ensemble_params))
    structures, _ = match_runs(structures, {"temperature": temperature, "steps": steps, **ensemble_params})
    if executor is not None:
        return executor.run_md(structures, model, settings, progress=progress)
    return run_md_settings(structures, model, settings, progress=progress)


def run_md_settings(structures, model, settings: MDSettings, *, progress: bool = True) -> list[MDResult]:
    """:func:`run_md` in this process with its settings as one :class:`~geodite_sim.settings.MDSettings` (what the
    executors run)."""
    if model is None:
        from geodite_sim.model import load_model

        model = load_model()
    model = as_engine_model(model)  # a torch-sim ModelInterface runs behind TorchSimAdapter
    job = _MDJob(structures, model, settings, progress)
    with thread_limit(settings.threads):
        return job.run()


class _MDJob:
    """One run_md call: settings, the runner's hooks (per-structure settings, frames, monitors, checkpoints,
    results) and the loop around the runner."""

    def __init__(self, structures, model, settings: MDSettings, progress: bool = True):
        st = settings
        ensemble, temperature, timestep, steps, trajectory = st.ensemble, st.temperature, st.timestep, st.steps, \
            st.trajectory
        frame_every, tdamp, chain_length, tloop, friction = st.frame_every, st.tdamp, st.chain_length, st.tloop, \
            st.friction
        fix_com, seed, max_atoms, skin, monitors, checkpoint = st.fix_com, st.seed, st.max_atoms, st.skin, \
            st.monitors, st.checkpoint
        checkpoint_every, restart, save_momenta, accelerate, config = st.checkpoint_every, st.restart, \
            st.save_momenta, st.accelerate, st.config
        ensemble_params = dict(st.ensemble_params)
        self.md_settings = st
        self.integrator = get_integrator(ensemble)
        if self.integrator.kind != "md":
            raise ValueError(f"{ensemble!r} is an optimiser, not an MD ensemble; use relax_many")
        if not timestep > 0:
            raise ValueError("timestep must be positive (fs)")
        if ensemble != "nve" and temperature is None:
            raise ValueError(f"ensemble {ensemble!r} needs a temperature")
        if frame_every < 1:
            raise ValueError("frame_every must be >= 1")
        self.structures = structures
        self.model = model
        self.dtype, self.device = model.dtype, torch.device(model.device)
        self.ensemble = ensemble
        self.temperature = temperature
        self.steps = steps
        self.timestep_fs = float(timestep)
        self.tdamp_fs = float(tdamp) if tdamp is not None else 100.0 * float(timestep)
        self.seed = int(seed)
        self.frame_every = int(frame_every)
        if monitors is True:
            monitors = Monitors()
        elif monitors is False or monitors is None:
            monitors = Monitors(None, None, None, max_volume_ratio=None)
        if self.integrator.conserved is None:  # no conserved quantity (Langevin): no drift check
            monitors = replace(monitors, max_drift=None)
        self.monitors = monitors
        self.trajectory = None if trajectory is None else str(trajectory)
        if checkpoint_every is not None and checkpoint is None:
            if self.trajectory is None:
                raise ValueError("checkpoint_every needs a checkpoint path (or a trajectory to name it after)")
            checkpoint = self.trajectory + ".ckpt"
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
        self.restart = restart
        self.progress_enabled = progress
        self.save_momenta = save_momenta
        self.allow_unsupported = st.allow_unsupported_elements
        self.observers = list(st.observers)
        if max_atoms is None and restart and self.checkpoint is not None and os.path.exists(self.checkpoint):
            max_atoms = int(load_checkpoint(self.checkpoint)["settings"]["max_atoms"])  # the run's own capacity
        max_atoms = _default_max_atoms(model, structures, max_atoms, st.memory_budget_bytes)
        self.capacity = Capacity(max_atoms=int(max_atoms))
        # Checks: every step on the CPU (a host read costs nothing there, and a check rebuilds a system's edges
        # before it outruns its skin, so no step is wasted); on accelerators every ``check_every`` steps (at most
        # ``frame_every``). The monitors run every ``check_every`` steps either way.
        self.monitor_every = max(1, int(monitors.check_every))
        if self.device.type == "cpu":
            interval = 1
        else:
            interval = max(1, min(self.monitor_every, self.frame_every if self.trajectory else 10**9))
        base = config or StepConfig()
        if skin is None:  # on the CPU the two-level lists (on for skin >= 0.3 there) keep the step's list tight
            skin = 0.5
        if float(skin) == 0.0:  # "rebuild the list every step" (e.g. the speed protocol): a check every step rebuilds
            base = replace(base, rebuild_every_check=True)  # every system; the small skin covers the step itself
            interval, skin = 1, 0.1
        self.config = replace(base, skin=float(skin), accelerate=accelerate, check_interval=interval)
        defaults = dict(self.integrator.defaults)
        if chain_length is None:
            chain_length = int(defaults.get("chain_length", 10))
        self.per_system_values = {k: ensemble_params.pop(k, defaults.get(k))
                                  for k in self.integrator.per_system_params}
        pdamp = ensemble_params.pop("pdamp", None)
        pdamp_fs = float(pdamp) if pdamp is not None else defaults.get("pdamp_factor", 1000.0) * float(timestep)
        unknown = set(ensemble_params) - {"barostat_chain_length", "ploop"}
        if unknown:
            raise TypeError(f"run_md got unexpected keyword argument(s) {sorted(unknown)} for ensemble {ensemble!r}")
        self.run_settings = {"dt": float(timestep) * units.fs, "tdamp_fs": self.tdamp_fs,
                             "chain_length": int(chain_length), "tloop": int(tloop),
                             "friction_per_fs": float(friction), "fix_com": bool(fix_com), "pdamp_fs": pdamp_fs,
                             "barostat_chain_length": int(ensemble_params.get(
                                 "barostat_chain_length", defaults.get("barostat_chain_length", 3))),
                             "ploop": int(ensemble_params.get("ploop", defaults.get("ploop", 1)))}
        ensemble_params = {k: v for k, v in self.run_settings.items()
                           if k in ("pdamp_fs", "barostat_chain_length", "ploop")} if self.integrator.variable_cell \
            else {}
        ensemble_params.update({k: v for k, v in self.per_system_values.items()})
        self.settings = dict(
            ensemble=ensemble, timestep_fs=self.timestep_fs, tdamp_fs=self.tdamp_fs, chain_length=int(chain_length),
            tloop=int(tloop), friction_per_fs=float(friction), fix_com=bool(fix_com), seed=self.seed,
            frame_every=self.frame_every, skin=float(skin), max_atoms=int(max_atoms), dtype=str(self.dtype),
            checkpoint_every=self.checkpoint_every, model_name=model_name(model),
            model_fingerprint=model_fingerprint(model), **{k: _plain(v) for k, v in ensemble_params.items()},
        )
        self.restart_keys = tuple(k for key in RESTART_KEYS
                                  for k in (sorted(ensemble_params) if key == "ensemble_params" else [key]))
        self.results: dict[int, MDResult] = {}
        self.result_data: dict[int, dict] = {}
        self.writer = None
        self.last_frame: dict[int, int] = {}  # input index -> step of its last frame
        self.next_checkpoint = self.checkpoint_every
        self.t_limit: dict[int, float] = {}  # input index -> temperature-runaway factor for its size
        self._last_monitor = -1

    # ------------------------------------------------------------------ runner hooks
    def per_system(self, items: list[InputItem]) -> dict:
        """Per-structure MD settings of newly admitted systems (ValueError names the bad one)."""
        momenta, kT, target, seeds, constraints = [], [], [], [], []
        for it in items:
            c = self._constraints(it)
            constraints.append(c)
            T = _per_structure(self.temperature, it.index, "temperature")
            n_steps = int(_per_structure(self.steps, it.index, "steps"))
            if n_steps < 0:
                raise ValueError(f"negative number of steps {n_steps}")
            if self.ensemble != "nve" and T is None:
                raise ValueError("no target temperature")
            if T is not None and not (math.isfinite(float(T)) and float(T) >= 0):
                raise ValueError(f"invalid temperature {T!r} K")
            if it.atoms.has("momenta"):
                p = it.atoms.get_momenta()
                if not np.isfinite(p).all():
                    raise ValueError("non-finite momenta")
                momenta.append(np.where(c.fixed_pre | c.fixed_post, 0.0, p) if c is not None else p)
            else:
                momenta.append(maxwell_boltzmann(it.atoms, float(T or 0.0), self.seed, it.index))
            if self.integrator.variable_cell and not it.atoms.pbc.all():
                raise AdmissionError(Status.INVALID_STRUCTURE, f"{self.ensemble} needs a fully periodic cell "
                                     f"(pbc={it.atoms.pbc.tolist()})")
            if self.ensemble == "nvt_bussi" and not np.any(momenta[-1]):
                raise AdmissionError(Status.INVALID_SETTINGS, "Bussi needs a non-zero initial kinetic energy "
                                     "(give a temperature > 0 K or momenta), as ASE's Bussi")
            kT.append(units.kB * float(T or 0.0))
            target.append(n_steps)
            seeds.append(system_seed(self.seed, it.index))
            # the runaway limit is relative to the target, or to the starting temperature when that is higher (a
            # start hotter than the target cools down: not a runaway), at most twice the target
            p, m = momenta[-1], it.atoms.get_masses()
            dof = 3 * len(m) - (c.removed_dof if c is not None else 0)
            t0 = float((p * p / m[:, None]).sum() / (max(dof, 1) * units.kB))
            boost = min(2.0, max(1.0, t0 / float(T))) if T else 1.0
            self.t_limit[it.index] = boost * temperature_limit_factor(self.monitors, len(it.atoms), dof)
        t = dict(dtype=self.dtype, device=self.device)
        extra = {}
        for key, value in self.per_system_values.items():
            values = [_per_structure(value, it.index, key) for it in items]
            if any(v is None or not math.isfinite(float(v)) for v in values):
                raise ValueError(f"invalid {key} {values}")
            extra[key] = torch.as_tensor([float(v) for v in values], **t)
        if any(c is not None for c in constraints):
            from geodite_sim.dynamics.constraints import AtomConstraints, BatchConstraints

            extra["constraints"] = BatchConstraints.from_list(
                [c if c is not None else AtomConstraints.none(len(it.atoms)) for c, it in zip(constraints, items)],
                self.dtype, self.device)
        return {**extra, "momenta": torch.as_tensor(np.concatenate(momenta), **t), "kT": torch.as_tensor(kT, **t),
                "step": torch.zeros(len(items), dtype=torch.long, device=self.device),
                "target_steps": torch.as_tensor(target, dtype=torch.long, device=self.device),
                "seed": torch.as_tensor(seeds, dtype=torch.long, device=self.device)}

    def _constraints(self, it: InputItem):
        """The input's FixAtoms/FixCartesian as an AtomConstraints (None: unconstrained); AdmissionError names
        a constraint MD cannot honour."""
        if not it.atoms.constraints:
            return None
        from geodite_sim.dynamics.constraints import constraints_from_atoms

        names = ", ".join(type(c).__name__ for c in it.atoms.constraints)
        if self.integrator.variable_cell:
            raise AdmissionError(Status.INVALID_STRUCTURE, f"constraints ({names}) are not supported by "
                                 f"{self.ensemble} (ASE's MTK NPT refuses them too); remove them or use an NVT "
                                 "ensemble")
        c = constraints_from_atoms(it.atoms)
        if isinstance(c, str):
            raise AdmissionError(Status.INVALID_STRUCTURE, c.replace("relax this structure", "run this structure"))
        if c.has_symmetry:
            raise AdmissionError(Status.INVALID_STRUCTURE, "FixSymmetry is honoured in relaxations only "
                                 "(relax_many); remove it to run MD")
        return c

    def horizon(self, runner: Runner, horizon: torch.Tensor, new_slots: list[int]) -> torch.Tensor:
        """Steps each slot may reach before the next check: its next frame boundary or its target."""
        state = runner.state
        steps = state.step
        fe = self.frame_every if self.writer is not None else 1 << 62
        nxt = (torch.div(steps, fe, rounding_mode="floor") + 1) * fe
        return torch.minimum(nxt, state.target_steps)

    def on_admit(self, runner: Runner, slots: list[int]) -> None:
        """Trajectory groups and step-0 frames of newly started systems."""
        state = runner.state
        if self.writer is None:
            for s in slots:
                self.last_frame[runner.items[s].index] = 0
            return
        kT = state.kT.cpu().numpy()
        target = state.target_steps.cpu().numpy()
        seeds = state.seed.cpu().numpy()
        for s in slots:
            item = runner.items[s]
            atoms = item.atoms
            self.writer.add_system(item.index, atoms.numbers, atoms.get_masses(), atoms.pbc, {
                "index": item.index, "label": item.label, "formula": atoms.get_chemical_formula(),
                "n_atoms": len(atoms), "temperature_K": float(kT[s] / units.kB), "target_steps": int(target[s]),
                "seed": int(seeds[s]), "n_steps": 0,
            })
        self._frames(runner, slots, self._observables(state))

    def at_check(self, runner: Runner, host: dict) -> dict[int, tuple[Status, str]]:
        """Frames at boundaries and last steps, monitors, progress, checkpoints; returns monitor failures."""
        state = runner.state
        steps = host["steps"]
        failures: dict[int, tuple[Status, str]] = {}
        obs = None
        occupied = [s for s, it in enumerate(runner.items) if it is not None]
        target_h = state.target_steps[: len(runner.items)].cpu().numpy()
        due = runner.iteration // self.monitor_every != self._last_monitor or any(
            int(steps[s]) >= int(target_h[s]) or host["code"][s] != 0 for s in occupied)
        if occupied and due:
            self._last_monitor = runner.iteration // self.monitor_every
            obs = self._observables(state)
            failures = self._monitor(runner, state, obs, occupied, steps)
        target = target_h
        framed = []
        for s in occupied:
            index = runner.items[s].index
            st = int(steps[s])
            if st == self.last_frame.get(index, -1):
                continue
            failed = s in failures or host["code"][s] != 0
            if st % self.frame_every == 0 or st >= target[s] or failed:
                framed.append(s)
        if framed:
            self._frames(runner, framed, obs if obs is not None else self._observables(state))
        self._bar.advance(runner, steps, occupied)
        runner.slots.horizon = self.horizon(runner, runner.slots.horizon, [])
        self._failed_now = failures
        return failures

    def result(self, item: InputItem, one, status: Status | None, message: str | None) -> MDResult:
        n_steps = int(one.step[0])
        if status is None:
            status = Status.DONE
        if status.ok:
            error = None
        else:
            error = message if message.startswith("stopped") else f"stopped at step {n_steps}: {message}"
            error = f"{item.label}: {error}"
        temp = float(temperature(one)[0])
        data = {"index": item.index, "label": item.label, "started": True, "error": error, "status": status.value,
                "n_steps": n_steps, "positions": one.positions.detach().cpu().clone(),
                "cell": one.cell[0].detach().cpu().clone(),
                "momenta": one.momenta.detach().cpu().clone(), "forces": one.forces.detach().cpu().clone(),
                "energy": float(one.energy[0]), "temperature": temp,
                "group": self.writer.group_name(item.index) if self.writer and self._has_group(item.index) else None}
        if self.writer is not None and self._has_group(item.index):
            self.writer.flush([item.index])
            self.writer.set_attrs(item.index, status="failed" if error else "done", error=error, n_steps=n_steps)
        self.result_data[item.index] = data
        res = self._make_result(item, data)
        self.results[item.index] = res
        self._bar.finish("done" if status.ok else "failed")
        return res

    def _has_group(self, index: int) -> bool:
        """Whether system ``index`` has a trajectory group (it has none when it failed at admission)."""
        return self.writer is not None and index in self.writer.written()

    def rejected(self, item: InputItem, status: Status, message: str) -> MDResult:
        if not message.startswith(item.label):
            message = f"{item.label}: {message}"
        self.result_data[item.index] = {"index": item.index, "label": item.label, "error": message,
                                        "status": Status(status).value, "started": False}
        res = MDResult(item.index, None, 0, message, None, item.label, status=Status(status),
                       warnings=list(getattr(item, "warnings", None) or []))
        self.results[item.index] = res
        self._bar.finish("failed")
        return res

    # ------------------------------------------------------------------ physics on the host's schedule
    def _observables(self, state) -> dict[str, torch.Tensor]:
        ke = kinetic_energy(state)
        conserved = self.integrator.conserved
        return {"kinetic_energy": ke, "temperature": temperature(state, ke),
                "conserved": conserved(state) if conserved is not None else state.energy + ke}

    def _monitor(self, runner: Runner, state, obs: dict, occupied: list[int], steps) -> dict:
        m = self.monitors
        edges = runner.edges.masked(state.positions, state.cell, state.system_index) if runner.edges else None
        vec = None
        if m.min_distance_factor is not None and edges is not None:
            vec = edge_vectors(state.positions, state.cell, state.system_index, edges)
            pad_atom = state.positions.shape[0] - 1  # padding edges (an atom's own images are real edges)
            vec = torch.where((edges.receiver == pad_atom)[:, None], torch.full_like(vec, 1e9), vec)
        limit = torch.ones(state.cell.shape[0], dtype=self.dtype, device=self.device)
        for s in occupied:
            limit[s] = self.t_limit.get(runner.items[s].index, 4.0)
        values = m.check(state.positions, state.momenta, state.forces, state.energy, state.batch.numbers,
                         state.system_index, state.batch.atoms_per_system, obs["temperature"], state.kT,
                         obs["conserved"], state.conserved0, vec, None if edges is None else edges.receiver,
                         None if edges is None else edges.sender, temperature_factor=limit)
        code = values["code"].cpu().numpy()
        failures = {}
        if (code[occupied] != 0).any():
            host = {k: v.detach().cpu().numpy() for k, v in values.items()}
            for s in occupied:
                if code[s] != 0:
                    status = _monitor_status(int(code[s]))
                    failures[s] = (status, m.describe(int(code[s]), host, s, int(steps[s])))
        if self.integrator.variable_cell and m.max_volume_ratio is not None:  # NPT: the volume per system
            from geodite_sim.model.strain import cell_volumes

            r = m.max_volume_ratio
            ratio = (cell_volumes(state.cell) / runner.slots.volume0).cpu().numpy()
            for s in occupied:
                if s not in failures and not (1.0 / r <= ratio[s] <= r):
                    failures[s] = (Status.VOLUME, f"stopped at step {int(steps[s])}: volume "
                                   f"{'blow-up' if ratio[s] > 1 else 'collapse'}, V/V0 = {ratio[s]:.3g} outside "
                                   f"[1/{r:g}, {r:g}]")
        return failures

    def _frames(self, runner: Runner, slots: list[int], obs: dict[str, torch.Tensor]) -> None:
        """Buffer a frame of every system slot in ``slots`` (one device-to-host copy)."""
        if not slots:
            return
        state = runner.state
        steps = state.step.cpu().numpy()
        for s in slots:
            self.last_frame[runner.items[s].index] = int(steps[s])
        if self.writer is None:
            return
        pos = state.positions.detach().cpu().numpy()
        cell = state.cell.detach().cpu().numpy()
        mom = state.momenta.detach().cpu().numpy() if self.save_momenta else None
        energy = state.energy.detach().cpu().numpy()
        host = {k: v.detach().cpu().numpy() for k, v in obs.items()}
        offsets = state.batch.offsets.cpu().numpy()
        for s in slots:
            a, b = offsets[s], offsets[s + 1]
            frame = {"positions": pos[a:b], "cell": cell[s], "energy": energy[s], "step": steps[s],
                     **{k: v[s] for k, v in host.items()}}
            if mom is not None:
                frame["momenta"] = mom[a:b]
            self.writer.add_frame(runner.items[s].index, frame)

    def _make_result(self, item: InputItem, data: dict) -> MDResult:
        status = Status(data.get("status") or ("done" if not data.get("error") else "non_finite"))
        if not data.get("started", True):
            return MDResult(item.index, None, 0, data["error"], None, item.label, status=status)
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = item.atoms.copy()
        atoms.positions = data["positions"].double().numpy()
        if data.get("cell") is not None:  # NPT changes the cell
            atoms.set_cell(data["cell"].double().numpy(), scale_atoms=False, apply_constraint=False)
        atoms.set_momenta(data["momenta"].double().numpy(), apply_constraint=False)
        atoms.calc = SinglePointCalculator(atoms, energy=float(data["energy"]), forces=data["forces"].double().numpy())
        group = data.get("group")
        return MDResult(item.index, like_input(item.original, atoms), int(data["n_steps"]), data["error"],
                        None if not group else (self.trajectory, group), item.label, float(data["energy"]),
                        float(data["temperature"]), status=status,
                        warnings=list(getattr(item, "warnings", None) or []))

    # ------------------------------------------------------------------ checkpoints
    def _attrs(self) -> dict:
        import ase
        import h5py

        import geodite_sim

        versions = {"geodite_sim": geodite_sim.__version__, "torch": torch.__version__, "numpy": np.__version__,
                    "h5py": h5py.__version__, "ase": ase.__version__}
        return {**self.settings, "model_checksum": self.settings["model_fingerprint"], "versions": versions,
                "created_by": "geodite_sim.run_md", "time_unit": "fs",
                "conserved": self.integrator.conserved_label}

    def _next_index(self, runner: Runner) -> int:
        pending = runner._pending
        return pending.index if pending is not None else self.items.next_index

    def save_checkpoint(self, runner: Runner, reload: bool = False) -> None:
        """Write the checkpoint; ``reload``: then rebuild the runner from it, as a restart does (so the run goes on
        exactly as a run restarted from this checkpoint would)."""
        if self.writer is not None:
            self.writer.flush()
        active = [s for s, it in enumerate(runner.items) if it is not None]
        state = _unpad(runner.state, active) if active else None
        saved = state_to_dict(state)
        payload = {
            "settings": self.settings, "iteration": runner.iteration, "state": saved,
            "freed": runner._freed, "last_monitor": self._last_monitor,
            "active": [runner.items[s].index for s in active], "labels": [runner.items[s].label for s in active],
            "next_index": self._next_index(runner), "results": list(self.result_data.values()),
            "frames": [[k, v] for k, v in (self.writer.written().items() if self.writer else [])],
            "last_frame": [[k, v] for k, v in self.last_frame.items()],
            "t_limit": [[k, float(v)] for k, v in self.t_limit.items()],
        }
        save_checkpoint(self.checkpoint, payload)
        if reload and active:
            runner.restore([runner.items[s] for s in active], state_from_dict(saved, self.device), runner._freed)

    def _restore(self, runner: Runner, ckpt: dict, stream) -> None:
        next_index = int(ckpt["next_index"])
        seen: dict[int, InputItem] = {}
        for _ in range(next_index):
            try:
                item = next(stream)
            except StopIteration:
                raise ValueError(f"cannot restart: the checkpoint has started {next_index} inputs, "
                                 f"but only {len(seen)} were given") from None
            seen[item.index] = item
        active = []
        for index, label in zip(ckpt["active"], ckpt["labels"]):
            item = seen[index]
            if item.label != label or item.atoms is None:
                raise ValueError(f"cannot restart: input {index} is {item.label!r}, the checkpoint has {label!r}")
            active.append(item)
            self.t_limit[index] = temperature_limit_factor(self.monitors, len(item.atoms))
        for data in ckpt["results"]:
            self.result_data[data["index"]] = data
            self.results[data["index"]] = self._make_result(seen[data["index"]], data)
        self.last_frame = {int(k): int(v) for k, v in ckpt.get("last_frame", [])}
        self.t_limit.update({int(k): float(v) for k, v in ckpt.get("t_limit", [])})
        self.items = _CountedItems(stream, next_index)
        runner.iteration = int(ckpt["iteration"])
        self._last_monitor = int(ckpt.get("last_monitor", -1))
        if ckpt["state"] is not None:
            runner.restore(active, state_from_dict(ckpt["state"], self.device), int(ckpt.get("freed", 0)))
        if self.checkpoint_every:
            self.next_checkpoint = (runner.iteration // self.checkpoint_every + 1) * self.checkpoint_every

    # ------------------------------------------------------------------ the loop
    def prepare(self) -> Runner:
        """The runner of this job, restored from the checkpoint on a restart (nothing admitted yet otherwise)."""
        ckpt = None
        if self.restart and self.checkpoint is not None and os.path.exists(self.checkpoint):
            ckpt = load_checkpoint(self.checkpoint)
            check_compatible(ckpt["settings"], self.settings, self.restart_keys)
        elements = supported_elements(self.model) or range(1, MAX_SUPPORTED_Z + 1)
        stream = iter_inputs(self.structures, supported_elements=elements,
                             allow_unsupported_elements=self.allow_unsupported, model_name=model_name(self.model),
                             min_distance_factor=ADMISSION_MIN_DISTANCE_FACTOR)
        float_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        runner = Runner(self.model, self.integrator, self.run_settings, self, self.capacity, self.config,
                        FailureChecks(), self.observers, admission_checks=FailureChecks())  # contacts: iter_inputs
        self._bar = _MDProgress(self, enabled=self.progress_enabled)
        if ckpt is None:
            self.items = _CountedItems(stream)
            if self.trajectory is not None:
                self.writer = _open_writer(self.trajectory, self._attrs(), None, float_dtype, self.save_momenta)
        else:
            if self.trajectory is not None:
                if not os.path.exists(self.trajectory):
                    raise FileNotFoundError(f"cannot restart: trajectory {self.trajectory} is missing")
                frames = {int(k): int(v) for k, v in ckpt["frames"]}
                self.writer = _open_writer(self.trajectory, self._attrs(), frames, float_dtype, self.save_momenta)
            self._restore(runner, ckpt, stream)
            if self.writer is not None:
                for item in runner.items:
                    if item is not None:
                        self.writer.set_attrs(item.index, status="running", error="")
        runner.queue = self.items
        return runner

    def run(self) -> list[MDResult]:
        with deferred_interrupt() as stop:
            return self._run(stop)

    def _interrupt(self, runner: Runner) -> None:
        """Ctrl-C at a check: checkpoint (when the run has one), mark running systems ``interrupted`` at their
        step, then stop (:class:`~geodite_sim.interrupt.Interrupted`)."""
        if self.checkpoint is not None and self.checkpoint_every is not None:
            self.save_checkpoint(runner)
        if self.writer is not None and runner.state is not None:
            steps = runner.state.step.cpu().numpy()
            for s, item in enumerate(runner.items):
                if item is not None and self._has_group(item.index):
                    self.writer.set_attrs(item.index, status="interrupted", n_steps=int(steps[s]),
                                          error="interrupted (Ctrl-C)")
        raise Interrupted("md run interrupted")

    def _run(self, stop) -> list[MDResult]:
        runner = None
        try:
            runner = self.prepare()
            for obs in self.observers:
                if hasattr(obs, "on_start"):
                    obs.on_start(runner)
            while True:
                runner.check()
                if self.checkpoint is not None and self.checkpoint_every is not None \
                        and runner.iteration >= self.next_checkpoint:
                    self.save_checkpoint(runner, reload=True)
                    while self.next_checkpoint <= runner.iteration:
                        self.next_checkpoint += self.checkpoint_every
                    if not stop.requested:
                        continue  # a restart checks first: so does this run, from the same rebuilt runner
                if stop.requested:
                    self._interrupt(runner)
                if runner.state is None:
                    if runner.exhausted:
                        break
                    continue
                runner.advance(runner.block_length())
            if self.checkpoint is not None and self.checkpoint_every is not None:
                self.save_checkpoint(runner)
        finally:
            for obs in self.observers:
                if hasattr(obs, "on_close"):
                    obs.on_close()
            if getattr(self, "_bar", None) is not None:
                self._bar.close()
            if self.writer is not None:
                self.writer.close()
        log.info(self._bar.summary())
        return [self.results[i] for i in sorted(self.results)]


def md_job(structures, model=None, ensemble: str = "nvt_nhc", temperature=None, timestep: float = 1.5,
           steps=1000, trajectory=None, progress: bool = False, **kwargs) -> _MDJob:
    """The job ``run_md`` would run with these arguments (for tests and benchmarks: ``job.prepare()`` gives its
    runner; ``runner.check()`` admits, ``runner.advance(n)`` steps)."""
    if model is None:
        from geodite_sim.model import load_model

        model = load_model()
    settings = MDSettings.from_kwargs(ensemble=ensemble, temperature=temperature, timestep=timestep, steps=steps,
                                      trajectory=trajectory, **kwargs)
    structures, _ = match_runs(structures, {"temperature": temperature, "steps": steps,
                                            **settings.ensemble_params})
    return _MDJob(structures, model, settings, progress)


def _plain(v):
    """A JSON-able copy of a setting (lists for arrays/tensors)."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _monitor_status(code: int) -> Status:
    from geodite_sim.monitors import CONTACT, DRIFT, NAN, TEMPERATURE

    if code & NAN:
        return Status.NON_FINITE
    if code & TEMPERATURE:
        return Status.TEMPERATURE
    if code & CONTACT:
        return Status.ATOMS_TOO_CLOSE
    if code & DRIFT:
        return Status.DRIFT
    return Status.NON_FINITE


def _open_writer(path, attrs, frames, float_dtype, save_momenta):
    """Open the HDF5 writer (imported lazily so ``import geodite_sim`` does not need h5py)."""
    from geodite_sim.trajectory import TrajectoryWriter

    return TrajectoryWriter(path, attrs, restart_frames=frames, float_dtype=float_dtype, save_momenta=save_momenta)


class _MDProgress(Progress):
    """MD progress: a bar over system-steps (all inputs' steps when their number is known, so a one-structure
    run shows its own step progress and ETA), with structures done/failed, active systems, steps/s, ns/day per
    system and atom-steps/s from host-side counters read at checks."""

    def __init__(self, job: _MDJob, enabled: bool):
        s = job.structures
        n = len(s) if hasattr(s, "__len__") and not isinstance(s, (str, Atoms)) else None
        total_steps = None
        if n is not None:
            steps = job.steps
            total_steps = int(steps) * n if isinstance(steps, (int, np.integer)) else (
                int(sum(steps)) if hasattr(steps, "__len__") and len(steps) == n else None)
        super().__init__(total=total_steps, desc=f"md {job.ensemble}", unit="step", enabled=enabled,
                         outcomes=("done", "failed"))
        self.n_inputs = n
        self.timestep_fs = job.timestep_fs
        self.iters = 0
        self.atom_steps = 0
        self.system_steps = 0
        self._seen: dict[int, int] = {}

    def finish(self, outcome: str, n: int = 1) -> None:
        """``n`` structures finished with ``outcome`` (the bar counts steps, not structures)."""
        self.counts[outcome] += n
        self.done += n

    def advance(self, runner: Runner, steps: np.ndarray, occupied: list[int]) -> None:
        """Account for the steps taken since the last check (host counters from the status read)."""
        new_steps, atoms = 0, 0
        for s in occupied:
            item = runner.items[s]
            st = int(steps[s])
            new_steps += st - self._seen.get(item.index, 0)
            atoms += (st - self._seen.get(item.index, 0)) * len(item.atoms)
            self._seen[item.index] = st
        self.iters = runner.iteration
        self.system_steps += new_steps
        self.atom_steps += atoms
        self.active = len(occupied)
        if self._bar is not None:
            self._bar.update(new_steps)
            self._postfix()

    def position(self) -> tuple[int, int | None, str]:
        """(system-steps done in this run, all inputs' steps when known, "step")."""
        return self.system_steps, self.total, "step"

    def rates(self) -> dict[str, float]:
        elapsed = max(self.elapsed, 1e-9)
        steps_s = self.iters / elapsed
        return {"steps/s": steps_s, "ns/day": steps_s * self.timestep_fs * 86400 / 1e6,
                "atom-steps/s": self.atom_steps / elapsed}

    def _postfix(self) -> None:
        r = self.rates()
        fields = {"active": self.active, "ns/day/system": f"{r['ns/day']:.3g}",
                  "atom-steps/s": f"{r['atom-steps/s']:.3g}"}
        if self.n_inputs:
            fields["structures"] = f"{self.done}/{self.n_inputs}"
        fields.update({k: v for k, v in self.counts.items() if v})
        self._bar.set_postfix(fields, refresh=False)

    def summary(self) -> str:
        r = self.rates()
        units = "structure" if self.done == 1 else "structures"
        parts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        return (f"{self.desc}: {self.done} {units} in {self.elapsed:.1f} s: {parts}; {self.iters} steps, "
                f"{r['steps/s']:.3g} steps/s, {r['ns/day']:.3g} ns/day per system, "
                f"{r['atom-steps/s']:.3g} atom-steps/s")
