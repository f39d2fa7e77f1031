"""Batched molecular dynamics: ``run_md``, the MD front-end of the one runner (:mod:`geodite_sim.runner`).

Many independent structures are packed into one padded batch and advanced together by an
integrator of the runner's registry (velocity Verlet, Nosé–Hoover chain, Langevin, ...: ASE's
equations, per-system targets and thermostat states). Steps run on the device without host
reads; at checks (every ``check_interval`` steps, default the monitors' ``check_every``) this
front-end writes frames to HDF5, runs the stability monitors, writes checkpoints and reports
progress, and the runner replaces finished systems by queued ones.

A system pauses at its frame boundaries and at its last step until the next check, so frames and
results are exactly those of a one-step-at-a-time run. See ``docs/md.md`` and ``docs/runner.md``.

This module is the public entry (``run_md``); the job on the runner is :mod:`geodite_sim.md_job`, its outputs
(results, frames, monitors, progress) :mod:`geodite_sim.md_output`, its checkpoints :mod:`geodite_sim.md_checkpoint`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from geodite_sim.io.runs import match_runs
from geodite_sim.md_job import ADMISSION_MIN_DISTANCE_FACTOR, RESTART_KEYS, MDJob, default_max_atoms
from geodite_sim.md_output import MDResult
from geodite_sim.model.torchsim_adapter import as_engine_model
from geodite_sim.monitors import Monitors
from geodite_sim.runner import REGISTRY, StepConfig
from geodite_sim.settings import MDSettings
from geodite_sim.threads import thread_limit

#: The MD entries of the runner registry (nve, nvt_nhc, nvt_langevin, nvt_bussi, npt_mtk_iso, npt_mtk).
ENSEMBLES = tuple(name for name, entry in REGISTRY.items() if entry.kind == "md")
log = logging.getLogger(__name__)
#: (names kept for callers of the module before the split: the job and run_md's capacity default)
_MDJob, _default_max_atoms = MDJob, default_max_atoms


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
        max_atoms: atom budget of the packed batch (systems beyond it wait in the queue). Default: the one
            capacity policy of every front-end (:func:`geodite_sim.runner.capacity.estimate_capacity`: on the CPU a
            rule on the model's width, on CUDA the memory model at 80 % of the free device memory,
            docs/memory-model.md); a restart reuses the checkpointed run's value.
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
    job = MDJob(structures, model, settings, progress)
    with thread_limit(settings.threads):
        return job.run()


def md_job(structures, model=None, ensemble: str = "nvt_nhc", temperature=None, timestep: float = 1.5,
           steps=1000, trajectory=None, progress: bool = False, **kwargs) -> MDJob:
    """The job ``run_md`` would run with these arguments (for tests and benchmarks: ``job.prepare()`` gives its
    runner; ``runner.check()`` admits, ``runner.advance(n)`` steps)."""
    if model is None:
        from geodite_sim.model import load_model

        model = load_model()
    settings = MDSettings.from_kwargs(ensemble=ensemble, temperature=temperature, timestep=timestep, steps=steps,
                                      trajectory=trajectory, **kwargs)
    structures, _ = match_runs(structures, {"temperature": temperature, "steps": steps,
                                            **settings.ensemble_params})
    return MDJob(structures, model, settings, progress)


__all__ = ["ADMISSION_MIN_DISTANCE_FACTOR", "ENSEMBLES", "MDJob", "MDResult", "RESTART_KEYS", "md_job", "run_md",
           "run_md_settings"]
