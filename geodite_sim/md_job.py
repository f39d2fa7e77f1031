"""The MD job: ``run_md``'s hooks on the one runner (:mod:`geodite_sim.runner`) and its run.

Admission gives each structure its momenta (the input's or Maxwell–Boltzmann), target temperature and steps,
seed, constraints and runaway limit; the horizon pauses a system at its frame boundaries and its last step until
the next check, so frames and results are exactly those of a one-step-at-a-time run; each check writes frames,
runs the monitors (:mod:`geodite_sim.md_output`) and, when due, a checkpoint (:mod:`geodite_sim.md_checkpoint`),
after which the runner is rebuilt from it exactly as a restart rebuilds it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ase import units

from geodite_sim.dynamics.velocities import maxwell_boltzmann, system_seed
from geodite_sim.dynamics.verlet import temperature
from geodite_sim.interrupt import Interrupted, StopRequest, deferred_interrupt
from geodite_sim.io.structures import MAX_SUPPORTED_Z, InputItem, iter_inputs
from geodite_sim.md_checkpoint import (
    CountedItems,
    MDCheckpoints,
    check_restart,
    load_checkpoint,
    run_targets,
)
from geodite_sim.md_output import (
    MDProgress,
    MDResult,
    make_result,
    monitor_failures,
    observables,
    open_writer,
    slot_item,
    write_frames,
)
from geodite_sim.model.contract import model_fingerprint, model_name, supported_elements
from geodite_sim.monitors import Monitors, temperature_limit_factor
from geodite_sim.runner import AdmissionError, Capacity, FailureChecks, Job, Runner, StepConfig, get_integrator
from geodite_sim.runner.capacity import estimate_capacity, probe_structures
from geodite_sim.runner.hooks import NO_HORIZON
from geodite_sim.settings import MDSettings
from geodite_sim.status import Status

if TYPE_CHECKING:
    from ase import Atoms

    from geodite_sim.trajectory import TrajectoryWriter

log = logging.getLogger(__name__)

#: Admission refuses two atoms closer than this × their covalent-radius sum (whatever the monitors say).
ADMISSION_MIN_DISTANCE_FACTOR = 0.5
#: Settings that must match between a checkpointed run and its restart: the :class:`MDSettings` fields marked
#: ``restart`` (``ensemble_params`` stands for the registry entry's resolved parameters, e.g. NPT's pressure,
#: pdamp_fs and barostat chain), the dtype and the model. (The skin is not one: trajectories do not depend on it.)
RESTART_KEYS = (*MDSettings.restart_keys(), "dtype", "model_fingerprint")
#: Keys of a registry entry's ``defaults`` that the job resolves into its common run settings (``chain_length``,
#: NPT's ``pdamp`` as ``pdamp_factor`` × timestep, ``barostat_chain_length``, ``ploop``). Every other key is the
#: entry's own run_md keyword: accepted, given to its ``init``/``step`` in the run settings and a restart key.
RESOLVED_DEFAULTS = ("chain_length", "pdamp_factor", "barostat_chain_length", "ploop")


def default_max_atoms(model, structures, max_atoms: int | None, memory_budget_bytes: float | None) -> int:
    """run_md's atom budget: the one capacity policy (:func:`geodite_sim.runner.capacity.estimate_capacity`),
    probed with the first structures when ``structures`` is a list of Atoms."""
    return estimate_capacity(model, max_atoms=max_atoms, probe=probe_structures(structures),
                             memory_budget_bytes=memory_budget_bytes).max_atoms


def _per_structure(value, index: int, name: str):
    """A float/int setting, or the ``index``-th entry of a per-structure sequence."""
    if value is None or isinstance(value, (int, float, np.integer, np.floating)):
        return value
    try:
        return value[index]
    except (IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"{name} has no entry for structure {index}") from exc


def _atoms(it: InputItem) -> Atoms:
    """The structure of an input admission hands to the job (inputs that failed to load never get here)."""
    if it.atoms is None:
        raise ValueError(f"{it.label}: no structure ({it.error})")
    return it.atoms


def _plain(v):
    """A JSON-able copy of a setting (lists for arrays/tensors)."""
    return v.tolist() if isinstance(v, (torch.Tensor, np.ndarray)) else v


class MDJob(Job):
    """One run_md call: its resolved settings, the runner's hooks (per-structure settings, frames, monitors,
    checkpoints, results) and the run."""

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
        self.integrator = get_integrator(ensemble)
        if self.integrator.kind != "md":
            raise ValueError(f"{ensemble!r} is an optimiser, not an MD ensemble; use relax_many")
        if not timestep > 0:
            raise ValueError("timestep must be positive (fs)")
        if self.integrator.needs_temperature and temperature is None:
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
        self.checkpoints = MDCheckpoints(self.checkpoint, self.checkpoint_every)
        self.progress_enabled = progress
        self.save_momenta = save_momenta
        self.allow_unsupported = st.allow_unsupported_elements
        self.observers = list(st.observers)
        if max_atoms is None and restart and self.checkpoint is not None and os.path.exists(self.checkpoint):
            max_atoms = int(load_checkpoint(self.checkpoint)["settings"]["max_atoms"])  # the run's own capacity
        max_atoms = default_max_atoms(model, structures, max_atoms, st.memory_budget_bytes)
        self.capacity = Capacity(max_atoms=int(max_atoms))
        self.monitor_every = max(1, int(monitors.check_every))
        self.config = self._engine_config(config, skin, accelerate)
        skin = self.config.skin
        defaults: dict[str, Any] = dict(self.integrator.defaults)
        if chain_length is None:
            chain_length = int(defaults.get("chain_length", 10))
        self.per_system_values = {k: ensemble_params.pop(k, defaults.get(k))
                                  for k in self.integrator.per_system_params}
        pdamp = ensemble_params.pop("pdamp", None)
        pdamp_fs = float(pdamp) if pdamp is not None else defaults.get("pdamp_factor", 1000.0) * float(timestep)
        own = {k: ensemble_params.pop(k, v) for k, v in defaults.items()
               if k not in RESOLVED_DEFAULTS and k not in self.per_system_values}
        unknown = set(ensemble_params) - {"barostat_chain_length", "ploop"}
        if unknown:
            raise TypeError(f"run_md got unexpected keyword argument(s) {sorted(unknown)} for ensemble {ensemble!r}")
        self.run_settings = {"dt": float(timestep) * units.fs, "tdamp_fs": self.tdamp_fs,
                             "chain_length": int(chain_length), "tloop": int(tloop),
                             "friction_per_fs": float(friction), "fix_com": bool(fix_com), "pdamp_fs": pdamp_fs,
                             "barostat_chain_length": int(ensemble_params.get(
                                 "barostat_chain_length", defaults.get("barostat_chain_length", 3))),
                             "ploop": int(ensemble_params.get("ploop", defaults.get("ploop", 1))), **own}
        ensemble_params = {k: v for k, v in self.run_settings.items()
                           if k in ("pdamp_fs", "barostat_chain_length", "ploop")} if self.integrator.variable_cell \
            else {}
        ensemble_params.update({k: v for k, v in self.per_system_values.items()})
        ensemble_params.update(own)
        self.settings = dict(
            ensemble=ensemble, timestep_fs=self.timestep_fs, tdamp_fs=self.tdamp_fs, chain_length=int(chain_length),
            tloop=int(tloop), friction_per_fs=float(friction), fix_com=bool(fix_com), seed=self.seed,
            frame_every=self.frame_every, skin=float(skin), max_atoms=int(max_atoms), dtype=str(self.dtype),
            checkpoint_every=self.checkpoint_every, model_name=model_name(model),
            **run_targets(steps, temperature),
            model_fingerprint=model_fingerprint(model), **{k: _plain(v) for k, v in ensemble_params.items()},
        )
        self.restart_keys = tuple(k for key in RESTART_KEYS
                                  for k in (sorted(ensemble_params) if key == "ensemble_params" else [key]))
        self.results: dict[int, MDResult] = {}
        self.result_data: dict[int, dict] = {}
        self.writer: TrajectoryWriter | None = None
        self.last_frame: dict[int, int] = {}  # input index -> step of its last frame
        self.t_limit: dict[int, float] = {}  # input index -> temperature-runaway factor for its size
        self.last_monitor = -1
        self.items: CountedItems | None = None
        self._bar: MDProgress | None = None
        self._stop: StopRequest | None = None

    @property
    def bar(self) -> MDProgress:
        """The progress bar of the run (made by :meth:`prepare`)."""
        if self._bar is None:
            raise RuntimeError("the MD job has not been prepared (MDJob.prepare)")
        return self._bar

    def _engine_config(self, config: StepConfig | None, skin: float | None, accelerate: str) -> StepConfig:
        """The runner's settings: checks every step on the CPU (a host read costs nothing there, and a check
        rebuilds a system's edges before it outruns its skin, so no step is wasted), on accelerators every
        ``check_every`` steps (at most ``frame_every``); the monitors run every ``check_every`` steps either way.
        ``skin`` None: 0.5 Å (on the CPU the two-level lists keep the step's list tight); 0: "rebuild the list
        every step" (e.g. the speed protocol): a check every step rebuilds every system, a 0.1 Å skin covers the
        step itself."""
        if self.device.type == "cpu":
            interval = 1
        else:
            interval = max(1, min(self.monitor_every, self.frame_every if self.trajectory else 10**9))
        base = config or StepConfig()
        skin = 0.5 if skin is None else float(skin)
        if skin == 0.0:
            base = replace(base, rebuild_every_check=True)
            interval, skin = 1, 0.1
        return replace(base, skin=skin, accelerate=accelerate, check_interval=interval)

    def per_system(self, items: list[InputItem]) -> dict:
        """Per-structure MD settings of newly admitted systems (ValueError names the bad one)."""
        momenta, kT, target, seeds, constraints = [], [], [], [], []
        for it in items:
            atoms = _atoms(it)
            c = self._constraints(it)
            constraints.append(c)
            T = _per_structure(self.temperature, it.index, "temperature")
            n_steps = int(_per_structure(self.steps, it.index, "steps"))
            if n_steps < 0:
                raise ValueError(f"negative number of steps {n_steps}")
            if self.integrator.needs_temperature and T is None:
                raise ValueError("no target temperature")
            if T is not None and not (math.isfinite(float(T)) and float(T) >= 0):
                raise ValueError(f"invalid temperature {T!r} K")
            if atoms.has("momenta"):
                p = atoms.get_momenta()
                if not np.isfinite(p).all():
                    raise ValueError("non-finite momenta")
                momenta.append(np.where(c.fixed_pre | c.fixed_post, 0.0, p) if c is not None else p)
            else:
                momenta.append(maxwell_boltzmann(atoms, float(T or 0.0), self.seed, it.index))
            if self.integrator.variable_cell and not atoms.pbc.all():
                raise AdmissionError(Status.INVALID_STRUCTURE, f"{self.ensemble} needs a fully periodic cell "
                                     f"(pbc={atoms.pbc.tolist()})")
            if self.integrator.rescales_momenta and not np.any(momenta[-1]):  # nothing to rescale (Bussi)
                raise AdmissionError(Status.INVALID_SETTINGS, f"{self.ensemble} needs a non-zero initial kinetic "
                                     "energy (give a temperature > 0 K or momenta): its thermostat rescales the "
                                     "momenta (ASE's Bussi refuses it too)")
            kT.append(units.kB * float(T or 0.0))
            target.append(n_steps)
            seeds.append(system_seed(self.seed, it.index))
            # the runaway limit is relative to the target, or to the starting temperature when that is higher (a
            # start hotter than the target cools down: not a runaway), at most twice the target
            p, m = momenta[-1], atoms.get_masses()
            dof = 3 * len(m) - (c.removed_dof if c is not None else 0)
            t0 = float((p * p / m[:, None]).sum() / (max(dof, 1) * units.kB))
            boost = min(2.0, max(1.0, t0 / float(T))) if T else 1.0
            self.t_limit[it.index] = boost * temperature_limit_factor(self.monitors, len(atoms), dof)
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
                [c if c is not None else AtomConstraints.none(len(_atoms(it))) for c, it in zip(constraints, items)],
                self.dtype, self.device)
        return {**extra, "momenta": torch.as_tensor(np.concatenate(momenta), **t), "kT": torch.as_tensor(kT, **t),
                "step": torch.zeros(len(items), dtype=torch.long, device=self.device),
                "target_steps": torch.as_tensor(target, dtype=torch.long, device=self.device),
                "seed": torch.as_tensor(seeds, dtype=torch.long, device=self.device)}

    def _constraints(self, it: InputItem):
        """The input's FixAtoms/FixCartesian as an AtomConstraints (None: unconstrained); AdmissionError names
        a constraint MD cannot honour."""
        atoms = _atoms(it)
        if not atoms.constraints:
            return None
        from geodite_sim.dynamics.constraints import constraints_from_atoms

        names = ", ".join(type(c).__name__ for c in atoms.constraints)
        if self.integrator.variable_cell:
            raise AdmissionError(Status.INVALID_STRUCTURE, f"constraints ({names}) are not supported by "
                                 f"{self.ensemble} (ASE's MTK NPT refuses them too); remove them or use an NVT "
                                 "ensemble")
        c = constraints_from_atoms(atoms)
        if isinstance(c, str):
            raise AdmissionError(Status.INVALID_STRUCTURE, c.replace("relax this structure", "run this structure"))
        if c.has_symmetry:
            raise AdmissionError(Status.INVALID_STRUCTURE, "FixSymmetry is honoured in relaxations only "
                                 "(relax_many); remove it to run MD")
        return c

    def horizon(self, runner: Runner, horizon: torch.Tensor, new_slots: list[int]) -> torch.Tensor:
        """Steps each slot may reach before the next check: its next frame boundary or its target."""
        steps = runner.state.step
        fe = self.frame_every if self.writer is not None else NO_HORIZON
        nxt = (torch.div(steps, fe, rounding_mode="floor") + 1) * fe
        return torch.minimum(nxt, runner.state.target_steps)

    def on_admit(self, runner: Runner, slots: list[int]) -> None:
        """Trajectory groups and step-0 frames of newly started systems."""
        state = runner.state
        if self.writer is None:
            for s in slots:
                self.last_frame[slot_item(runner, s).index] = 0
            return
        kT = state.kT.cpu().numpy()
        target = state.target_steps.cpu().numpy()
        seeds = state.seed.cpu().numpy()
        for s in slots:
            item = slot_item(runner, s)
            atoms = _atoms(item)
            self.writer.add_system(item.index, atoms.numbers, atoms.get_masses(), atoms.pbc, {
                "index": item.index, "label": item.label, "formula": atoms.get_chemical_formula(),
                "n_atoms": len(atoms), "temperature_K": float(kT[s] / units.kB), "target_steps": int(target[s]),
                "seed": int(seeds[s]), "n_steps": 0,
            })
        self._frames(runner, slots, observables(self.integrator, state))

    def at_check(self, runner: Runner, host: dict) -> dict[int, tuple[Status, str]]:
        """Frames at boundaries and last steps, monitors, progress, checkpoints; returns monitor failures."""
        state = runner.state
        steps = host["steps"]
        failures: dict[int, tuple[Status, str]] = {}
        obs = None
        occupied = [s for s, it in enumerate(runner.items) if it is not None]
        target_h = state.target_steps[: len(runner.items)].cpu().numpy()
        due = runner.iteration // self.monitor_every != self.last_monitor or any(
            int(steps[s]) >= int(target_h[s]) or host["code"][s] != 0 for s in occupied)
        if occupied and due:
            self.last_monitor = runner.iteration // self.monitor_every
            obs = observables(self.integrator, state)
            failures = monitor_failures(self.monitors, self.integrator.variable_cell, runner, obs, occupied, steps,
                                        self.t_limit)
        target = target_h
        framed = []
        for s in occupied:
            index = slot_item(runner, s).index
            st = int(steps[s])
            if st == self.last_frame.get(index, -1):
                continue
            failed = s in failures or host["code"][s] != 0
            if st % self.frame_every == 0 or st >= target[s] or failed:
                framed.append(s)
        if framed:
            self._frames(runner, framed, obs if obs is not None else observables(self.integrator, state))
        self.bar.advance(runner, steps, occupied)
        if runner.slots is not None:
            runner.slots.horizon = self.horizon(runner, runner.slots.horizon, [])
        return failures

    def result(self, item: InputItem, one, status: Status | None, message: str | None) -> MDResult:
        n_steps = int(one.step[0])
        if status is None:
            status = Status.DONE
        if status.ok:
            error = None
        else:
            why = message if message is not None else status.value
            error = why if why.startswith("stopped") else f"stopped at step {n_steps}: {why}"
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
        res = self.make_result(item, data)
        self.results[item.index] = res
        self.bar.finish("done" if status.ok else "failed")
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
        self.bar.finish("failed")
        return res

    def _frames(self, runner: Runner, slots: list[int], obs: dict[str, torch.Tensor]) -> None:
        write_frames(self.writer, self.last_frame, self.save_momenta, runner, slots, obs)

    def make_result(self, item: InputItem, data: dict) -> MDResult:
        return make_result(item, data, self.trajectory)

    # ------------------------------------------------------------------ checkpoints and interrupts
    def save_checkpoint(self, runner: Runner, reload: bool = False) -> None:
        """Write the checkpoint (``reload``: then rebuild the runner from it, as a restart does)."""
        self.checkpoints.save(self, runner, reload)

    def after_check(self, runner: Runner) -> bool:
        """A checkpoint when due (then the runner is rebuilt from it and checks again, as a restart does), and
        Ctrl-C at a check."""
        again = False
        if self.checkpoints.due(runner.iteration):
            self.save_checkpoint(runner, reload=True)
            self.checkpoints.advance(runner.iteration)
            again = True  # a restart checks first: so does this run, from the same rebuilt runner
        if self._stop is not None and self._stop.requested:
            self._interrupt(runner)
        return again

    def on_finish(self, runner: Runner) -> None:
        if self.checkpoints.enabled:
            self.save_checkpoint(runner)

    def _interrupt(self, runner: Runner) -> None:
        """Ctrl-C at a check: checkpoint (when the run has one), mark running systems ``interrupted`` at their
        step, then stop (:class:`~geodite_sim.interrupt.Interrupted`)."""
        if self.checkpoints.enabled:
            self.save_checkpoint(runner)
        if self.writer is not None and runner.state is not None:
            steps = runner.state.step.cpu().numpy()
            for s, item in enumerate(runner.items):
                if item is not None and self._has_group(item.index):
                    self.writer.set_attrs(item.index, status="interrupted", n_steps=int(steps[s]),
                                          error="interrupted (Ctrl-C)")
        raise Interrupted("md run interrupted")

    # ------------------------------------------------------------------ the run
    def prepare(self) -> Runner:
        """The runner of this job, restored from the checkpoint on a restart (nothing admitted yet otherwise)."""
        ckpt = None
        if self.restart and self.checkpoint is not None and os.path.exists(self.checkpoint):
            ckpt = load_checkpoint(self.checkpoint)
            check_restart(ckpt["settings"], self.settings, self.restart_keys)
        elements = supported_elements(self.model) or range(1, MAX_SUPPORTED_Z + 1)
        stream = iter_inputs(self.structures, supported_elements=elements,
                             allow_unsupported_elements=self.allow_unsupported, model_name=model_name(self.model),
                             min_distance_factor=ADMISSION_MIN_DISTANCE_FACTOR)
        float_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        runner = Runner(self.model, self.integrator, self.run_settings, self, self.capacity, self.config,
                        FailureChecks(), self.observers, admission_checks=FailureChecks())  # contacts: iter_inputs
        self._bar = MDProgress(self.structures, self.steps, self.ensemble, self.timestep_fs,
                               enabled=self.progress_enabled)
        attrs = MDCheckpoints.attrs(self)
        if ckpt is None:
            self.items = CountedItems(stream)
            if self.trajectory is not None:
                self.writer = open_writer(self.trajectory, attrs, None, float_dtype, self.save_momenta)
        else:
            if self.trajectory is not None:
                if not os.path.exists(self.trajectory):
                    raise FileNotFoundError(f"cannot restart: trajectory {self.trajectory} is missing")
                frames = {int(k): int(v) for k, v in ckpt["frames"]}
                self.writer = open_writer(self.trajectory, attrs, frames, float_dtype, self.save_momenta)
            self.checkpoints.restore(self, runner, ckpt, stream)
            if self.writer is not None:
                for item in runner.items:
                    if item is not None:
                        self.writer.set_attrs(item.index, status="running", error="")
        if self.items is None:
            raise RuntimeError("the MD job has no input queue")
        runner.queue = self.items
        return runner

    def run(self) -> list[MDResult]:
        """Every input's result, in input order (Ctrl-C stops at the next check: :meth:`after_check`)."""
        with deferred_interrupt() as stop:
            self._stop = stop
            try:
                for _ in self.prepare().run():
                    pass  # results are recorded by :meth:`result` / :meth:`rejected`
            finally:
                self._stop = None
                if self._bar is not None:
                    self._bar.close()
                if self.writer is not None:
                    self.writer.close()
        log.info(self.bar.summary())
        return [self.results[i] for i in sorted(self.results)]


__all__ = ["ADMISSION_MIN_DISTANCE_FACTOR", "MDJob", "RESTART_KEYS", "default_max_atoms"]
