"""Ray shards: a pool of long-lived actors (one per device) holding the model, and the shard loop that keeps them
busy, re-runs shards lost with their actor and isolates structures that kill actors (:class:`ShardCluster`,
the machinery of :class:`geodite_sim.executors.RayExecutor`).

``ray`` is imported only when a cluster is used (``pip install geodite-sim[ray]``).
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
from typing import Any

log = logging.getLogger(__name__)


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


class ShardCluster:
    """Actors on a Ray cluster and the shard loop (:meth:`map_shards`); see :class:`~geodite_sim.executors.RayExecutor`
    for the arguments."""

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
        it = iter(as_iterable(structures))
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
                        fresh = next(shards, None)
                        if fresh is None:
                            exhausted = True
                            break
                        shard = fresh
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


def as_iterable(structures: Any) -> Iterable:
    from ase import Atoms

    if isinstance(structures, (Atoms, str, os.PathLike)) or type(structures).__module__.startswith("pymatgen"):
        return [structures]
    return structures


__all__ = ["ShardCluster", "as_iterable"]
