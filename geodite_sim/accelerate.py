"""Making the model step fast on a GPU: static shapes, ``torch.compile`` and CUDA-graph replay.

:class:`StaticStep` wraps a :class:`~geodite_sim.model.Geodite` and evaluates it on *padded*
tensors whose shapes come from a few capacity buckets (atoms, edges, systems), so that consecutive
MD steps, whose edge counts change a little every step and whose atom counts change when the
scheduler re-packs, keep the same shapes. Padding is exact:

* padding atoms have Z = 1, position 0 and belong to a padding system (index S, after the real
  systems) whose energy, forces and stress are dropped;
* padding edges all point from the first padding atom to its own image one padding-cell vector
  away (cell ``(cutoff + 1) I``, not periodic), so they have a finite, non-zero length and touch
  only padding atoms. Messages flow only along edges and every other operation is per atom or per
  edge, so real atoms see exactly the same arithmetic as in ``Geodite.forward`` (results agree to
  round-off: matrix products over more rows may use other kernel blockings).

The padded step has no host synchronisation: the real/padding split is a device-side comparison
with ``offsets[-1]``, the neighbour count of an atom is an ``index_add`` instead of ``bincount``
(whose CUDA kernel reads the maximum back), the isolated-atom features come from a table computed
once, and cell volumes are a cross product instead of ``torch.linalg.det``. Input checks
(``check_batch``, the atomic-number range) are done once per new ``numbers`` tensor, not per step.

Modes (:func:`choose_mode`):

* ``"off"``: no wrapper, the model is called as it is (the CPU default);
* ``"eager"``: padding only (useful on any device; the reference for the two below);
* ``"compile"``: the padded energy function under ``torch.compile(dynamic=False)``; the backward
  pass (forces, stress) is AOTAutograd's compiled backward. One compilation per bucket. CPU or CUDA;
* ``"cuda_graph"``: the whole padded forward + backward (``torch.autograd.grad``) is captured in a
  ``torch.cuda.CUDAGraph`` on static input buffers and replayed after ``copy_`` of the new inputs;
  re-captured when a bucket changes (the last ``max_cached`` captures are kept). CUDA only.

``"auto"`` is ``"cuda_graph"`` on CUDA (falling back to ``"eager"`` with a warning if capture
fails) and ``"off"`` elsewhere, so the CPU path is unchanged. See ``docs/gpu.md``.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from geodite_sim.batch import Batch
from geodite_sim.model.geodite import Edges, Geodite, check_batch

log = logging.getLogger(__name__)

MODES = ("off", "eager", "compile", "cuda_graph")
#: Atomic number given to padding atoms (any supported element works; their energy is dropped).
PAD_Z = 1
#: Smallest capacities (atoms, edges, systems); below them shapes would change too often to matter.
MIN_CAPACITY = {"atoms": 32, "edges": 256, "systems": 4}


# ---------------------------------------------------------------------------------------------- modes
def choose_mode(mode: str = "auto", device: torch.device | str = "cpu") -> str:
    """Resolve ``mode`` (``"auto"`` or one of :data:`MODES`) for ``device``.

    ``"auto"`` gives ``"cuda_graph"`` on a CUDA device and ``"off"`` elsewhere. ``"cuda_graph"``
    on a non-CUDA device raises ValueError.
    """
    device = torch.device(device)
    if mode == "auto":
        return "cuda_graph" if device.type == "cuda" else "off"
    if mode not in MODES:
        raise ValueError(f"unknown acceleration mode {mode!r}; choose from {('auto',) + MODES}")
    if mode == "cuda_graph" and device.type != "cuda":
        raise ValueError(
            f"mode 'cuda_graph' needs a CUDA device, but the model is on {device.type!r}; "
            "use 'eager' or 'compile' (or 'auto', which is 'off' on the CPU)"
        )
    return mode


def accelerated(model, mode: str = "auto", **kwargs):
    """``model`` wrapped for ``mode`` (a :class:`StaticStep`), or ``model`` itself when the mode is ``"off"``.

    With ``"auto"`` a model that is not a :class:`Geodite` (e.g. ``MorsePotential``) is returned
    unchanged; an explicit mode on such a model raises TypeError. ``kwargs`` go to :class:`StaticStep`.
    """
    device = getattr(model, "device", torch.device("cpu"))
    resolved = choose_mode(mode, device)
    if resolved == "off":
        return model
    if not isinstance(model, Geodite):
        if mode == "auto":
            return model
        raise TypeError(f"acceleration mode {mode!r} needs a Geodite model, got {type(model).__name__}")
    return StaticStep(model, resolved, fallback=(mode == "auto"), **kwargs)


# ---------------------------------------------------------------------------------------------- buckets
def bucket(n: int, minimum: int = 1) -> int:
    """The smallest capacity >= max(n, minimum) of the form m * 2^k with 8 <= m < 16 (<= 12.5% waste)."""
    n = max(int(n), int(minimum), 1)
    if n <= 16:
        return n
    k = max(n.bit_length() - 4, 0)  # 2^k is the grid step: n / 2^k lies in [8, 16)
    return -(-n // (1 << k)) << k


def next_capacity(needed: int, current: int | None, minimum: int, headroom: float, shrink: float) -> int:
    """Keep ``current`` while ``needed`` fits and uses more than ``shrink`` of it; else re-bucket with headroom."""
    if current is not None and shrink * current <= needed <= current:
        return current
    return bucket(math.ceil(needed * (1.0 + headroom)), minimum)


# ---------------------------------------------------------------------------------------------- padded step
def cell_volumes(cell: torch.Tensor) -> torch.Tensor:
    """|det(cell)| [S] as (a x b) . c: no solver call, safe inside a CUDA graph."""
    return (torch.linalg.cross(cell[:, 0], cell[:, 1], dim=-1) * cell[:, 2]).sum(-1).abs()


def padded_atomic_energies(model: Geodite, vacuum: torch.Tensor, z: torch.Tensor, vec: torch.Tensor,
                           src: torch.Tensor, dst: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """``Geodite.atomic_energies`` with a fixed isolated-atom table ``vacuum`` [max_z, L, C]: per-atom
    energies [N], no host synchronisation. ``fused``: the encoder's CPU edge kernels (eager mode on the
    CPU only: ``torch.compile`` cannot trace them)."""
    return model.atomic_energies(z, vec, Edges(src, dst, None), fused=fused, vacuum=vacuum)


def padded_energy(model: Geodite, positions: torch.Tensor, strain: torch.Tensor, numbers: torch.Tensor,
                  system_index: torch.Tensor, cell: torch.Tensor, sender: torch.Tensor, receiver: torch.Tensor,
                  shifts: torch.Tensor, vacuum: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """System energies [S_cap] and per-atom energies [N_cap] of padded tensors (strain method, as
    :func:`geodite_sim.model.strain.energy_and_derivatives`). Static shapes, no host synchronisation."""
    sym = 0.5 * (strain + strain.transpose(1, 2))
    pos = positions + torch.einsum("ni,nij->nj", positions, sym[system_index])
    strained = cell + torch.bmm(cell, sym)
    shift_vec = torch.einsum("ei,eij->ej", shifts, strained[system_index[receiver]])
    vec = pos[sender] + shift_vec - pos[receiver]
    e_atom = padded_atomic_energies(model, vacuum, numbers, vec, sender, receiver, fused)
    energy = e_atom.new_zeros(cell.shape[0]).index_add_(0, system_index, e_atom)
    return energy, e_atom


class CapturedStep:
    """A function of static buffers captured in a ``torch.cuda.CUDAGraph``; ``replay()`` refreshes ``outputs``.

    The function runs twice on a side stream first (lazy initialisation of cuBLAS handles, autograd
    and the caching allocator must not happen during capture), then once under capture. The cached
    blocks of the warm-up (and of evicted graphs) are released before the capture, whose private
    memory pool holds one step's activations for as long as the graph lives.
    """

    def __init__(self, fn, device: torch.device):
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn()

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class _Slot:
    """Static buffers (and, for CUDA graphs, the capture) of one bucket."""

    key: tuple
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    graph: object = None
    n_calls: int = 0


class StaticStep:
    """A Geodite model evaluated on padded, bucketed tensors: same call signature as ``Geodite.forward``.

    ``step(batch, edges=None, compute_forces=True, compute_stress=True, per_atom_energies=False)``
    returns ``energy`` [S], ``forces`` [rows, 3] (one row per row of ``batch.positions``; rows after
    ``batch.n_atoms`` are zero), ``stress`` [S, 3, 3] and ``energies`` [rows] as requested, equal to
    the model's to round-off. Outputs are fresh tensors (never the CUDA graph's static buffers).

    Args:
        model: a Geodite (inference: frozen parameters).
        mode: ``"eager"``, ``"compile"`` or ``"cuda_graph"`` (see the module docstring).
        atom_capacity, edge_capacity, system_capacity: minimum capacities (padding included);
            set them to the largest expected sizes to get one shape for a whole run.
        headroom: fraction added to a count before re-bucketing, so small growth does not re-bucket.
        shrink: a bucket is kept while the count stays above this fraction of it.
        max_cached: buckets whose buffers (and captures) are kept, least recently used dropped first;
            default 1 in ``"cuda_graph"`` mode (each capture holds one step's activation memory) and 3
            otherwise.
        fallback: on a failure to compile or capture, warn and continue in ``"eager"`` mode
            instead of raising (used by ``"auto"``).
        compile_options: extra keyword arguments of ``torch.compile`` in ``"compile"`` mode
            (e.g. ``{"backend": "aot_eager"}``, ``{"mode": "max-autotune-no-cudagraphs"}``).

    Attributes:
        n_builds: buckets set up (buffers allocated, and compiled or captured for those modes).
        shapes: the current bucket (atoms, edges, systems) or None.
        graph_factory: what captures a step in ``"cuda_graph"`` mode (:class:`CapturedStep`;
            tests replace it by a CPU emulation).
    """

    graph_factory = CapturedStep

    def __init__(self, model: Geodite, mode: str = "eager", *, atom_capacity: int = 0, edge_capacity: int = 0,
                 system_capacity: int = 0, headroom: float = 1.0 / 16.0, shrink: float = 0.5,
                 max_cached: int | None = None, fallback: bool = False, compile_options: dict | None = None):
        if not isinstance(model, Geodite):
            raise TypeError(f"StaticStep needs a Geodite model, got {type(model).__name__}")
        self.mode = choose_mode(mode, model.device)
        if self.mode == "off":
            raise ValueError("StaticStep needs mode 'eager', 'compile' or 'cuda_graph' (use accelerated() for 'off')")
        if self.mode == "cuda_graph" and not torch.cuda.is_available():
            raise RuntimeError("mode 'cuda_graph' needs CUDA, which is not available")
        if any(p.requires_grad for p in model.parameters()):
            log.warning("StaticStep: the model has trainable parameters; their gradients are not computed")
        self.model = model
        self.minimum = {
            "atoms": max(int(atom_capacity), MIN_CAPACITY["atoms"]),
            "edges": max(int(edge_capacity), MIN_CAPACITY["edges"]),
            "systems": max(int(system_capacity), MIN_CAPACITY["systems"]),
        }
        self.headroom = float(headroom)
        self.shrink = float(shrink)
        if max_cached is None:
            max_cached = 1 if self.mode == "cuda_graph" else 3
        self.max_cached = max(1, int(max_cached))
        self.fallback = bool(fallback)
        self.compile_options = dict(compile_options or {})
        self.shapes: tuple[int, int, int] | None = None
        self.n_builds = 0
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()
        self._vacuum: torch.Tensor | None = None
        self._weights_key: tuple | None = None
        self._checked: tuple | None = None
        self._energy_fn = self._make_energy_fn()

    # ------------------------------------------------------------------ set-up
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cutoff(self) -> float:
        return self.model.cutoff

    @property
    def neighbor_backend(self) -> str:
        return self.model.neighbor_backend

    def _make_energy_fn(self):
        model = self.model
        # The fused CPU edge kernels (when the model would use them) in eager mode only.
        use_fused = getattr(model, "use_fused", None)
        fused = self.mode == "eager" and use_fused is not None and use_fused()

        def energy_fn(positions, strain, numbers, system_index, cell, sender, receiver, shifts, vacuum):
            return padded_energy(model, positions, strain, numbers, system_index, cell, sender, receiver, shifts,
                                 vacuum, fused)

        if self.mode == "compile":
            return torch.compile(energy_fn, **{"dynamic": False, **self.compile_options})
        return energy_fn

    def _refresh_vacuum(self) -> None:
        """(Re)compute the isolated-atom table in a persistent buffer when the weights changed."""
        m = self.model
        tensors = list(m.parameters()) + list(m.buffers())
        key = (m.device, m.dtype, tuple(t._version for t in tensors), tuple(t.data_ptr() for t in tensors))
        if key == self._weights_key:
            return
        with torch.no_grad():
            table = m.vacuum_features(torch.arange(m.config.max_z, device=m.device))
        self._vacuum = table.clone()
        self._slots.clear()  # buffers and captured graphs refer to the old weights and table
        self._weights_key = key

    def _check(self, batch: Batch) -> None:
        """Input checks, once per new ``numbers`` tensor (they read values back to the host)."""
        if batch.dtype != self.dtype:
            raise TypeError(f"batch dtype {batch.dtype} differs from model dtype {self.dtype}")
        if batch.device != self.device:
            raise ValueError(f"batch is on {batch.device}, the model on {self.device}")
        checked = self._checked
        if checked is not None and checked[0] is batch.numbers and checked[1] == batch.numbers._version:
            return
        check_batch(batch)
        n = batch.n_atoms
        if n > 0:
            z = batch.numbers[:n]
            zmax, zmin = int(z.max()), int(z.min())
            if zmax >= self.model.config.max_z or zmin < 1:
                raise ValueError(f"atomic numbers {zmin}..{zmax} are outside the model's range "
                                 f"1..{self.model.config.max_z - 1}")
        self._checked = (batch.numbers, batch.numbers._version)  # a reference: its id cannot be reused

    def _slot(self, rows: int, n_edges: int, n_systems: int, flags: tuple) -> _Slot:
        cur = self.shapes
        atoms = next_capacity(rows + 1, cur and cur[0], self.minimum["atoms"], self.headroom, self.shrink)
        edges = next_capacity(n_edges, cur and cur[1], self.minimum["edges"], self.headroom, self.shrink)
        systems = next_capacity(n_systems + 1, cur and cur[2], self.minimum["systems"], self.headroom, self.shrink)
        self.shapes = (atoms, edges, systems)
        key = self.shapes + flags
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        dev, dt = self.device, self.dtype
        inputs = {
            "positions": torch.zeros(atoms, 3, dtype=dt, device=dev),
            "numbers": torch.full((atoms,), PAD_Z, dtype=torch.long, device=dev),
            "system_index": torch.zeros(atoms, dtype=torch.long, device=dev),
            "cell": torch.zeros(systems, 3, 3, dtype=dt, device=dev),
            "pbc": torch.zeros(systems, 3, dtype=torch.bool, device=dev),
            "sender": torch.zeros(edges, dtype=torch.long, device=dev),
            "receiver": torch.zeros(edges, dtype=torch.long, device=dev),
            "shifts": torch.zeros(edges, 3, dtype=dt, device=dev),
        }
        slot = _Slot(key, inputs)
        self._slots[key] = slot
        while len(self._slots) > self.max_cached:
            self._slots.popitem(last=False)
        self.n_builds += 1
        log.debug("StaticStep(%s): new bucket atoms=%d edges=%d systems=%d", self.mode, atoms, edges, systems)
        return slot

    # ------------------------------------------------------------------ filling and running
    def _fill(self, slot: _Slot, batch: Batch, edges: Edges, rows: int, n_edges: int, n_systems: int) -> None:
        """Copy the batch into the slot's static buffers, padding after it. No host synchronisation."""
        b = slot.inputs
        dev = self.device
        real = torch.arange(rows, device=dev) < batch.offsets[-1]
        pad_system = n_systems  # the first padding system
        b["positions"][:rows].copy_(torch.where(real[:, None], batch.positions.detach(), 0.0))
        b["positions"][rows:].zero_()
        b["numbers"][:rows].copy_(torch.where(real, batch.numbers, PAD_Z))
        b["numbers"][rows:].fill_(PAD_Z)
        b["system_index"][:rows].copy_(torch.where(real, batch.system_index, pad_system))
        b["system_index"][rows:].fill_(pad_system)
        b["cell"][:n_systems].copy_(batch.cell.detach())
        b["cell"][n_systems:].copy_(torch.eye(3, dtype=self.dtype, device=dev) * (self.cutoff + 1.0))
        b["pbc"][:n_systems].copy_(batch.pbc)
        b["pbc"][n_systems:].fill_(False)
        # Padding edges: the first padding atom (row ``rows``) to its own image one padding-cell vector away.
        b["sender"][:n_edges].copy_(edges.sender)
        b["sender"][n_edges:].fill_(rows)
        b["receiver"][:n_edges].copy_(edges.receiver)
        b["receiver"][n_edges:].fill_(rows)
        b["shifts"][:n_edges].copy_(edges.shifts)
        b["shifts"][n_edges:].zero_()
        b["shifts"][n_edges:, 0] = 1.0

    def _compute(self, slot: _Slot, compute_forces: bool, compute_stress: bool) -> dict[str, torch.Tensor]:
        """The padded step on the slot's buffers: energy [S_cap], forces [N_cap, 3], stress, energies."""
        b = slot.inputs
        need_grad = compute_forces or compute_stress
        with torch.enable_grad() if need_grad else torch.no_grad():
            positions = b["positions"].detach().requires_grad_(compute_forces)
            strain = torch.zeros_like(b["cell"], requires_grad=compute_stress)
            energy, e_atom = self._energy_fn(positions, strain, b["numbers"], b["system_index"], b["cell"],
                                             b["sender"], b["receiver"], b["shifts"], self._vacuum)
            out = {"energy": energy, "energies": e_atom}
            if need_grad:
                inputs = ([positions] if compute_forces else []) + ([strain] if compute_stress else [])
                grads = torch.autograd.grad(energy.sum(), inputs, allow_unused=True)
                grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
                if compute_forces:
                    out["forces"] = -grads[0]
                if compute_stress:
                    volume = cell_volumes(b["cell"])
                    periodic = b["pbc"].all(dim=1) & (volume > 0)
                    safe_v = torch.where(periodic, volume, torch.ones_like(volume))
                    out["stress"] = torch.where(periodic[:, None, None], grads[-1] / safe_v[:, None, None], 0.0)
        return {k: v.detach() for k, v in out.items()}

    def _run(self, slot: _Slot, compute_forces: bool, compute_stress: bool) -> tuple[dict[str, torch.Tensor], bool]:
        """Outputs of the padded step and whether they are static (graph) buffers."""
        if self.mode != "cuda_graph":
            return self._compute(slot, compute_forces, compute_stress), False
        if slot.graph is None:
            slot.graph = self.graph_factory(lambda: self._compute(slot, compute_forces, compute_stress), self.device)
        slot.graph.replay()
        return slot.graph.outputs, True

    def _fall_back(self, exc: Exception) -> None:
        log.warning("StaticStep: mode %r failed (%s: %s); continuing in 'eager' mode", self.mode,
                    type(exc).__name__, exc)
        self.mode = "eager"
        self._energy_fn = self._make_energy_fn()
        self._slots.clear()

    # ------------------------------------------------------------------ call
    def __call__(self, batch: Batch, edges: Edges | tuple | None = None, compute_forces: bool = True,
                 compute_stress: bool = True, per_atom_energies: bool = False,
                 create_graph: bool = False) -> dict[str, torch.Tensor]:
        if create_graph:
            raise ValueError("StaticStep does not support create_graph (training); call the model itself")
        self._check(batch)
        if edges is None:
            from geodite_sim.neighbors import neighbor_list

            edges = neighbor_list(batch, self.cutoff, backend=self.model.neighbor_backend)
        edges = Edges(*edges)
        self._refresh_vacuum()
        rows = batch.positions.shape[0]
        n_systems = batch.cell.shape[0]
        n_edges = edges.sender.shape[0]
        flags = (bool(compute_forces), bool(compute_stress))
        slot = self._slot(rows, n_edges, n_systems, flags)
        self._fill(slot, batch, edges, rows, n_edges, n_systems)
        try:
            out, static = self._run(slot, *flags)
        except Exception as exc:  # compile / capture failure
            if not self.fallback or self.mode == "eager":
                raise
            self._fall_back(exc)
            return self(batch, edges, compute_forces, compute_stress, per_atom_energies)
        slot.n_calls += 1
        real = torch.arange(rows, device=self.device) < batch.offsets[-1]
        result = {"energy": out["energy"][:n_systems]}
        if compute_forces:
            result["forces"] = torch.where(real[:, None], out["forces"][:rows], 0.0)
        if compute_stress:
            result["stress"] = out["stress"][:n_systems]
        if per_atom_energies:
            result["energies"] = torch.where(real, out["energies"][:rows], 0.0)
        if static:
            result = {k: v.clone() if k in ("energy", "stress") else v for k, v in result.items()}
        return result

    def __repr__(self) -> str:
        return f"StaticStep(mode={self.mode!r}, shapes={self.shapes}, builds={self.n_builds})"
