"""What an MD run gives back: results (:class:`MDResult`), trajectory frames, the stability monitors' verdicts and
the progress bar — the host-side outputs of a check of :mod:`geodite_sim.md_job`."""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from geodite_sim.dynamics.verlet import kinetic_energy, temperature
from geodite_sim.io.structures import InputItem, like_input
from geodite_sim.model.strain import cell_volumes, edge_vectors
from geodite_sim.monitors import CONTACT, DRIFT, NAN, TEMPERATURE, Monitors
from geodite_sim.progress import Progress
from geodite_sim.runner import Integrator, Runner
from geodite_sim.status import Status

if TYPE_CHECKING:
    from geodite_sim.trajectory import TrajectoryWriter


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


def slot_item(runner: Runner, slot: int) -> InputItem:
    """The input in an occupied slot of ``runner``."""
    item = runner.items[slot]
    if item is None:
        raise RuntimeError(f"slot {slot} is empty")
    return item


def make_result(item: InputItem, data: dict, trajectory: str | None) -> MDResult:
    """The :class:`MDResult` of a system's result record (``data``: what a checkpoint stores of it)."""
    status = Status(data.get("status") or ("done" if not data.get("error") else "non_finite"))
    if not data.get("started", True):
        return MDResult(item.index, None, 0, data["error"], None, item.label, status=status)
    if item.atoms is None:
        raise ValueError(f"{item.label}: a started system has no structure")
    atoms = item.atoms.copy()
    atoms.positions = data["positions"].double().numpy()
    if data.get("cell") is not None:  # NPT changes the cell
        atoms.set_cell(data["cell"].double().numpy(), scale_atoms=False, apply_constraint=False)
    atoms.set_momenta(data["momenta"].double().numpy(), apply_constraint=False)
    atoms.calc = SinglePointCalculator(atoms, energy=float(data["energy"]), forces=data["forces"].double().numpy())
    group = data.get("group")
    frames = (trajectory, str(group)) if group and trajectory is not None else None
    return MDResult(item.index, like_input(item.original, atoms), int(data["n_steps"]), data["error"],
                    frames, item.label, float(data["energy"]),
                    float(data["temperature"]), status=status,
                    warnings=list(getattr(item, "warnings", None) or []))


def observables(integrator: Integrator, state) -> dict[str, torch.Tensor]:
    """Kinetic energy, temperature and the ensemble's conserved quantity per system."""
    ke = kinetic_energy(state)
    conserved = integrator.conserved
    return {"kinetic_energy": ke, "temperature": temperature(state, ke),
            "conserved": conserved(state) if conserved is not None else state.energy + ke}


def monitor_failures(monitors: Monitors, variable_cell: bool, runner: Runner, obs: dict, occupied: list[int], steps,
                     t_limit: dict[int, float]) -> dict[int, tuple[Status, str]]:
    """The stability monitors on the batch: slot -> (status, message) of the systems they stop."""
    state = runner.state
    m = monitors
    edges = runner.edges.masked(state.positions, state.cell, state.system_index) if runner.edges else None
    vec = None
    if m.min_distance_factor is not None and edges is not None:
        vec = edge_vectors(state.positions, state.cell, state.system_index, edges)
        pad_atom = state.positions.shape[0] - 1  # padding edges (an atom's own images are real edges)
        vec = torch.where((edges.receiver == pad_atom)[:, None], torch.full_like(vec, 1e9), vec)
    limit = torch.ones(state.cell.shape[0], dtype=runner.dtype, device=runner.device)
    for s in occupied:
        limit[s] = t_limit.get(slot_item(runner, s).index, 4.0)
    values = m.check(state.positions, state.momenta, state.forces, state.energy, state.batch.numbers,
                     state.system_index, state.batch.atoms_per_system, obs["temperature"], state.kT,
                     obs["conserved"], state.conserved0, vec, None if edges is None else edges.receiver,
                     None if edges is None else edges.sender, temperature_factor=limit)
    code = values["code"].cpu().numpy()
    failures: dict[int, tuple[Status, str]] = {}
    if (code[occupied] != 0).any():
        host = {k: v.detach().cpu().numpy() for k, v in values.items()}
        for s in occupied:
            if code[s] != 0:
                status = monitor_status(int(code[s]))
                failures[s] = (status, m.describe(int(code[s]), host, s, int(steps[s])))
    if variable_cell and m.max_volume_ratio is not None and runner.slots is not None:  # NPT: the volume per system
        r = m.max_volume_ratio
        ratio = (cell_volumes(state.cell) / runner.slots.volume0).cpu().numpy()
        for s in occupied:
            if s not in failures and not (1.0 / r <= ratio[s] <= r):
                failures[s] = (Status.VOLUME, f"stopped at step {int(steps[s])}: volume "
                               f"{'blow-up' if ratio[s] > 1 else 'collapse'}, V/V0 = {ratio[s]:.3g} outside "
                               f"[1/{r:g}, {r:g}]")
    return failures


def write_frames(writer: TrajectoryWriter | None, last_frame: dict[int, int], save_momenta: bool, runner: Runner,
                 slots: list[int], obs: dict[str, torch.Tensor]) -> None:
    """Buffer a frame of every system slot in ``slots`` (one device-to-host copy)."""
    if not slots:
        return
    state = runner.state
    steps = state.step.cpu().numpy()
    for s in slots:
        last_frame[slot_item(runner, s).index] = int(steps[s])
    if writer is None:
        return
    pos = state.positions.detach().cpu().numpy()
    cell = state.cell.detach().cpu().numpy()
    mom = state.momenta.detach().cpu().numpy() if save_momenta else None
    energy = state.energy.detach().cpu().numpy()
    host = {k: v.detach().cpu().numpy() for k, v in obs.items()}
    offsets = state.batch.offsets.cpu().numpy()
    for s in slots:
        a, b = offsets[s], offsets[s + 1]
        frame = {"positions": pos[a:b], "cell": cell[s], "energy": energy[s], "step": steps[s],
                 **{k: v[s] for k, v in host.items()}}
        if mom is not None:
            frame["momenta"] = mom[a:b]
        writer.add_frame(slot_item(runner, s).index, frame)


def monitor_status(code: int) -> Status:
    """The :class:`Status` of a monitor code (its most severe flag)."""
    if code & NAN:
        return Status.NON_FINITE
    if code & TEMPERATURE:
        return Status.TEMPERATURE
    if code & CONTACT:
        return Status.ATOMS_TOO_CLOSE
    if code & DRIFT:
        return Status.DRIFT
    return Status.NON_FINITE


def open_writer(path: str, attrs: dict, frames: dict[int, int] | None, float_dtype: type[np.floating],
                save_momenta: bool) -> TrajectoryWriter:
    """Open the HDF5 writer (imported lazily so ``import geodite_sim`` does not need h5py)."""
    from geodite_sim.trajectory import TrajectoryWriter

    return TrajectoryWriter(path, attrs, restart_frames=frames, float_dtype=float_dtype, save_momenta=save_momenta)


class MDProgress(Progress):
    """MD progress: a bar over system-steps (all inputs' steps when their number is known, so a one-structure
    run shows its own step progress and ETA), with structures done/failed, active systems, steps/s, ns/day per
    system and atom-steps/s from host-side counters read at checks."""

    def __init__(self, structures, steps, ensemble: str, timestep_fs: float, enabled: bool):
        s = structures
        n = len(s) if isinstance(s, Sized) and not isinstance(s, (str, Atoms)) else None
        total_steps = None
        if n is not None:
            total_steps = int(steps) * n if isinstance(steps, (int, np.integer)) else (
                int(sum(steps)) if hasattr(steps, "__len__") and len(steps) == n else None)
        super().__init__(total=total_steps, desc=f"md {ensemble}", unit="step", enabled=enabled,
                         outcomes=("done", "failed"))
        self.n_inputs = n
        self.timestep_fs = timestep_fs
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
            item = slot_item(runner, s)
            st = int(steps[s])
            new_steps += st - self._seen.get(item.index, 0)
            atoms += (st - self._seen.get(item.index, 0)) * (len(item.atoms) if item.atoms is not None else 0)
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
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)

    def summary(self) -> str:
        r = self.rates()
        units = "structure" if self.done == 1 else "structures"
        parts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        return (f"{self.desc}: {self.done} {units} in {self.elapsed:.1f} s: {parts}; {self.iters} steps, "
                f"{r['steps/s']:.3g} steps/s, {r['ns/day']:.3g} ns/day per system, "
                f"{r['atom-steps/s']:.3g} atom-steps/s")


__all__ = ["MDProgress", "MDResult", "make_result", "monitor_failures", "monitor_status", "observables", "open_writer",
           "slot_item", "write_frames"]
