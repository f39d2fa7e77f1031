"""Where batched jobs run: one local process (default) or a Ray cluster, one long-lived actor per device.

Both executors have the same two methods, with the arguments of :func:`geodite_sim.relax_many` and
:func:`geodite_sim.run_md` (as keywords, or as one :class:`~geodite_sim.settings.RelaxSettings` /
:class:`~geodite_sim.settings.MDSettings`: every setting reaches the run, the executor derives nothing by hand)::

    ex = RayExecutor(address="auto", workers=4, num_gpus_per_worker=1)
    for res in ex.relax_many(structures, model, fmax=0.02, stream=True):   # input order
        ...
    ex.shutdown()

:class:`RayExecutor` cuts the (lazily read) input into shards of ``shard_size`` contiguous input
positions, keeps ``inflight_per_worker`` shards submitted to every actor (a finished shard is
refilled at once), and yields the results in input order with ``.index`` = input position. A shard
is a pure function of its structures and the settings (same shard -> same results: the engine is
batch-invariant), so a shard lost with its actor (``ray.exceptions.RayActorError``) is simply run
again on a replacement actor; a shard that kills its actor ``max_shard_retries`` times is split
into single structures, and a structure that still kills one gets a per-structure error instead of
sinking the job. Only ``inflight_per_worker × workers`` shards (plus the ones waiting for an
earlier shard, bounded by the same number) are held in memory: a job over 10^6 structures streams.
Results are stored by the caller (the driver): see :mod:`geodite_sim.store` and ``docs/ray.md``.

``ray`` is imported only when a :class:`RayExecutor` is used (``pip install geodite-sim[ray]``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from geodite_sim.ray_cluster import ShardCluster, as_iterable

log = logging.getLogger(__name__)


def _settings(cls, settings: Any, kwargs: dict) -> Any:
    """``settings`` (a RelaxSettings / MDSettings), or one built from relax_many / run_md keywords."""
    kwargs.pop("executor", None)
    if settings is None:
        return cls.from_kwargs(**kwargs)
    if kwargs:
        raise TypeError(f"give the settings either as a {cls.__name__} or as keywords, not both ({sorted(kwargs)})")
    return settings


class LocalExecutor:
    """Run in this process: :func:`geodite_sim.relax_many` / :func:`geodite_sim.run_md` unchanged."""

    name = "local"

    def relax_many(self, structures: Any, model: Any = None, settings: Any = None, *, stream: bool = False,
                   progress: bool = True, total: int | None = None, **kwargs):
        """``geodite_sim.relax_many(structures, model, **kwargs)`` (``stream=True``: completion order)."""
        from geodite_sim.relax import run_relax
        from geodite_sim.settings import RelaxSettings

        settings = _settings(RelaxSettings, settings, kwargs)
        return run_relax(structures, model, settings, stream=stream, progress=progress, total=total)

    def run_md(self, structures: Any, model: Any = None, settings: Any = None, *, progress: bool = True,
               **kwargs):
        """``geodite_sim.run_md(structures, model, **kwargs)``."""
        from geodite_sim.io.runs import match_runs
        from geodite_sim.md import run_md_settings
        from geodite_sim.settings import MDSettings

        kwargs.pop("stream", None)
        settings = _settings(MDSettings, settings, kwargs)
        structures, _ = match_runs(structures, {"temperature": settings.temperature, "steps": settings.steps,
                                                **settings.ensemble_params})
        return run_md_settings(structures, model, settings, progress=progress)

    def shutdown(self) -> None:
        pass

    def describe(self) -> str:
        return "local (one process)"


class RayExecutor(ShardCluster):
    """Run shards of a job on a Ray cluster, one long-lived actor per device.

    Args:
        address: ``None`` (the running Ray session, else a new local cluster), ``"auto"`` (the cluster this
            node belongs to, started with ``ray start``) or ``"HOST:PORT"`` of a head node.
        workers: actors to start (default: one per GPU when ``num_gpus_per_worker`` > 0, else the cluster's
            CPUs / ``num_cpus_per_worker``).
        num_cpus_per_worker: CPUs reserved per actor (also its torch threads, at least 1).
        num_gpus_per_worker: 0 (CPU actors) or 1 (one actor per GPU; the model moves to ``cuda``).
        shard_size: contiguous inputs per shard (16-64: large enough to fill a batch, small enough to balance).
        inflight_per_worker: shards submitted to each actor at a time (2: the next one waits while one runs).
        max_shard_retries: reruns of a shard whose actor died before it is split into single structures.
        device: device of the model inside the actors (default ``cuda`` with GPUs, else the model's).
        init_kwargs: extra ``ray.init`` arguments when this executor starts Ray.
    """

    name = "ray"

    # ------------------------------------------------------------------ jobs
    def relax_many(self, structures: Any, model: Any = None, settings: Any = None, *, stream: bool = False,
                   progress: bool = True, total: int | None = None, **kwargs):
        """:func:`geodite_sim.relax_many` on the cluster: a list in input order, or (``stream=True``) an
        iterator in input order. Every input yields one ``RelaxResult`` with ``.index`` = input position.

        Every setting reaches the actors except ``observers``: they run here, on the driver (``on_result`` for each
        result in input order, ``on_close`` at the end; the actors' checks are not seen). A per-input
        ``relax_cell`` sequence is sliced per shard."""
        from geodite_sim.relax import RelaxResult
        from geodite_sim.settings import RelaxSettings

        if model is None:
            from geodite_sim.model import load_model

            model = load_model()
        settings = _settings(RelaxSettings, settings, kwargs)
        observers = tuple(settings.observers)
        remote = dataclasses.replace(settings, observers=())
        if total is None and hasattr(structures, "__len__") and not isinstance(structures, (str, os.PathLike)):
            total = len(structures)
        rc = remote.relax_cell
        per_shard = None
        if not callable(rc) and not isinstance(rc, (bool, int)) and type(rc).__name__ != "bool_":
            def per_shard(st, start: int, n: int):
                return dataclasses.replace(st, relax_cell=[bool(rc[i]) for i in range(start, start + n)])

        def fix(res, pos):
            return _relabel(res, pos)

        def fail(pos, obj, msg):
            from geodite_sim.io.structures import Labeled

            if isinstance(obj, Labeled):
                obj, label = obj.structure, obj.label
            else:
                label = str(obj) if isinstance(obj, (str, os.PathLike)) else f"{pos}:{type(obj).__name__}"
            res = RelaxResult(structure=obj, energy=math.nan, energy_per_atom=math.nan, forces=None, stress=None,
                              n_steps=0, converged=False, error=f"{label}: {msg}", index=pos, label=label)
            return _model_error(res)

        gen = self.map_shards("relax", structures, model, remote, fix, fail, per_shard)
        gen = _observed(self._with_progress(gen, total, progress, "relax", ("converged", "not_converged", "failed"),
                                            lambda r: r.status), observers)
        if stream:
            return gen
        return list(gen)

    def run_md(self, structures: Any, model: Any = None, settings: Any = None, *, progress: bool = True,
               **kwargs) -> list:
        """:func:`geodite_sim.run_md` on the cluster: one ``MDResult`` per input, in input order.

        Each shard is one ``run_md`` call on an actor with its own trajectory (and checkpoint) file,
        ``<stem>.shard<first>-<last><suffix>`` next to ``trajectory``; ``MDResult.trajectory`` names the file
        and group of each run. Initial momenta not given with the inputs are drawn here, on the driver, with
        the input's global position (``maxwell_boltzmann(atoms, T, seed, index)``, as run_md does), so NVE and
        NHC runs are bit-identical to one ``run_md`` call. Per-structure ``temperature``/``steps`` (and per-system
        ensemble parameters such as ``pressure``) sequences are sliced per shard. Every other setting reaches the
        actors except ``observers``, which run here (``on_result`` per result, ``on_close``). Langevin noise is
        seeded by (seed, shard-local index) until the runner accepts an index offset (a known difference from the
        single-process run).
        """
        from geodite_sim.io.runs import match_runs
        from geodite_sim.md import MDResult
        from geodite_sim.settings import MDSettings

        if model is None:
            from geodite_sim.model import load_model

            model = load_model()
        kwargs.pop("stream", None)
        kwargs.pop("total", None)
        settings = _settings(MDSettings, settings, kwargs)
        structures, _ = match_runs(structures, {"temperature": settings.temperature, "steps": settings.steps,
                                                **settings.ensemble_params})
        observers = tuple(settings.observers)
        remote = dataclasses.replace(settings, observers=())
        seed = int(settings.seed)
        temperature = settings.temperature
        traj = None if settings.trajectory is None else Path(settings.trajectory)
        ckpt = None if settings.checkpoint is None else Path(settings.checkpoint)

        def with_momenta(items: Iterable) -> Iterator:
            from geodite_sim.dynamics.velocities import maxwell_boltzmann
            from geodite_sim.io.structures import to_atoms

            for index, obj in enumerate(as_iterable(items)):
                try:
                    atoms = to_atoms(obj)
                except Exception:
                    yield obj  # the actor's run_md reports why
                    continue
                if not atoms.has("momenta"):
                    t = _entry(temperature, index)
                    atoms = atoms.copy()
                    atoms.set_momenta(maxwell_boltzmann(atoms, float(t or 0.0), seed, index), apply_constraint=False)
                yield atoms

        def sliced(v: Any, start: int, n: int) -> Any:
            if v is None or isinstance(v, (int, float, str)) or not hasattr(v, "__getitem__"):
                return v
            return [v[i] for i in range(start, start + n)]

        def per_shard(st: Any, start: int, n: int) -> Any:
            changes: dict[str, Any] = {"temperature": sliced(st.temperature, start, n),
                                       "steps": sliced(st.steps, start, n),
                                       "ensemble_params": {k: sliced(v, start, n)
                                                           for k, v in st.ensemble_params.items()}}
            tag = f".shard{start:06d}-{start + n - 1:06d}"
            if traj is not None:
                changes["trajectory"] = str(traj.with_name(traj.stem + tag + traj.suffix))
            if ckpt is not None:
                changes["checkpoint"] = str(ckpt.with_name(ckpt.name + tag))
            elif st.checkpoint_every is not None and traj is not None:
                changes["checkpoint"] = changes["trajectory"] + ".ckpt"
            return dataclasses.replace(st, **changes)

        def fix(res, pos):
            return _relabel(res, pos)

        def fail(pos, obj, msg):
            label = str(obj) if isinstance(obj, (str, os.PathLike)) else f"{pos}:{type(obj).__name__}"
            return _model_error(MDResult(index=pos, final=None, n_steps=0, error=f"{label}: {msg}", label=label))

        gen = self.map_shards("run_md", with_momenta(structures), model, remote, fix, fail, per_shard)
        return list(_observed(self._with_progress(gen, None, progress, "md", ("done", "failed"),
                                                  lambda r: "failed" if r.error else "done"), observers))

    @staticmethod
    def _with_progress(gen: Iterator, total: int | None, enabled: bool, desc: str, outcomes: tuple,
                       status: Any) -> Iterator:
        from geodite_sim.progress import Progress

        bar = Progress(total=total, desc=f"{desc} (ray)", unit="structure", enabled=enabled, outcomes=outcomes)
        try:
            for res in gen:
                bar.finish(status(res))
                yield res
        finally:
            bar.close()


def _observed(gen: Iterator, observers: tuple) -> Iterator:
    """``gen``'s results, each handed to the observers' ``on_result`` (then ``on_close`` at the end)."""
    from geodite_sim.runner.hooks import as_observers  # (torch: not at import, the CLI's parsers import this module)

    hooks = as_observers(observers)
    try:
        for res in gen:
            for obs in hooks:
                obs.on_result(res)
            yield res
    finally:
        for obs in hooks:
            obs.on_close()


def _model_error(res: Any) -> Any:
    """Mark a result made for an input that killed its workers with the model-error status (when results carry one)."""
    if hasattr(res, "status") and not isinstance(type(res).__dict__.get("status"), property):
        try:
            from geodite_sim.status import Status

            res.status = Status.MODEL_ERROR
        except ImportError:
            pass
    return res


def _relabel(res: Any, pos: int) -> Any:
    """A shard-local result re-labelled with its input position (``index``; ``"i:formula"`` labels and the
    messages that start with them)."""
    res.index = pos
    old = res.label or ""
    head, sep, tail = old.partition(":")
    if sep and head.isdigit():
        new = f"{pos}:{tail}"
        res.label = new
        if res.error and res.error.startswith(old):
            res.error = new + res.error[len(old):]
        if getattr(res, "warnings", None):
            res.warnings = [new + w[len(old):] if isinstance(w, str) and w.startswith(old) else w
                            for w in res.warnings]
    return res


def _entry(value: Any, index: int) -> Any:
    if value is None or isinstance(value, (int, float)):
        return value
    return value[index]


def make_executor(ray: str | None = None, workers: int | None = None, num_gpus_per_worker: float | None = None,
                  num_cpus_per_worker: float = 1, **kwargs) -> LocalExecutor | RayExecutor:
    """The CLIs' executor: ``--ray auto|ADDRESS|local`` (+ ``--workers N``) -> :class:`RayExecutor`, else local.

    ``local`` starts a one-machine Ray cluster in this process. GPUs: one actor per GPU when the cluster
    has GPUs (``num_gpus_per_worker`` None = auto).
    """
    if ray is None:
        if workers not in (None, 1):
            raise ValueError("--workers needs --ray (a Ray cluster); without it one process does the work")
        return LocalExecutor()
    address = None if ray == "local" else ray
    ex = RayExecutor(address=address, workers=workers, num_cpus_per_worker=num_cpus_per_worker,
                     num_gpus_per_worker=num_gpus_per_worker or 0, **kwargs)
    if num_gpus_per_worker is None:
        rt = ex._ray()
        if rt.cluster_resources().get("GPU", 0) >= 1:
            ex.num_gpus_per_worker = 1
            ex.device = "cuda"
    return ex


def add_executor_arguments(parser) -> None:
    """``--ray`` and ``--workers`` for a sub-command."""
    parser.add_argument("--ray", default=None, metavar="auto|ADDRESS|local",
                        help="run on a Ray cluster: 'auto' (this node's cluster, see `ray start`), HOST:PORT of the "
                             "head node, or 'local' (a one-machine cluster started here); default: one process")
    parser.add_argument("--workers", type=int, default=None,
                        help="Ray actors (default: one per GPU, else one per CPU of the cluster)")
    parser.add_argument("--shard-size", type=int, default=32, metavar="N",
                        help="with --ray: contiguous inputs per shard (default 32)")


__all__ = ["LocalExecutor", "RayExecutor", "add_executor_arguments", "make_executor"]
