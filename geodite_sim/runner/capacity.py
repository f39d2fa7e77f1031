"""The one batch-capacity policy of every front-end (``relax_many``, ``run_md``): how many atoms (and systems)
one packed batch holds, per device.

- An explicit ``max_atoms`` wins (capped by a memory budget when one is given).
- A workload known to hold at most :data:`SMALL_WORKLOAD_ATOMS` atoms runs as one batch.
- CPU: throughput, not memory, is the limit: a rule on the model's width (:func:`_cpu_heuristic`), or a timed
  probe (``tune=True``).
- CUDA: the memory model of :mod:`geodite_sim.memory` at 80 % of the free device memory.
- ``memory_budget_bytes`` caps any of these so that one step's predicted peak stays within it.

:func:`estimate_capacity` is the policy; ``relax_many`` probes it with the first structures of its input stream,
``run_md`` with the first structures of its input list.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from ase import Atoms

from geodite_sim.batch import Batch
from geodite_sim.model.contract import identity_config
from geodite_sim.neighbors import neighbor_list
from geodite_sim.runner.config import Capacity

log = logging.getLogger(__name__)

#: Structures read ahead from the input stream to probe the batch capacity.
PROBE_STRUCTURES = 8
#: Batch sizes (atoms) tried by the CPU probe of :func:`estimate_capacity`.
CPU_PROBE_SIZES = (32, 64, 128, 256, 512)
#: Inputs known to hold at most this many atoms in all run as one batch (no probe).
SMALL_WORKLOAD_ATOMS = 64
_CPU_CAPACITY_CACHE: dict = {}


def _probe_batch(structures: Sequence[Atoms], n_atoms: int, dtype, device) -> Batch:
    """Whole structures cycled from ``structures`` until the batch holds at least ``n_atoms`` atoms."""
    chosen, total, k = [], 0, 0
    while total < n_atoms:
        a = structures[k % len(structures)]
        chosen.append(a)
        total += len(a)
        k += 1
    return Batch.from_atoms(chosen, dtype=dtype, device=device)


def _time_step(model, batch: Batch, repeats: int = 1) -> float:
    """Best-of-``repeats`` seconds of one relaxation step's model work (neighbour list + energy/forces/stress)."""
    import time

    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        edges = neighbor_list(batch, model.cutoff, "auto")
        model(batch, edges=edges, compute_forces=True, compute_stress=True)
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_heuristic(model) -> int:
    """Atoms per CPU batch from the model's width: as large as the per-layer edge activations stay cache-sized.

    A model call has a fixed cost (~12 ms of operator dispatch for the default model on one thread) that only
    a large batch amortises, until its edge activations outgrow the caches. Measured on this project's 2-core
    CPU (float32, 1 thread, energy + forces + stress, cells of 2-8 atoms, ~45 edges per atom): the 64-channel
    geodite-mini costs 715 / 547 / 465 / 414 / 391 µs per atom at 34 / 65 / 135 / 259 / 518 atoms a batch
    (no cliff up to 512); the 192-channel Geodite-MP architecture (6 Å, ~70 edges per atom) 6.1 / 5.7 / 5.4 /
    7.4 ms per atom at 34 / 65 / 135 / 259 atoms (a cliff past ~130). Hence 24576 / channels atoms (384 and
    128), within [32, 512]; pair potentials have no such cliff.
    """
    channels = identity_config(model).get("config", {}).get("hidden_channels")
    if not channels:
        return 256
    return int(min(512, max(32, 24576 // channels)))


def _tune_cpu(model, probe: Sequence[Atoms], device, budget_s: float) -> int:
    """Time the model on probe batches of :data:`CPU_PROBE_SIZES` atoms; the largest size within 5 % of
    the best time per atom wins (stops past the cache cliff or when ``budget_s`` is spent)."""
    import time

    t_start = time.perf_counter()
    per_atom: dict[int, float] = {}
    _time_step(model, _probe_batch(probe, CPU_PROBE_SIZES[0], model.dtype, device))  # warm-up
    for n in CPU_PROBE_SIZES:
        batch = _probe_batch(probe, n, model.dtype, device)
        per_atom[n] = _time_step(model, batch, repeats=2 if n <= 128 else 1) / batch.n_atoms
        if per_atom[n] > 1.5 * min(per_atom.values()) or time.perf_counter() - t_start > budget_s:
            break
    best = min(per_atom.values())
    n = max(k for k, v in per_atom.items() if v <= 1.05 * best)
    log.info("estimate_capacity (cpu probe): %s ms/atom -> max_atoms=%d",
             {k: round(v * 1e3, 3) for k, v in per_atom.items()}, n)
    return n


def estimate_capacity(
    model,
    device: torch.device | str | None = None,
    max_atoms: int | None = None,
    max_systems: int | None = None,
    probe: Atoms | Sequence[Atoms] | None = None,
    memory_fraction: float = 0.8,
    total_atoms: int | None = None,
    tune: bool = False,
    tune_budget_s: float = 10.0,
    memory_budget_bytes: float | None = None,
) -> Capacity:
    """Batch capacity (``max_atoms``, atoms per batch) for ``model`` on ``device``.

    An explicit ``max_atoms`` wins (capped by ``memory_budget_bytes`` when given). ``total_atoms``
    (atoms of the whole input, when known): a workload of at most :data:`SMALL_WORKLOAD_ATOMS` atoms
    runs as one batch. ``probe``: structures representative of the workload (relax_many passes the
    first ones of its input stream); default a 256-atom fcc Cu cell (dense, so estimates err on the
    safe side).

    - CPU: throughput, not memory, is the limit: a batch too large for the caches costs more per atom,
      one too small pays the fixed cost of a model call for few atoms (:func:`_cpu_heuristic`). Default: a rule on the
      model's width (:func:`_cpu_heuristic`, deterministic and free); ``tune=True`` times the model on
      probe batches instead (cached per model, dtype and device; at most ``tune_budget_s``).
    - CUDA: the memory model of :mod:`geodite_sim.memory` (peak bytes of one energy+forces+stress
      step, fixed + per atom + per edge, fitted on probe batches and cached per model, dtype and
      device) sized to ``memory_fraction`` of the free device memory (bytes, ``torch.cuda.mem_get_info``
      plus the allocator's unused cache), at the densest probe structure's edges per atom.
    - ``memory_budget_bytes`` (bytes, any device): additionally caps the capacity so that one step's
      predicted peak is at most ``memory_fraction · memory_budget_bytes`` (on CUDA the smaller of this
      budget and the free memory applies).

    ``memory_fraction`` is the share of a memory budget a step may use (1 - safety margin).
    """
    dev: torch.device = torch.device(device if device is not None else model.device)
    from ase.build import bulk

    if probe is None:
        probe = [bulk("Cu", "fcc", 3.61, cubic=True) * (4, 4, 4)]
    elif isinstance(probe, Atoms):
        probe = [probe]
    probe = list(probe)
    margin = 1.0 - memory_fraction

    def capped(n: int) -> Capacity:
        if memory_budget_bytes is not None:
            from geodite_sim.memory import memory_capacity

            cap = memory_capacity(model, memory_budget_bytes, probe, margin=margin, device=dev)
            if cap < n:
                log.info("estimate_capacity: memory budget %.3g B caps max_atoms %d -> %d",
                         memory_budget_bytes, n, cap)
                n = cap
        return Capacity(max_atoms=int(n), max_systems=max_systems)

    if max_atoms is not None:
        return capped(int(max_atoms))
    if total_atoms is not None and total_atoms <= SMALL_WORKLOAD_ATOMS:
        return capped(SMALL_WORKLOAD_ATOMS)
    if dev.type != "cuda":
        if not tune:
            return capped(_cpu_heuristic(model))
        key = (id(model), model.dtype, str(dev))
        if key not in _CPU_CAPACITY_CACHE:
            _CPU_CAPACITY_CACHE[key] = _tune_cpu(model, probe, dev, tune_budget_s)
        return capped(_CPU_CAPACITY_CACHE[key])
    from geodite_sim.memory import device_free_bytes, memory_capacity

    torch.cuda.empty_cache()
    n = memory_capacity(model, device_free_bytes(dev), probe, margin=margin, device=dev)
    log.info("estimate_capacity (cuda): max_atoms=%d from the memory model", n)
    return capped(n)


def probe_structures(structures, n: int = 8) -> list[Atoms] | None:
    """The first ``n`` ASE Atoms of ``structures`` when it is an Atoms or a list/tuple (else None: a stream is
    not consumed to probe it)."""
    if isinstance(structures, Atoms):
        return [structures]
    if isinstance(structures, (list, tuple)):
        return [a for a in structures[:n] if isinstance(a, Atoms)] or None
    return None


__all__ = ["CPU_PROBE_SIZES", "PROBE_STRUCTURES", "SMALL_WORKLOAD_ATOMS", "estimate_capacity", "probe_structures"]
