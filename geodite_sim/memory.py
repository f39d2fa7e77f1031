"""Memory model of one model step (energy + forces + stress) and the batch capacity it implies.

Peak memory of a Geodite step is affine in the number of atoms and edges,
``peak ≈ fixed + bytes_per_atom · N + bytes_per_edge · E``: every [N, 8, C]
node tensor and every [E, C] / [E, 8, C] edge tensor saved for the backward
pass scales with one of the two. :func:`fit_memory_model` measures peaks on a
few probe batches and fits the three coefficients (non-negative, relative least
squares); :meth:`MemoryModel.max_atoms` / :func:`memory_capacity` turn a byte
budget into ``max_atoms`` for the scheduler. See ``docs/memory-model.md``.

Measurement (:func:`measure_step_peak`), in bytes, of "one step" = the inputs
(batch tensors + edge list) plus everything the model call allocates, at its
highest point:

- CUDA: the caching allocator's exact peak, ``torch.cuda.max_memory_allocated``
  above the level before the call.
- CPU (and any other device): :class:`AllocationProbe`, a ``TorchDispatchMode``
  that sees every aten op of the call, forward and backward (autograd runs CPU
  backward ops on the calling thread, and propagates the mode to its workers
  anyway), counts each new output storage once when it is created and
  uncounts it when it is freed (``weakref.finalize`` on the storage), and keeps
  the maximum. This is deterministic, unlike the process's resident set
  (allocator caching, page reuse, the high-water mark of earlier work).
  Not seen: scratch memory that kernels allocate and free inside one op
  (GEMM packing buffers and the like, small next to the [E, 8, C] tensors).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from geodite_sim.model.contract import unwrap

log = logging.getLogger(__name__)

#: Default safety margin: capacities use at most ``(1 - margin)`` of a budget.
DEFAULT_MARGIN = 0.2


@dataclass
class MemoryModel:
    """peak bytes ≈ fixed_bytes + bytes_per_atom · atoms + bytes_per_edge · edges (all in bytes)."""

    bytes_per_atom: float
    bytes_per_edge: float
    fixed_bytes: float = 0.0

    def predict(self, n_atoms: int, n_edges: int) -> float:
        """Predicted peak bytes of one step on ``n_atoms`` atoms and ``n_edges`` directed edges."""
        return self.fixed_bytes + self.bytes_per_atom * n_atoms + self.bytes_per_edge * n_edges

    def max_atoms(self, budget_bytes: float, edges_per_atom: float, margin: float = DEFAULT_MARGIN) -> int:
        """Largest atom count whose predicted peak stays within ``(1 - margin) · budget_bytes``.

        ``budget_bytes``: bytes; ``edges_per_atom``: directed edges per atom of the workload.
        """
        usable = (1.0 - margin) * budget_bytes - self.fixed_bytes
        per_atom = self.bytes_per_atom + self.bytes_per_edge * edges_per_atom
        if per_atom <= 0:
            raise ValueError("memory model has no per-atom or per-edge cost")
        return max(int(usable // per_atom), 0)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- measurement
def _storage_key(storage: torch.UntypedStorage) -> int:
    return storage._cdata  # the StorageImpl's address: one per allocation, shared by views


def _tensors_of(*objs) -> list[torch.Tensor]:
    """Tensors inside ``objs`` (tensors, tuples/lists/dicts/NamedTuples, dataclasses such as Batch)."""
    out = []
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif is_dataclass(obj) and not isinstance(obj, type):
            out.extend(_tensors_of(*(getattr(obj, f.name) for f in fields(obj))))
        elif isinstance(obj, dict):
            out.extend(_tensors_of(*obj.values()))
        elif isinstance(obj, (tuple, list)):
            out.extend(_tensors_of(*obj))
    return out


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct storages behind the tensors in ``objs`` (views counted once)."""
    seen = {}
    for t in _tensors_of(*objs):
        st = t.untyped_storage()
        seen[_storage_key(st)] = st.nbytes()
    return sum(seen.values())


class AllocationProbe(TorchDispatchMode):
    """Peak of live tensor bytes while active (exact at op granularity, any device).

    Every op's output storages that are not among its inputs' storages (views, in-place and
    ``out=`` ops allocate nothing) and not already tracked are added to :attr:`live_bytes`
    when the op returns; a ``weakref.finalize`` on the storage subtracts them when the last
    tensor using it dies. Storages created before the probe (parameters, inputs, caches) are
    not counted unless passed to :meth:`track`. Attributes (bytes): ``live_bytes``,
    ``peak_bytes``; ``allocations``: number of storages counted.
    """

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocations = 0
        self._tracked: dict[int, int] = {}
        self._lock = threading.RLock()  # frees may come from autograd worker threads

    def track(self, *objs) -> None:
        """Count the storages of the tensors in ``objs`` as live (e.g. the step's inputs)."""
        for t in _tensors_of(*objs):
            self._add(t.untyped_storage())

    def _add(self, st: torch.UntypedStorage) -> None:
        n = st.nbytes()
        if n == 0 or st.device.type == "meta":
            return
        key = _storage_key(st)
        with self._lock:
            if key in self._tracked:
                return
            self._tracked[key] = n
            self.live_bytes += n
            self.allocations += 1
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            self.live_bytes -= self._tracked.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t.untyped_storage())
                  for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if _storage_key(st) not in inputs:
                    self._add(st)
        return out


def _warm_caches(model, batch) -> None:
    """Fill lazily built model caches (Geodite's vacuum-feature table) outside the measurement."""
    from geodite_sim.model.geodite import Geodite

    inner = unwrap(model)
    if isinstance(inner, Geodite) and batch.n_atoms > 0:
        with torch.no_grad():
            inner.vacuum_features(batch.numbers[:1])


def measure_step_peak(model, batch, edges=None, compute_forces: bool = True, compute_stress: bool = True) -> int:
    """Peak bytes of one step: the inputs (``batch`` + ``edges``) plus all the model call allocates.

    The step is ``model(batch, edges=edges, compute_forces=..., compute_stress=...)``; ``edges``
    defaults to a neighbour list at the model's cutoff, built before the measurement. CUDA:
    ``torch.cuda.max_memory_allocated`` above the level before the call; other devices:
    :class:`AllocationProbe` (forward and backward ops).
    """
    from geodite_sim.neighbors import neighbor_list

    if edges is None:
        edges = neighbor_list(batch, model.cutoff)
    _warm_caches(model, batch)
    inputs = tensor_bytes(batch, tuple(edges))
    device = batch.positions.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = model(batch, edges=edges, compute_forces=compute_forces, compute_stress=compute_stress)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak + inputs)
    probe = AllocationProbe()
    with probe:
        out = model(batch, edges=edges, compute_forces=compute_forces, compute_stress=compute_stress)
    del out
    return int(probe.peak_bytes + inputs)


# ---------------------------------------------------------------------------- probes and fit
def si_diamond(repeat: tuple[int, int, int] = (1, 1, 1), vacuum: float = 0.0):
    """Diamond Si, conventional 8-atom cell repeated; ``vacuum`` Å along z makes a slab."""
    from ase.build import bulk

    atoms = bulk("Si", "diamond", 5.43, cubic=True) * repeat
    if vacuum:
        atoms.center(vacuum=vacuum / 2, axis=2)
    atoms.rattle(0.02, seed=1)
    return atoms


def mixed_oxide(repeat: tuple[int, int, int] = (2, 2, 2), seed: int = 0):
    """(Sr,Ba)(Ti,Zr)O3 perovskite supercell (5 atoms per cell), A and B sites randomly mixed, rattled."""
    atoms = _perovskite() * repeat
    rng = np.random.default_rng(seed)
    numbers = atoms.numbers.copy()
    numbers[(numbers == 38) & (rng.random(len(atoms)) < 0.5)] = 56  # Sr -> Ba
    numbers[(numbers == 22) & (rng.random(len(atoms)) < 0.3)] = 40  # Ti -> Zr
    atoms.numbers = numbers
    atoms.rattle(0.03, seed=seed + 1)
    return atoms


def _perovskite(a: float = 3.95):
    from ase import Atoms

    return Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=[a, a, a], pbc=True)


def default_probes() -> list[list]:
    """Probe batches for the fit (lists of ASE Atoms): dense and sparse bulk, a slab, two sizes each.

    Edges per atom span ~20 (slab) to ~80 (oxide) at a 6 Å cutoff, so atom and edge costs separate.
    """
    return [
        [si_diamond((1, 1, 1))],
        [si_diamond((2, 2, 1))],
        [si_diamond((2, 2, 1), vacuum=12.0)],
        [mixed_oxide((1, 1, 2))],
        [mixed_oxide((2, 2, 2)), si_diamond((1, 1, 1))],
    ]


@dataclass
class StepSample:
    """One measured step: atoms, directed edges, peak bytes."""

    atoms: int
    edges: int
    peak_bytes: int


def measure_samples(model, probes: Sequence, device=None) -> list[StepSample]:
    """Build each probe batch (a list of ASE Atoms, or one Atoms) and measure one step's peak on it."""
    from ase import Atoms

    from geodite_sim.batch import Batch
    from geodite_sim.neighbors import neighbor_list

    device = torch.device(device if device is not None else model.device)
    samples = []
    for probe in probes:
        structures = [probe] if isinstance(probe, Atoms) else list(probe)
        batch = Batch.from_atoms(structures, dtype=model.dtype, device=device)
        edges = neighbor_list(batch, model.cutoff)
        peak = measure_step_peak(model, batch, edges)
        samples.append(StepSample(batch.n_atoms, int(edges.sender.shape[0]), peak))
        del batch, edges
    return samples


def fit_samples(samples: Sequence) -> MemoryModel:
    """Non-negative fit of ``fixed + a·atoms + b·edges`` to samples ``(atoms, edges, peak_bytes)``.

    Minimises the sum of squared *relative* residuals (small and large probes weigh alike), under
    coefficients >= 0 (exact active-set search over the 7 non-empty supports of three coefficients).
    """
    rows = [(s.atoms, s.edges, s.peak_bytes) if isinstance(s, StepSample) else tuple(s) for s in samples]
    a = np.array([[1.0, n, e] for n, e, _ in rows], dtype=float)
    y = np.array([p for _, _, p in rows], dtype=float)
    if len(y) == 0 or (y <= 0).any():
        raise ValueError("need samples with positive peaks")
    aw, yw = a / y[:, None], np.ones_like(y)
    best, best_res = np.zeros(3), np.inf
    for k in (3, 2, 1):
        for support in itertools.combinations(range(3), k):
            cols = list(support)
            coef, *_ = np.linalg.lstsq(aw[:, cols], yw, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(3)
            full[cols] = coef
            res = float(np.sum((aw @ full - yw) ** 2))
            if res < best_res - 1e-12:
                best, best_res = full, res
    fixed, per_atom, per_edge = (float(c) for c in best)
    return MemoryModel(bytes_per_atom=per_atom, bytes_per_edge=per_edge, fixed_bytes=fixed)


_MODEL_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fit_memory_model(model, probes: Sequence | None = None, device=None, cache: bool = True) -> MemoryModel:
    """Measure one step on each probe batch (default :func:`default_probes`) and fit a :class:`MemoryModel`.

    With the default probes the result is cached per (model object, dtype, device).
    For backward compatibility, a list of ``(atoms, edges, peak_bytes)`` tuples as first argument is fitted
    directly (:func:`fit_samples`).
    """
    if isinstance(model, (list, tuple)):
        return fit_samples(model)
    device = torch.device(device if device is not None else model.device)
    key = (model.dtype, str(device))
    use_cache = cache and probes is None
    if use_cache:
        hit = _MODEL_CACHE.get(model, {}).get(key)
        if hit is not None:
            return hit
    samples = measure_samples(model, probes if probes is not None else default_probes(), device)
    fitted = fit_samples(samples)
    log.info("memory model (%s, %s): %.0f B fixed + %.0f B/atom + %.0f B/edge from %d probes", model.dtype,
             device, fitted.fixed_bytes, fitted.bytes_per_atom, fitted.bytes_per_edge, len(samples))
    if use_cache:
        _MODEL_CACHE.setdefault(model, {})[key] = fitted
    return fitted


# ---------------------------------------------------------------------------- capacity
def edges_per_atom(model, structures: Sequence, device=None) -> float:
    """Largest directed-edges-per-atom ratio among ``structures`` (ASE Atoms) at the model's cutoff."""
    from geodite_sim.batch import Batch
    from geodite_sim.neighbors import neighbor_list

    structures = list(structures)
    device = torch.device(device if device is not None else model.device)
    batch = Batch.from_atoms(structures, dtype=model.dtype, device=device)
    edges = neighbor_list(batch, model.cutoff)
    n = batch.n_atoms
    system = batch.system_index[:n]
    per_system = torch.bincount(system[edges.receiver], minlength=len(structures)).double()
    atoms = torch.bincount(system, minlength=len(structures)).double().clamp_min(1)
    return float((per_system / atoms).max())


def device_free_bytes(device) -> int:
    """Bytes a step may use on a CUDA ``device``: free device memory plus the allocator's unused cache."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(cached, 0))


def capacity_from_budget(model: MemoryModel, budget_bytes: float, edges_per_atom: float,
                         margin: float = DEFAULT_MARGIN) -> int:
    """``max_atoms`` for a scheduler so that one step fits in ``budget_bytes`` with a safety margin."""
    return model.max_atoms(budget_bytes, edges_per_atom, margin)


def memory_capacity(model, budget_bytes: float, structures: Sequence | None = None, margin: float = DEFAULT_MARGIN,
                    device=None) -> int:
    """Atoms per batch whose predicted step peak is at most ``(1 - margin) · budget_bytes`` (bytes).

    The memory model is fitted (and cached) for ``model`` on ``device``; edges per atom are the densest
    of ``structures`` (ASE Atoms representative of the workload; default :func:`default_probes`).
    At least 1 (the scheduler always admits one structure).
    """
    device = torch.device(device if device is not None else model.device)
    mm = fit_memory_model(model, device=device)
    if not structures:
        structures = [a for probe in default_probes() for a in probe]
    epa = edges_per_atom(model, structures, device)
    n = mm.max_atoms(budget_bytes, epa, margin)
    log.info("memory capacity: budget %.3g B, margin %.2f, %.1f edges/atom -> max_atoms=%d",
             budget_bytes, margin, epa, n)
    return max(n, 1)


__all__ = ["AllocationProbe", "MemoryModel", "StepSample", "capacity_from_budget", "default_probes",
           "device_free_bytes", "edges_per_atom", "fit_memory_model", "fit_samples", "measure_samples",
           "measure_step_peak", "memory_capacity", "mixed_oxide", "si_diamond", "tensor_bytes"]
