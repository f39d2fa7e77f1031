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
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------------------------- Ray worker
class _Worker:
    """The Ray actor: holds the model on its device and runs shards (``ray.remote`` is applied lazily)."""

    def __init__(self, model: Any, device: str | None, threads: int):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(max(1, int(threads)))
        except ImportError:
            pass
        if device is not None and hasattr(model, "to") and torch.device(device) != torch.device(model.device):
            model = model.to(device)
        self.model = model

    def relax(self, structures: list, settings: Any) -> list:
        from geodite_sim.relax import run_relax

        return run_relax(structures, self.model, settings, stream=False, progress=False)

    def run_md(self, structures: list, settings: Any) -> list:
        from geodite_sim.md import run_md_settings

        return run_md_settings(structures, self.model, settings, progress=False)

    def pid(self) -> int:
        return os.getpid()


@dataclasses.dataclass
class _Shard:
    """Contiguous input positions ``start .. start + len(items) - 1`` of shard ``sid`` (offset within it)."""

    sid: int
    start: int
    offset: int
    items: list
    attempts: int = 0


class RayExecutor:
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

    def __init__(self, address: str | None = None, workers: int | None = None, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, *, shard_size: int = 32, inflight_per_worker: int = 2,
                 max_shard_retries: int = 2, device: str | None = None, init_kwargs: dict | None = None):
        if shard_size < 1 or inflight_per_worker < 1:
            raise ValueError("shard_size and inflight_per_worker must be >= 1")
        self.address = address
        self.workers = workers
        self.num_cpus_per_worker = num_cpus_per_worker
        self.num_gpus_per_worker = num_gpus_per_worker
        self.shard_size = int(shard_size)
        self.inflight_per_worker = int(inflight_per_worker)
        self.max_shard_retries = int(max_shard_retries)
        self.device = device if device is not None else ("cuda" if num_gpus_per_worker else None)
        self.init_kwargs = dict(init_kwargs or {})
        self.actors: list = []
        self.started_ray = False
        self.n_replaced = 0
        self.startup_s: float | None = None
        self._model_key: int | None = None
        self._model_ref = None
        self._actor_cls = None

    # ------------------------------------------------------------------ cluster and actors
    def _ray(self):
        try:
            import ray
        except ImportError as exc:
            raise ImportError("the Ray executor needs ray: pip install 'geodite-sim[ray]'") from exc
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": True, **self.init_kwargs}
            if self.address is not None:
                kwargs["address"] = self.address
            ray.init(**kwargs)
            self.started_ray = True
        return ray

    def n_workers(self) -> int:
        if self.workers is not None:
            return int(self.workers)
        ray = self._ray()
        res = ray.cluster_resources()
        if self.num_gpus_per_worker:
            return max(1, int(res.get("GPU", 0) // self.num_gpus_per_worker))
        return max(1, int(res.get("CPU", 1) // max(self.num_cpus_per_worker, 1e-9)))

    def _new_actor(self):
        ray = self._ray()
        if self._actor_cls is None:
            self._actor_cls = ray.remote(_Worker)
        return self._actor_cls.options(num_cpus=self.num_cpus_per_worker, num_gpus=self.num_gpus_per_worker,
                                       max_restarts=0).remote(self._model_ref, self.device,
                                                              max(1, math.floor(self.num_cpus_per_worker)))

    def start(self, model: Any) -> None:
        """Start the actors holding ``model`` (done on first use; again when the model object changes)."""
        ray = self._ray()
        if self.actors and self._model_key == id(model):
            return
        t0 = time.perf_counter()
        self._kill_actors()
        self._model_ref = ray.put(model)
        self._model_key = id(model)
        self.actors = [self._new_actor() for _ in range(self.n_workers())]
        ray.get([a.pid.remote() for a in self.actors])  # wait until every actor holds the model
        self.startup_s = time.perf_counter() - t0
        log.info("ray: %d actor(s) ready in %.1f s", len(self.actors), self.startup_s)

    def _kill_actors(self) -> None:
        if not self.actors:
            return
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []

    def shutdown(self) -> None:
        """Kill the actors (and Ray itself if this executor started it)."""
        self._kill_actors()
        self._model_ref = None
        self._model_key = None
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False

    def describe(self) -> str:
        where = self.address or "local cluster"
        return (f"ray ({where}): {self.workers or 'auto'} worker(s) × {self.num_cpus_per_worker} CPU"
                + (f" + {self.num_gpus_per_worker} GPU" if self.num_gpus_per_worker else ""))

    # ------------------------------------------------------------------ the shard loop
    def _shards(self, structures: Iterable) -> Iterator[_Shard]:
        it = iter(_as_iterable(structures))
        for sid in itertools.count():
            items = list(itertools.islice(it, self.shard_size))
            if not items:
                return
            yield _Shard(sid, sid * self.shard_size, 0, items)

    def map_shards(self, method: str, structures: Iterable, model: Any, settings: Any, fix: Any, fail: Any,
                   per_shard: Any = None) -> Iterator[Any]:
        """Run ``_Worker.<method>`` over the shards of ``structures``; yield results in input order.

        ``fix(result, position)`` re-labels a shard-local result with its input position;
        ``fail(position, obj, message)`` makes the per-structure error result of an input that kills actors;
        ``per_shard(settings, start, n)`` adapts the settings to one shard.
        """
        import ray
        from ray.exceptions import RayActorError

        self.start(model)
        shards = self._shards(structures)
        retry: deque[_Shard] = deque()
        inflight: dict[Any, tuple[_Shard, Any]] = {}
        load: dict[int, int] = {id(a): 0 for a in self.actors}
        parts: dict[int, list] = {}  # sid -> per-position results of the shard (None until done)
        left: dict[int, int] = {}
        next_out = 0
        exhausted = False
        max_pending = len(self.actors) * (self.inflight_per_worker + 2)

        def submit(shard: _Shard, actor) -> None:
            kw = per_shard(settings, shard.start + shard.offset, len(shard.items)) if per_shard else settings
            ref = getattr(actor, method).remote(shard.items, kw)
            inflight[ref] = (shard, actor)
            load[id(actor)] += 1

        while True:
            for actor in list(self.actors):  # refill every actor up to inflight_per_worker shards
                while load.get(id(actor), 0) < self.inflight_per_worker:
                    if retry:
                        shard = retry.popleft()
                    elif not exhausted and len(parts) < max_pending:
                        shard = next(shards, None)
                        if shard is None:
                            exhausted = True
                            break
                        parts[shard.sid] = [None] * len(shard.items)
                        left[shard.sid] = len(shard.items)
                    else:
                        break
                    submit(shard, actor)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            shard, actor = inflight.pop(ready[0])
            load[id(actor)] = load.get(id(actor), 1) - 1
            try:
                out = ray.get(ready[0])
            except RayActorError as exc:
                self._replace(actor, load, exc)
                for piece in self._after_death(shard, exc, fail):
                    if isinstance(piece, _Shard):
                        retry.append(piece)
                    else:  # a structure that killed every actor it ran on
                        self._place(parts, left, shard.sid, piece[0] - shard.start, piece[1])
                continue
            for i, res in enumerate(out):
                pos = shard.start + shard.offset + i
                self._place(parts, left, shard.sid, shard.offset + i, fix(res, pos))
            while next_out in parts and left[next_out] == 0:
                results = parts.pop(next_out)
                left.pop(next_out)
                next_out += 1
                yield from results

    @staticmethod
    def _place(parts: dict, left: dict, sid: int, offset: int, result: Any) -> None:
        if parts[sid][offset] is None:
            parts[sid][offset] = result
            left[sid] -= 1

    def _replace(self, actor, load: dict, exc: BaseException) -> None:
        """Swap a dead actor for a new one (same model, same resources)."""
        if actor in self.actors:
            k = self.actors.index(actor)
            new = self._new_actor()
            self.actors[k] = new
            load.pop(id(actor), None)
            load[id(new)] = 0
            self.n_replaced += 1
            log.warning("ray: actor %d died (%s); replaced, its shards go back to the queue", k,
                        type(exc).__name__)

    def _after_death(self, shard: _Shard, exc: BaseException, fail: Any) -> list:
        shard.attempts += 1
        if shard.attempts <= self.max_shard_retries:
            return [shard]
        if len(shard.items) > 1:  # isolate the structure that kills the actor
            return [_Shard(shard.sid, shard.start, shard.offset + i, [obj], shard.attempts - 1)
                    for i, obj in enumerate(shard.items)]
        pos = shard.start + shard.offset
        msg = (f"worker process died {shard.attempts} times while running this structure "
               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return [(pos, fail(pos, shard.items[0], msg))]

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

            for index, obj in enumerate(_as_iterable(items)):
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
    try:
        for res in gen:
            for obs in observers:
                if hasattr(obs, "on_result"):
                    obs.on_result(res)
            yield res
    finally:
        for obs in observers:
            if hasattr(obs, "on_close"):
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


def _as_iterable(structures: Any) -> Iterable:
    from ase import Atoms

    if isinstance(structures, (Atoms, str, os.PathLike)) or type(structures).__module__.startswith("pymatgen"):
        return [structures]
    return structures


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
