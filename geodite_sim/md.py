"""Batched molecular dynamics: ``run_md`` and the engine loop behind it.

Many independent structures are packed into one batch (continuous batching through
:class:`~geodite_sim.scheduler.Scheduler`) and advanced together by one of the integrators
in :mod:`geodite_sim.dynamics` (velocity Verlet, Nosé–Hoover chain, Langevin; ASE's
equations, per-system temperatures and thermostat states). Each step is a fixed sequence
of batched tensor operations plus one model call on edges from a Verlet (skin) neighbour
list. The host reads tensors back only at check/frame intervals, when systems finish, and
at checkpoints; there frames are written to HDF5, the stability monitors stop failing
systems, finished systems are replaced by queued ones, and the progress bar is refreshed.

See ``docs/md.md`` for equations, file layouts and restart semantics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms, units

from geodite_sim.batch import Batch
from geodite_sim.dynamics.langevin import LangevinState, langevin_step
from geodite_sim.dynamics.nose_hoover import init_chain, nhc_conserved, nhc_step
from geodite_sim.dynamics.velocities import maxwell_boltzmann, system_seed
from geodite_sim.dynamics.verlet import MDState, kinetic_energy, nve_conserved, temperature, verlet_step
from geodite_sim.io.structures import InputItem, iter_inputs, like_input
from geodite_sim.md_checkpoint import check_compatible, load_checkpoint, save_checkpoint, state_from_dict, state_to_dict
from geodite_sim.model.geodite import Geodite
from geodite_sim.model.strain import edge_vectors
from geodite_sim.monitors import Monitors
from geodite_sim.neighbors import VerletNeighborList
from geodite_sim.progress import Progress
from geodite_sim.scheduler import Capacity, Scheduler

ENSEMBLES = ("nve", "nvt_nhc", "nvt_langevin")
log = logging.getLogger(__name__)
#: Settings that must match between a checkpointed run and its restart.
RESTART_KEYS = ("ensemble", "timestep_fs", "tdamp_fs", "chain_length", "tloop", "friction_per_fs", "fix_com", "seed",
                "frame_every", "skin", "max_atoms", "dtype", "checkpoint_every", "model_name", "model_checksum")


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
    """

    index: int
    final: Any
    n_steps: int
    error: str | None
    trajectory: tuple[str, str] | None = None
    label: str = ""
    energy: float | None = None
    temperature: float | None = None


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
    chain_length: int = 10,
    tloop: int = 1,
    friction: float = 0.01,
    fix_com: bool = False,
    seed: int = 0,
    max_atoms: int | None = None,
    skin: float = 0.5,
    monitors: Monitors | bool | None = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    restart: bool = False,
    progress: bool = True,
    save_momenta: bool = False,
    memory_budget_bytes: float | None = None,
    accelerate: str = "auto",
) -> list[MDResult]:
    """Run molecular dynamics on many structures at once; one :class:`MDResult` per input, in input order.

    Args:
        structures: ASE Atoms, pymatgen structures, file paths, or any iterable of them (streamed).
            Initial momenta are taken from the input when it has them (ASE ``momenta``), otherwise drawn
            from Maxwell–Boltzmann at ``temperature`` with zero total momentum, seeded by (``seed``, index).
        model: a Geodite (or any model with the same call signature, e.g. ``MorsePotential``);
            None loads the packaged default. The model's dtype and device are used.
        ensemble: ``"nve"`` (velocity Verlet), ``"nvt_nhc"`` (Nosé–Hoover chain, ASE's
            ``NoseHooverChainNVT``) or ``"nvt_langevin"`` (ASE's ``Langevin``).
        temperature: target temperature, K — a float or one value per input (indexed by input index).
            Required for NVT; for NVE it only sets the initial velocities.
        timestep: fs.
        steps: steps per structure (an int or one per input).
        trajectory: HDF5 file for frames (``/systems/<index>/...``); None writes none.
        frame_every: write a frame every this many steps of a system (plus its first and last).
        tdamp: NHC damping time, fs (default 100 × timestep).
        chain_length: NHC thermostats per system (default 10). tloop: NHC sub-steps (ASE's default 1).
        friction: Langevin friction, 1/fs (ASE's ``friction`` is in 1/ASE-time: ``friction / units.fs``).
        fix_com: Langevin: ASE's deprecated ``fixcm=True`` behaviour, per system.
        seed: run seed; per-structure seeds derive from (seed, input index).
        max_atoms: atom budget of the packed batch (systems beyond it wait in the queue). Default:
            on the CPU :data:`DEFAULT_MAX_ATOMS` (a cache-sized batch is fastest: measured 1.5x faster
            per atom-step at 384 atoms than at 2,956); on CUDA the memory model (docs/memory-model.md)
            at 80 % of the free device memory; a restart reuses the checkpointed run's value.
        skin: Verlet neighbour-list skin, Å.
        monitors: :class:`~geodite_sim.monitors.Monitors` thresholds; True for the defaults, False/None for
            the NaN/Inf check only. ``monitors.check_every`` also sets the progress/check interval.
        checkpoint: checkpoint file (default ``<trajectory>.ckpt`` when ``checkpoint_every`` is set).
        checkpoint_every: engine steps between checkpoints; None writes none.
        restart: continue from ``checkpoint`` when it exists (same inputs and settings), appending to
            the trajectory; without a checkpoint file the run starts afresh.
        progress: show a progress bar (steps/s, ns/day per system, atom-steps/s).
        save_momenta: also store momenta in the trajectory.
        memory_budget_bytes: bytes one model step may use on any device; caps ``max_atoms`` so that the
            memory model's predicted peak stays within 80 % of it.
        accelerate: how the per-step model call runs (:mod:`geodite_sim.accelerate`): ``"auto"``
            (CUDA graphs on a CUDA device, the plain model elsewhere), ``"off"``, ``"eager"`` (padded
            static shapes), ``"compile"`` (``torch.compile``) or ``"cuda_graph"`` (CUDA only). Only
            Geodite models are wrapped; see ``docs/gpu.md``.
    """
    engine = _MDEngine(
        structures, model, ensemble, temperature, timestep, steps, trajectory, frame_every, tdamp, chain_length,
        tloop, friction, fix_com, seed, max_atoms, skin, monitors, checkpoint, checkpoint_every, restart, progress,
        save_momenta, memory_budget_bytes=memory_budget_bytes,
    )
    from geodite_sim.accelerate import accelerated

    engine.step_model = accelerated(engine.model, accelerate)
    return engine.run()


class _MDEngine:
    """One run_md call: scheduler, integrator, neighbour list, writer, monitors, checkpoints."""

    #: What evaluates the model inside a step (``run_md(accelerate=...)``); None: the model itself.
    step_model = None

    def __init__(self, structures, model, ensemble, temperature, timestep, steps, trajectory, frame_every, tdamp,
                 chain_length, tloop, friction, fix_com, seed, max_atoms, skin, monitors, checkpoint,
                 checkpoint_every, restart, progress, save_momenta, memory_budget_bytes=None):
        if ensemble not in ENSEMBLES:
            raise ValueError(f"unknown ensemble {ensemble!r}; choose from {ENSEMBLES}")
        if not timestep > 0:
            raise ValueError("timestep must be positive (fs)")
        if ensemble != "nve" and temperature is None:
            raise ValueError(f"ensemble {ensemble!r} needs a temperature")
        if frame_every < 1:
            raise ValueError("frame_every must be >= 1")
        if model is None:
            from geodite_sim.model import load_model

            model = load_model()
        self.structures = structures
        self.model = model
        self.dtype = model.dtype
        self.device = model.device
        self.ensemble = ensemble
        self.temperature = temperature
        self.steps = steps
        self.timestep_fs = float(timestep)
        self.dt = float(timestep) * units.fs
        self.tdamp_fs = float(tdamp) if tdamp is not None else 100.0 * float(timestep)
        self.chain_length = int(chain_length)
        self.tloop = int(tloop)
        self.friction_fs = float(friction)
        self.fix_com = bool(fix_com)
        self.seed = int(seed)
        self.frame_every = int(frame_every)
        if monitors is True:
            monitors = Monitors()
        elif monitors is False or monitors is None:
            monitors = Monitors(None, None, None)
        if ensemble == "nvt_langevin":
            monitors = Monitors(monitors.max_temperature_factor, monitors.min_distance_factor, None,
                                monitors.check_every)
        self.monitors = monitors
        self.check_every = max(1, int(monitors.check_every))
        self.trajectory = None if trajectory is None else str(trajectory)
        if checkpoint_every is not None and checkpoint is None:
            if self.trajectory is None:
                raise ValueError("checkpoint_every needs a checkpoint path (or a trajectory to name it after)")
            checkpoint = self.trajectory + ".ckpt"
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
        self.restart = restart
        self.progress = progress
        self.save_momenta = save_momenta
        if max_atoms is None and restart and self.checkpoint is not None and os.path.exists(self.checkpoint):
            max_atoms = int(load_checkpoint(self.checkpoint)["settings"]["max_atoms"])  # the run's own capacity
        max_atoms = _default_max_atoms(model, structures, max_atoms, memory_budget_bytes)
        self.capacity = Capacity(max_atoms=int(max_atoms))
        backend = getattr(model, "neighbor_backend", "auto")
        self.nl = VerletNeighborList(model.cutoff, skin, backend)
        self.last_edges = None
        self.settings = dict(
            ensemble=ensemble, timestep_fs=self.timestep_fs, tdamp_fs=self.tdamp_fs, chain_length=self.chain_length,
            tloop=self.tloop, friction_per_fs=self.friction_fs, fix_com=self.fix_com, seed=self.seed,
            frame_every=self.frame_every, skin=float(skin), max_atoms=int(max_atoms), dtype=str(self.dtype),
            checkpoint_every=self.checkpoint_every, model_name=str(getattr(model, "name", type(model).__name__)),
            model_checksum=str(getattr(model, "checksum", "")),
        )
        self.results: dict[int, MDResult] = {}
        self.result_data: dict[int, dict] = {}
        self.iteration = 0
        self.writer = None
        self.steps_host = np.zeros(0, dtype=np.int64)
        self.target_host = np.zeros(0, dtype=np.int64)
        self.atoms_host = np.zeros(0, dtype=np.int64)
        self.n_atoms_host = 0

    # ------------------------------------------------------------------ physics
    def _forces(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # A system that has blown up (non-finite positions) must not break its batch-mates' model call
        # or neighbour list: its bad coordinates are replaced by 0 for the evaluation only. Its state stays
        # non-finite, and the monitors stop it at the next check.
        pos = batch.positions
        batch = batch.with_positions(torch.where(torch.isfinite(pos), pos, torch.zeros_like(pos)))
        edges = self.nl(batch)
        self.last_edges = edges
        if self.step_model is not None:
            out = self.step_model(batch, edges=edges, compute_forces=True, compute_stress=False)
        elif isinstance(self.model, Geodite):
            # inputs were validated on admission and non-finite positions are masked above, so the
            # model's host-side input checks (a device sync per step on CUDA) are skipped
            out = self.model(batch, edges=edges, compute_forces=True, compute_stress=False, check=False)
        else:
            out = self.model(batch, edges=edges, compute_forces=True, compute_stress=False)
        return out["energy"], out["forces"]

    def _step(self, state: MDState) -> MDState:
        if self.ensemble == "nve":
            return verlet_step(state, self._forces, self.dt)
        if self.ensemble == "nvt_nhc":
            return nhc_step(state, self._forces, self.dt, self.tloop)
        return langevin_step(state, self._forces, self.dt, self.fix_com)

    def _conserved(self, state: MDState, ke: torch.Tensor) -> torch.Tensor:
        if self.ensemble == "nvt_nhc":
            return nhc_conserved(state, ke)
        return nve_conserved(state, ke)

    def _observables(self, state: MDState) -> dict[str, torch.Tensor]:
        ke = kinetic_energy(state)
        return {"kinetic_energy": ke, "temperature": temperature(state, ke), "conserved": self._conserved(state, ke)}

    def _init_state(self, items: list[InputItem]) -> MDState:
        """Integrator state of newly started systems (momenta, chains, forces at step 0)."""
        atoms_list = [it.atoms for it in items]
        batch = Batch.from_atoms(atoms_list, dtype=self.dtype, device=self.device)
        momenta, kT, target, seeds = [], [], [], []
        for it in items:
            T = _per_structure(self.temperature, it.index, "temperature")
            n_steps = int(_per_structure(self.steps, it.index, "steps"))
            if n_steps < 0:
                raise ValueError(f"negative number of steps {n_steps}")
            if self.ensemble != "nve" and T is None:
                raise ValueError("no target temperature")
            if it.atoms.has("momenta"):
                momenta.append(it.atoms.get_momenta())
            else:
                momenta.append(maxwell_boltzmann(it.atoms, float(T or 0.0), self.seed, it.index))
            kT.append(units.kB * float(T or 0.0))
            target.append(n_steps)
            seeds.append(system_seed(self.seed, it.index))
        tensor = dict(dtype=self.dtype, device=self.device)
        out = self.model(batch, compute_forces=True, compute_stress=False)
        state = MDState(
            batch=batch, energy=out["energy"], forces=out["forces"],
            momenta=torch.as_tensor(np.concatenate(momenta), **tensor),
            kT=torch.as_tensor(kT, **tensor),
            step=torch.zeros(len(items), dtype=torch.long, device=self.device),
            target_steps=torch.as_tensor(target, dtype=torch.long, device=self.device),
            seed=torch.as_tensor(seeds, dtype=torch.long, device=self.device),
        )
        if self.ensemble == "nvt_nhc":
            state = init_chain(state, self.tdamp_fs * units.fs, self.chain_length)
        elif self.ensemble == "nvt_langevin":
            values = {f.name: getattr(state, f.name) for f in fields(state)}
            state = LangevinState(**values, friction=torch.full((len(items),), self.friction_fs / units.fs, **tensor))
        state.conserved0 = self._conserved(state, kinetic_energy(state))
        return state

    # ------------------------------------------------------------------ bookkeeping
    def _sync_host(self) -> None:
        state = self.sched.state
        if state is None:
            self.steps_host = np.zeros(0, dtype=np.int64)
            self.target_host = np.zeros(0, dtype=np.int64)
            self.atoms_host = np.zeros(0, dtype=np.int64)
            self.n_atoms_host = 0
            return
        self.steps_host = state.step.cpu().numpy().copy()
        self.target_host = state.target_steps.cpu().numpy().copy()
        self.atoms_host = state.batch.atoms_per_system.cpu().numpy().copy()
        self.n_atoms_host = int(self.atoms_host.sum())

    def _attrs(self) -> dict:
        import h5py

        import geodite_sim

        versions = {"geodite_sim": geodite_sim.__version__, "torch": torch.__version__, "numpy": np.__version__,
                    "h5py": h5py.__version__}
        import ase

        versions["ase"] = ase.__version__
        return {**self.settings, "versions": versions, "created_by": "geodite_sim.run_md",
                "time_unit": "fs", "conserved": "nhc" if self.ensemble == "nvt_nhc" else "total_energy"}

    def _group(self, index: int) -> tuple[str, str] | None:
        return None if self.writer is None else (self.trajectory, self.writer.group_name(index))

    def _frames(self, slots: np.ndarray, obs: dict[str, torch.Tensor]) -> None:
        """Buffer a frame of every system slot in ``slots`` (one device-to-host copy)."""
        if self.writer is None or len(slots) == 0:
            return
        state = self.sched.state
        pos = state.positions.detach().cpu().numpy()
        cell = state.cell.detach().cpu().numpy()
        mom = state.momenta.detach().cpu().numpy() if self.save_momenta else None
        energy = state.energy.detach().cpu().numpy()
        host = {k: v.detach().cpu().numpy() for k, v in obs.items()}
        offsets = state.batch.offsets.cpu().numpy()
        steps = state.step.cpu().numpy()
        for s in slots:
            a, b = offsets[s], offsets[s + 1]
            frame = {"positions": pos[a:b], "cell": cell[s], "energy": energy[s], "step": steps[s],
                     **{k: v[s] for k, v in host.items()}}
            if mom is not None:
                frame["momenta"] = mom[a:b]
            self.writer.add_frame(self.sched.active[s].index, frame)

    def _start(self, first_slot: int) -> None:
        """Groups and step-0 frames of the systems in slots ``first_slot:``."""
        state = self.sched.state
        new = self.sched.active[first_slot:]
        if self.writer is not None and new:
            kT = state.kT.cpu().numpy()
            target = state.target_steps.cpu().numpy()
            seeds = state.seed.cpu().numpy()
            for k, item in enumerate(new):
                s = first_slot + k
                atoms = item.atoms
                self.writer.add_system(item.index, atoms.numbers, atoms.get_masses(), atoms.pbc, {
                    "index": item.index, "label": item.label, "formula": atoms.get_chemical_formula(),
                    "n_atoms": len(atoms), "temperature_K": float(kT[s] / units.kB), "target_steps": int(target[s]),
                    "seed": int(seeds[s]), "n_steps": 0,
                })
            self._frames(np.arange(first_slot, len(self.sched.active)), self._observables(state))

    def _refill(self) -> None:
        n_before = len(self.sched.active)
        for item in self.sched.refill():
            self._finish_unstarted(item)
        if len(self.sched.active) > n_before:
            self._start(n_before)
        self._sync_host()
        self.nl.reset()
        done = self.steps_host >= self.target_host  # systems asked to run 0 steps
        if done.any():
            self._retire(done, {})
            self._refill()

    def _finish_unstarted(self, item: InputItem) -> None:
        error = item.error or "could not be started"
        self.results[item.index] = MDResult(item.index, None, 0, error, None, item.label)
        self.result_data[item.index] = {"index": item.index, "label": item.label, "error": error, "started": False}

    def _make_result(self, item: InputItem, data: dict) -> MDResult:
        if not data.get("started", True):
            return MDResult(item.index, None, 0, data["error"], None, item.label)
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = item.atoms.copy()
        atoms.positions = data["positions"].double().numpy()
        atoms.set_momenta(data["momenta"].double().numpy(), apply_constraint=False)
        atoms.calc = SinglePointCalculator(atoms, energy=float(data["energy"]), forces=data["forces"].double().numpy())
        group = data.get("group")
        return MDResult(item.index, like_input(item.original, atoms), int(data["n_steps"]), data["error"],
                        None if not group else (self.trajectory, group), item.label, float(data["energy"]),
                        float(data["temperature"]))

    def _retire(self, done: np.ndarray, errors: dict[int, str]) -> None:
        slots = np.nonzero(done)[0]
        temps = self._observables(self.sched.state)["temperature"].cpu()
        temps = {int(s): float(temps[s]) for s in slots}
        pairs = self.sched.retire(torch.as_tensor(done, device=self.device))
        for s, (item, one) in zip(slots, pairs):
            s = int(s)
            error = errors.get(s)
            n_steps = int(one.step[0])
            data = {"index": item.index, "label": item.label, "started": True, "error": error, "n_steps": n_steps,
                    "positions": one.positions.detach().cpu().clone(), "momenta": one.momenta.detach().cpu().clone(),
                    "forces": one.forces.detach().cpu().clone(), "energy": float(one.energy[0]),
                    "temperature": temps[s], "group": self.writer.group_name(item.index) if self.writer else None}
            if self.writer is not None:
                self.writer.flush([item.index])
                self.writer.set_attrs(item.index, status="failed" if error else "done", error=error, n_steps=n_steps)
            self.result_data[item.index] = data
            self.results[item.index] = self._make_result(item, data)

    def _next_index(self) -> int:
        pending = getattr(self.sched, "_pending", None)
        return pending.index if pending is not None else self.items.next_index

    def _save_checkpoint(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        payload = {
            "settings": self.settings, "iteration": self.iteration, "state": state_to_dict(self.sched.state),
            "active": [it.index for it in self.sched.active], "labels": [it.label for it in self.sched.active],
            "next_index": self._next_index(), "results": list(self.result_data.values()),
            "frames": [[k, v] for k, v in (self.writer.written().items() if self.writer else [])],
        }
        save_checkpoint(self.checkpoint, payload)
        # The restarted run starts with a fresh neighbour list; start one here too, so both runs sum
        # forces over identically ordered edges (bit-for-bit continuation).
        self.nl.reset()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> bool:
        """Create scheduler and writer (fresh or from a checkpoint); True when restored from one."""
        ckpt = None
        if self.restart and self.checkpoint is not None and os.path.exists(self.checkpoint):
            ckpt = load_checkpoint(self.checkpoint)
            check_compatible(ckpt["settings"], self.settings, RESTART_KEYS)
        stream = iter_inputs(self.structures)
        float_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        if ckpt is None:
            self.items = _CountedItems(stream)
            self.sched = Scheduler(self.items, self.capacity, self._init_state)
            if self.trajectory is not None:
                self.writer = _open_writer(self.trajectory, self._attrs(), None, float_dtype,
                                                      self.save_momenta)
            return False
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
        for data in ckpt["results"]:
            self.result_data[data["index"]] = data
            self.results[data["index"]] = self._make_result(seen[data["index"]], data)
        self.items = _CountedItems(stream, next_index)
        self.sched = Scheduler(self.items, self.capacity, self._init_state)
        self.sched.active = active
        self.sched.state = state_from_dict(ckpt["state"], self.device)
        self.sched.n_started = len(active) + sum(1 for d in ckpt["results"] if d.get("started", True))
        self.iteration = int(ckpt["iteration"])
        if self.trajectory is not None:
            if not os.path.exists(self.trajectory):
                raise FileNotFoundError(f"cannot restart: trajectory {self.trajectory} is missing")
            frames = {int(k): int(v) for k, v in ckpt["frames"]}
            self.writer = _open_writer(self.trajectory, self._attrs(), frames, float_dtype,
                                                  self.save_momenta)
            for item in active:
                self.writer.set_attrs(item.index, status="running", error="")
        self._sync_host()
        return True

    # ------------------------------------------------------------------ loop
    def run(self) -> list[MDResult]:
        restored = self._setup()
        bar = _MDProgress(self, enabled=self.progress)
        try:
            if not restored:
                self._refill()
            while True:
                if self.sched.state is None:
                    self._refill()
                    if self.sched.state is None:
                        break
                self._iterate(bar)
            if self.checkpoint is not None and self.checkpoint_every is not None:
                self._save_checkpoint()
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
        log.info(bar.summary())
        return [self.results[i] for i in sorted(self.results)]

    def _iterate(self, bar: _MDProgress) -> None:
        state = self._step(self.sched.state)
        self.iteration += 1
        self.steps_host += 1
        bar.advance(self.n_atoms_host)
        finishing = self.steps_host >= self.target_host
        check = self.iteration % self.check_every == 0 or bool(finishing.any())
        errors: dict[int, str] = {}
        failed = np.zeros_like(finishing)
        obs = None
        if check:
            obs = self._observables(state)
            failed, errors = self._check(state, obs)
        framed = (self.steps_host % self.frame_every == 0) | finishing | failed
        if framed.any():
            obs = self._observables(state) if obs is None else obs
            self._frames(np.nonzero(framed)[0], obs)
        done = finishing | failed
        if done.any():
            bar.finish("failed", int(failed.sum()))
            bar.finish("done", int((done & ~failed).sum()))
            self._retire(done, errors)
            self._refill()
        if self.checkpoint_every is not None and self.iteration % self.checkpoint_every == 0:
            self._save_checkpoint()
        if check:
            bar.refresh(len(self.steps_host))

    def _check(self, state: MDState, obs: dict) -> tuple[np.ndarray, dict[int, str]]:
        m = self.monitors
        n = state.n_atoms
        edges = self.last_edges
        vec = None
        if m.min_distance_factor is not None and edges is not None:
            vec = edge_vectors(state.positions[:n], state.cell, state.system_index[:n], edges)
        values = m.check(
            state.positions[:n], state.momenta[:n], state.forces[:n], state.energy, state.batch.numbers[:n],
            state.system_index[:n], state.batch.atoms_per_system, obs["temperature"], state.kT, obs["conserved"],
            state.conserved0, vec, None if edges is None else edges.receiver, None if edges is None else edges.sender,
        )
        code = values["code"].cpu().numpy()
        failed = code != 0
        errors = {}
        if failed.any():
            host = {k: v.detach().cpu().numpy() for k, v in values.items()}
            for s in np.nonzero(failed)[0]:
                errors[int(s)] = m.describe(int(code[s]), host, int(s), int(self.steps_host[s]))
        return failed, errors


def _open_writer(path, attrs, frames, float_dtype, save_momenta):
    """Open the HDF5 writer (imported lazily so ``import geodite_sim`` does not need h5py)."""
    from geodite_sim.trajectory import TrajectoryWriter

    return TrajectoryWriter(path, attrs, restart_frames=frames, float_dtype=float_dtype, save_momenta=save_momenta)


class _MDProgress(Progress):
    """The shared progress bar (structures done/failed, active systems) plus MD rates: steps/s,
    ns/day per system and aggregate atom-steps/s, from host-side counters only."""

    def __init__(self, engine: _MDEngine, enabled: bool):
        s = engine.structures
        total = len(s) if hasattr(s, "__len__") and not isinstance(s, (str, Atoms)) else None
        super().__init__(total=total, desc=f"md {engine.ensemble}", unit="structure", enabled=enabled,
                         outcomes=("done", "failed"))
        self.timestep_fs = engine.timestep_fs
        self.iters = 0
        self.atom_steps = 0

    def advance(self, n_atoms: int) -> None:
        """One engine step over ``n_atoms`` atoms."""
        self.iters += 1
        self.atom_steps += n_atoms

    def rates(self) -> dict[str, float]:
        elapsed = max(self.elapsed, 1e-9)
        steps_s = self.iters / elapsed
        return {"steps/s": steps_s, "ns/day": steps_s * self.timestep_fs * 86400 / 1e6,
                "atom-steps/s": self.atom_steps / elapsed}

    def _postfix(self) -> None:
        r = self.rates()
        fields = {"active": self.active, "steps/s": f"{r['steps/s']:.3g}", "ns/day/system": f"{r['ns/day']:.3g}",
                  "atom-steps/s": f"{r['atom-steps/s']:.3g}"}
        fields.update({k: v for k, v in self.counts.items() if v})
        self._bar.set_postfix(fields, refresh=False)

    def refresh(self, n_active: int) -> None:
        self.set_active(n_active)
        if self._bar is not None:
            self._bar.refresh()

    def summary(self) -> str:
        r = self.rates()
        return (super().summary() + f"; {self.iters} steps, {r['steps/s']:.3g} steps/s, "
                f"{r['ns/day']:.3g} ns/day per system, {r['atom-steps/s']:.3g} atom-steps/s")
