"""The registry of optimisers and integrators the runner drives: ``name -> Integrator(init, step, ...)``.

Each entry is a pair of plain functions over a dataclass state (torch-sim's and jax-md's shape):

* ``init(batch, evaluation, per_system, settings) -> state``: a fresh state of newly admitted
  systems (host side, once per admission); ``evaluation`` holds their energy [S], forces [N, 3]
  and stress [S, 3, 3] at the initial positions, ``per_system`` their per-structure settings
  as [S] tensors (temperature, steps, seeds, relax_cell ...), ``settings`` the run's scalars.
* ``step(state, force_fn, settings) -> state``: one step of every system (device side, static
  shapes, no host read). ``force_fn(batch) -> Evaluation(energy, forces, stress)`` evaluates
  the model at the batch's positions and cell. The step never modifies its input state or
  tensors in place (the runner undoes the step of parked systems with ``torch.where``).
* ``steps_taken(state) -> [S]`` int64 and ``finished(state) -> [S]`` bool.

Adding an ensemble or optimiser = one module under :mod:`geodite_sim.dynamics` with its
state and step + one :func:`register` call below (docs/runner.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple, TypedDict

import torch
from ase import units

from geodite_sim.batch import Batch
from geodite_sim.dynamics.fire import FireParams, FireState, fire_init, fire_move
from geodite_sim.dynamics.langevin import LangevinState, langevin_step
from geodite_sim.dynamics.nose_hoover import init_chain, nhc_conserved, nhc_step
from geodite_sim.dynamics.optimizer import relax_converged
from geodite_sim.dynamics.verlet import MDState, kinetic_energy, nve_conserved, verlet_step
from geodite_sim.state import system_field


class Evaluation(NamedTuple):
    """Model outputs at one configuration: energy [S] eV, forces [N, 3] eV/Å, stress [S, 3, 3] eV/Å³."""

    energy: torch.Tensor
    forces: torch.Tensor
    stress: torch.Tensor


@dataclass(frozen=True)
class Integrator:
    """One registry entry (see the module docstring). ``kind`` is ``"relax"`` or ``"md"``."""

    name: str
    kind: str
    init: Callable[..., Any]
    step: Callable[..., Any]
    steps_taken: Callable[[Any], torch.Tensor]
    finished: Callable[[Any], torch.Tensor]
    needs_stress: bool = False
    conserved: Callable[[Any], torch.Tensor] | None = None
    #: what the trajectory's ``conserved`` series holds (HDF5 attribute ``conserved``).
    conserved_label: str = "total_energy (E_pot + E_kin; not conserved by this ensemble)"
    description: str = ""
    #: run_md keyword arguments that may be one value per structure (given to ``init`` in ``per_system``).
    per_system_params: tuple[str, ...] = ()
    #: defaults of the entry's own run_md keyword arguments (e.g. ``pdamp``), documented in docs/runner.md.
    defaults: dict = field(default_factory=dict)
    #: whether the cell changes (NPT): the MD monitors then watch the volume.
    variable_cell: bool = False
    #: whether the ensemble has a thermostat, so run_md and ``md run`` require a target temperature (False: NVE, where
    #: a temperature only draws the initial Maxwell–Boltzmann momenta).
    needs_temperature: bool = True
    #: whether the thermostat acts by rescaling the momenta (Bussi: p <- α p, α from target over current kinetic
    #: energy): it cannot heat a system from zero kinetic energy, so admission refuses one, as ASE's Bussi does.
    rescales_momenta: bool = False


REGISTRY: dict[str, Integrator] = {}


def register(entry: Integrator) -> Integrator:
    """Add ``entry`` to :data:`REGISTRY` (names are unique)."""
    if entry.name in REGISTRY:
        raise ValueError(f"integrator {entry.name!r} is already registered")
    REGISTRY[entry.name] = entry
    return entry


def get_integrator(name: str) -> Integrator:
    """The entry called ``name``; ValueError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown integrator/ensemble {name!r}; choose from {sorted(REGISTRY)}") from None


# ---------------------------------------------------------------------------------------------- relaxation
@dataclass
class RelaxState(FireState):
    """FIRE state plus ``volume0`` [S], the cell volume at the start (Å³; reference of the volume check). The
    ``constraints`` (FixAtoms, FixCartesian, FixSymmetry per system) of every relaxation state are applied where
    ASE applies them (:func:`_relax_step`)."""

    volume0: torch.Tensor = system_field(default=None)


def _constrained(c, batch: Batch, ev: Evaluation) -> Evaluation:
    """Forces and stress as ``atoms.get_forces()`` / ``get_stress()`` return them under the constraints."""
    if c is None or c.is_empty:
        return ev
    return Evaluation(ev.energy, c.adjust_forces(ev.forces, batch), c.adjust_stress(ev.stress, batch))


def _fire_state(batch: Batch, per_system: dict, settings: dict) -> RelaxState:
    from geodite_sim.model.strain import cell_volumes

    state = fire_init(batch, per_system["relax_cell"], settings["fire"], settings.get("cell_factor"),
                      state_cls=RelaxState, volume0=cell_volumes(batch.cell), constraints=per_system.get("constraints"))
    assert isinstance(state, RelaxState)  # fire_init builds its ``state_cls``
    return state


def _lbfgs_state(batch: Batch, per_system: dict, settings: dict):
    from geodite_sim.dynamics.lbfgs import lbfgs_init

    return lbfgs_init(batch, per_system["relax_cell"], settings["lbfgs"], settings.get("cell_factor"),
                      constraints=per_system.get("constraints"))


def _bfgs_state(batch: Batch, per_system: dict, settings: dict):
    from geodite_sim.dynamics.bfgs import bfgs_init

    return bfgs_init(batch, per_system["relax_cell"], settings["bfgs"], settings.get("cell_factor"),
                     constraints=per_system.get("constraints"))


def _relax_init(make_state, cell: bool):
    """``init`` of a relaxation entry: the optimiser's fresh state at the constrained initial evaluation, and ASE's
    convergence test there (a structure converged at the start, or with max_steps = 0, is done without a step)."""

    def init(batch: Batch, ev: Evaluation, per_system: dict, settings: dict):
        state = make_state(batch, per_system, settings)
        ev = _constrained(state.constraints, batch, ev)
        state = replace(state, energy=ev.energy, forces=ev.forces, stress=ev.stress)
        return relax_converged(state, settings["fmax"], settings["max_steps"], cell=cell)

    return init


def _relax_step(move, cell: bool, learn=None):
    """``step`` of a relaxation entry: move (``move(state, settings, cell)``), constrain the new cell and positions,
    evaluate, then ASE's convergence test at the new evaluation (so a system that converged is done right after the
    step that got it there and leaves at the next check without another model call); quasi-Newton methods then
    ``learn(old, new, cell)`` from the step (their history or Hessian update)."""

    def step(state, force_fn, settings: dict):
        c = state.constraints
        new = move(state, settings, cell)
        if c is not None and not c.is_empty:  # FixSymmetry/FixAtoms when the filter sets cell and positions
            new_cell, _ = c.adjust_cell(state.batch.cell, new.batch.cell)
            pos = c.adjust_positions(state.batch, new.batch.positions, new_cell)
            new = replace(new, batch=new.batch.with_positions(pos, new_cell))
        ev = _constrained(c, new.batch, force_fn(new.batch))
        new = replace(new, energy=ev.energy, forces=ev.forces, stress=ev.stress)
        new = relax_converged(new, settings["fmax"], settings["max_steps"], cell=cell)
        return new if learn is None else learn(state, new, cell)

    return step


def _fire_move(state, settings, cell):
    return fire_move(state, settings["fire"], cell=cell)


def _lbfgs_move(state, settings, cell):
    from geodite_sim.dynamics.lbfgs import lbfgs_move

    return lbfgs_move(state, settings["lbfgs"], cell=cell)


def _bfgs_move(state, settings, cell):
    from geodite_sim.dynamics.bfgs import bfgs_move

    return bfgs_move(state, settings["bfgs"], cell=cell)


def _n_steps(state) -> torch.Tensor:
    return state.n_steps


def _relax_done(state) -> torch.Tensor:
    return state.done


def _register_relax() -> None:
    from geodite_sim.dynamics.bfgs import bfgs_learn
    from geodite_sim.dynamics.lbfgs import lbfgs_learn

    methods = {"fire": (_fire_state, _fire_move, None, "ase.optimize.FIRE"),
               "lbfgs": (_lbfgs_state, _lbfgs_move, lbfgs_learn, "ase.optimize.LBFGS"),
               "bfgs": (_bfgs_state, _bfgs_move, bfgs_learn, "ase.optimize.BFGS")}
    for name, (make_state, move, learn, ase_name) in methods.items():
        for cell in (False, True):
            where = f"atoms + cell ({ase_name} on ase.filters.FrechetCellFilter)" if cell else f"the atoms ({ase_name})"
            register(Integrator(name + ("_frechet" if cell else ""), "relax", _relax_init(make_state, cell),
                                _relax_step(move, cell, learn), _n_steps, _relax_done, needs_stress=True,
                                description=f"{name.upper() if name != 'lbfgs' else 'L-BFGS'} on {where}"))


_register_relax()

#: Relaxation methods of :func:`geodite_sim.relax_many` (``optimizer=``): registry entries ``name`` (atoms only)
#: and ``name_frechet`` (atoms + cell).
OPTIMIZERS = ("fire", "lbfgs", "bfgs")


# ---------------------------------------------------------------------------------------------- MD
def md_base_state(batch: Batch, ev: Evaluation, per_system: dict) -> MDState:
    """The fields every MD state has: momenta, kT, step counters, seeds, energy/forces/stress at step 0, and
    the constraints (FixAtoms/FixCartesian; None when the admitted systems have none)."""
    return MDState(batch=batch, energy=ev.energy, forces=ev.forces, stress=ev.stress, momenta=per_system["momenta"],
                   kT=per_system["kT"], step=per_system["step"], target_steps=per_system["target_steps"],
                   seed=per_system["seed"], constraints=per_system.get("constraints"))


def _as(cls, state: MDState, **extra):
    values = {f.name: getattr(state, f.name) for f in fields(state)}
    return cls(**values, **extra)


def _with_conserved(state, conserved):
    state.conserved0 = conserved(state)
    return state


def _md_steps(state) -> torch.Tensor:
    return state.step


def _md_finished(state) -> torch.Tensor:
    return state.step >= state.target_steps


def _two(force_fn):
    """A force function returning (energy, forces) for the integrators that need no stress."""
    def f(batch):
        ev = force_fn(batch)
        return ev.energy, ev.forces

    return f


def _nve_init(batch, ev, per_system, settings):
    return _with_conserved(md_base_state(batch, ev, per_system), _nve_conserved)


def _nve_conserved(state):
    return nve_conserved(state, kinetic_energy(state))


def _nve_step(state, force_fn, settings):
    return verlet_step(state, _two(force_fn), settings["dt"])


def _nhc_init(batch, ev, per_system, settings):
    state = init_chain(md_base_state(batch, ev, per_system), settings["tdamp_fs"] * units.fs, settings["chain_length"])
    return _with_conserved(state, _nhc_conserved)


def _nhc_conserved(state):
    return nhc_conserved(state, kinetic_energy(state))


def _nhc_step(state, force_fn, settings):
    return nhc_step(state, _two(force_fn), settings["dt"], settings["tloop"])


def _langevin_init(batch, ev, per_system, settings):
    base = md_base_state(batch, ev, per_system)
    friction = torch.full_like(base.kT, settings["friction_per_fs"] / units.fs)
    return _with_conserved(_as(LangevinState, base, friction=friction), _nve_conserved)


def _langevin_step(state, force_fn, settings):
    return langevin_step(state, _two(force_fn), settings["dt"], settings["fix_com"])


register(Integrator("nve", "md", _nve_init, _nve_step, _md_steps, _md_finished, conserved=_nve_conserved,
                    needs_temperature=False,
                    conserved_label="total_energy (E_pot + E_kin)",
                    description="velocity Verlet (ase.md.verlet.VelocityVerlet)"))
register(Integrator("nvt_nhc", "md", _nhc_init, _nhc_step, _md_steps, _md_finished, conserved=_nhc_conserved,
                    needs_temperature=True,
                    conserved_label="nhc (E_pot + E_kin + chain energy; ASE's get_conserved_energy)",
                    description="Nosé–Hoover chain NVT (ase.md.nose_hoover_chain.NoseHooverChainNVT)"))
register(Integrator("nvt_langevin", "md", _langevin_init, _langevin_step, _md_steps, _md_finished,
                    needs_temperature=True,
                    conserved=None, description="Langevin NVT (ase.md.langevin.Langevin)"))

__all__ = ["Evaluation", "FireParams", "Integrator", "OPTIMIZERS", "REGISTRY", "RelaxState", "get_integrator",
           "md_base_state", "register"]


# ---------------------------------------------------------------------------------------------- NPT, Bussi
def _mtk_init(init):
    def f(batch, ev, per_system, settings):
        from geodite_sim.dynamics.mtk import gpa_to_ev_per_a3

        base = md_base_state(batch, ev, per_system)
        return init(base, pressure=gpa_to_ev_per_a3(per_system["pressure"]),
                    tdamp=settings["tdamp_fs"] * units.fs, pdamp=settings["pdamp_fs"] * units.fs,
                    chain_length=settings["chain_length"], barostat_chain_length=settings["barostat_chain_length"])

    return f


def _mtk_step(step):
    def f(state, force_fn, settings):
        return step(state, force_fn, settings["dt"], settings["tloop"], settings["ploop"])

    return f


def _bussi_init(batch, ev, per_system, settings):
    from geodite_sim.dynamics.bussi import bussi_init

    return bussi_init(md_base_state(batch, ev, per_system), taut=settings["tdamp_fs"] * units.fs)


def _bussi_step(state, force_fn, settings):
    from geodite_sim.dynamics.bussi import bussi_step

    return bussi_step(state, force_fn, settings["dt"])


def _lazy(module: str, name: str):
    def f(state):
        import importlib

        return getattr(importlib.import_module(module), name)(state)

    return f


class _NPTOptions(TypedDict):
    """The :class:`Integrator` fields the NPT entries share."""

    per_system_params: tuple[str, ...]
    needs_stress: bool
    variable_cell: bool
    defaults: dict[str, float | int]


def _register_npt() -> None:
    from geodite_sim.dynamics import mtk

    npt = _NPTOptions(per_system_params=("pressure",), needs_stress=True, variable_cell=True,
                      defaults={"pressure": 0.0, "pdamp_factor": 1000.0, "barostat_chain_length": 3, "ploop": 1,
                                "chain_length": 3})
    register(Integrator("npt_mtk_iso", "md", _mtk_init(mtk.mtk_iso_init), _mtk_step(mtk.mtk_iso_step), _md_steps,
                        _md_finished, conserved=mtk.mtk_iso_conserved, needs_temperature=True,
                        conserved_label="mtk (E_pot + E_kin + chains + barostat + P V; ASE's get_conserved_energy)",
                        description="isotropic MTK NPT (ase.md.nose_hoover_chain.IsotropicMTKNPT)", **npt))
    register(Integrator("npt_mtk", "md", _mtk_init(mtk.mtk_init), _mtk_step(mtk.mtk_step), _md_steps,
                        _md_finished, conserved=mtk.mtk_conserved, needs_temperature=True,
                        conserved_label="mtk (E_pot + E_kin + chains + barostat + P V; ASE's get_conserved_energy)",
                        description="full-cell MTK NPT (ase.md.nose_hoover_chain.MTKNPT)", **npt))


_register_npt()
register(Integrator("nvt_bussi", "md", _bussi_init, _bussi_step, _md_steps, _md_finished,
                    needs_temperature=True, rescales_momenta=True,
                    conserved=_lazy("geodite_sim.dynamics.bussi", "bussi_conserved"),
                    conserved_label="bussi (E_pot + E_kin - energy transferred by the thermostat)",
                    description="stochastic velocity rescaling (ase.md.bussi.Bussi)"))


def names(kind: str) -> tuple[str, ...]:
    """The registered names of one kind, in registration order: ``"md"`` (run_md's ensembles), ``"relax"`` (entries,
    ``_frechet`` included), ``"optimizer"`` (:data:`OPTIMIZERS`); the command line's choices (read-only)."""
    return OPTIMIZERS if kind == "optimizer" else tuple(n for n, e in REGISTRY.items() if e.kind == kind)
