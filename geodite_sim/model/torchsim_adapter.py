"""Any torch-sim ``ModelInterface`` (SevenNet-0, MACE, Lennard-Jones, ...) behind the model contract.

:class:`TorchSimAdapter` converts a :class:`~geodite_sim.batch.Batch` (cell rows = lattice vectors,
per-system pbc [S, 3]) into a ``torch_sim.SimState`` (cell columns = lattice vectors, ONE pbc vector
for the whole state: a batch mixing pbc patterns is split into one state per pattern), calls the
model's ``forward`` and returns the contract's dict. torch-sim's stress already carries ASE's sign
(stress = (1/V) dE/dstrain; checked against finite strains in ``tests/model/test_contract.py``); it is zeroed
for systems that are not periodic along all three axes, as the contract says.

The wrapped model builds its own neighbour list: ``uses_edges = False``, so the runner passes the
real systems only and no ``edges``. torch-sim and the model's package are imported only here.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn

from geodite_sim.batch import Batch, atom_indices
from geodite_sim.model.contract import identity_config
from geodite_sim.neighbors import neighbor_list

#: Names accepted by :func:`load_sevennet` (and ``load_model``) for SevenNet-0 (11 July 2024).
SEVENNET_NAMES = {"sevennet-0": "7net-0", "7net-0": "7net-0", "sevennet-0_11jul2024": "7net-0"}


class TorchSimAdapter(nn.Module):
    """A torch-sim model as a geodite_sim model (``model(batch) -> energy, forces, stress``).

    Args:
        ts_model: a ``torch_sim.models.interface.ModelInterface``. Its force and stress outputs are
            switched on (``_compute_forces`` / ``_compute_stress``) where the model allows it.
        name: display name (default: the class name).
        supported_elements: atomic numbers the model knows; default: its ``type_map`` keys where it has
            one (SevenNet), else None (no restriction declared).
        cutoff: Å; default ``ts_model.cutoff`` (informational: the model builds its own neighbour list).
    """

    uses_edges = False

    def __init__(self, ts_model: Any, name: str | None = None, supported_elements=None, cutoff: float | None = None):
        super().__init__()
        self.model = ts_model
        for flag in ("_compute_forces", "_compute_stress"):
            if hasattr(ts_model, flag):
                setattr(ts_model, flag, True)
        self.name = name or type(ts_model).__name__
        #: Model card (teacher-style facts: energy convention, …) or None.
        self.card: dict | None = None
        if cutoff is None:
            cutoff = getattr(ts_model, "cutoff", None)
        if cutoff is None:
            raise ValueError(f"{type(ts_model).__name__} has no cutoff attribute: pass cutoff= (Å)")
        self._cutoff = float(cutoff)
        if supported_elements is None:
            type_map = getattr(ts_model, "type_map", None)
            if isinstance(type_map, dict) and type_map:
                supported_elements = type_map.keys()
        self.supported_elements = None if supported_elements is None else frozenset(int(z) for z in supported_elements)
        props = ["energy"]
        if bool(getattr(ts_model, "compute_forces", True)):
            props.append("forces")
        if bool(getattr(ts_model, "compute_stress", True)):
            props.append("stress")
        self.implemented_properties = tuple(props)
        #: torch-sim's interface does not say whether forces are gradients; the models shipped with torch-sim
        #: and SevenNet are conservative (autograd forces), so True unless the model says otherwise.
        self.conservative = bool(getattr(ts_model, "conservative", True))

    @property
    def cutoff(self) -> float:
        return self._cutoff

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def _state(self, batch: Batch, pbc: torch.Tensor):
        import torch_sim as ts

        n = batch.n_atoms
        return ts.SimState(
            positions=batch.positions[:n],
            masses=batch.masses[:n],
            cell=batch.cell.transpose(1, 2).contiguous(),  # torch-sim: lattice vectors as columns
            pbc=pbc,
            atomic_numbers=batch.numbers[:n],
            system_idx=batch.system_index[:n],
        )

    def _call(self, batch: Batch, pbc: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(self._state(batch, pbc))
        missing = [k for k in self.implemented_properties if k not in out]
        if missing:
            raise RuntimeError(f"{self.name} returned no {missing} (got {sorted(out)})")
        return out

    def forward(self, batch: Batch, edges=None, compute_forces: bool = True, compute_stress: bool = True,
                per_atom_energies: bool = False, check: bool = True) -> dict[str, torch.Tensor]:
        """``energy`` [S] eV, ``forces`` [N, 3] eV/Å, ``stress`` [S, 3, 3] eV/Å^3 (ASE sign) of ``batch``.

        ``edges`` is ignored (the model builds its own neighbour list). ``check`` validates finite
        positions and cells first. Reads pbc on the host to group systems (external models sync anyway).
        """
        if batch.dtype != self.dtype:
            raise TypeError(f"batch dtype {batch.dtype} differs from model dtype {self.dtype}")
        if compute_forces and "forces" not in self.implemented_properties:
            raise ValueError(f"{self.name} does not compute forces")
        if compute_stress and "stress" not in self.implemented_properties:
            raise ValueError(f"{self.name} does not compute stress")
        if check:
            from geodite_sim.model.geodite import check_batch

            check_batch(batch)
        n, s = batch.n_atoms, batch.n_systems
        codes = (batch.pbc.long() * torch.tensor([1, 2, 4], device=batch.device)).sum(1)
        patterns = torch.unique(codes).tolist()
        if len(patterns) == 1:
            pieces = [(None, self._call(batch, batch.pbc[0]))]
        else:
            pieces = []
            for code in patterns:
                systems = torch.nonzero(codes == code).squeeze(1)
                sub = batch.select(systems)
                pieces.append((systems, self._call(sub, sub.pbc[0])))
        ref = pieces[0][1]["energy"]
        energy = ref.new_zeros(s)
        forces = ref.new_zeros(n, 3)
        stress = ref.new_zeros(s, 3, 3)
        energies = ref.new_zeros(n) if per_atom_energies else None
        for systems, out in pieces:
            if systems is None:
                energy, forces = out["energy"].reshape(s), out.get("forces", forces)
                stress = out.get("stress", stress)
                if per_atom_energies:
                    energies = self._energies(out)
                continue
            atoms = atom_indices(batch.offsets, systems)
            energy = energy.index_copy(0, systems, out["energy"].reshape(-1))
            if "forces" in out:
                forces = forces.index_copy(0, atoms, out["forces"])
            if "stress" in out:
                stress = stress.index_copy(0, systems, out["stress"])
            if per_atom_energies:
                energies = energies.index_copy(0, atoms, self._energies(out))
        result = {"energy": energy.detach()}
        if compute_forces:
            result["forces"] = forces.detach()
        if compute_stress:
            full = batch.fully_periodic
            result["stress"] = torch.where(full[:, None, None], stress.detach(), 0.0)
        if per_atom_energies:
            result["energies"] = energies.detach()  # type: ignore[union-attr]
        return result

    def _energies(self, out: dict) -> torch.Tensor:
        if "energies" not in out:
            raise ValueError(f"{self.name} returns no per-atom energies")
        return out["energies"]

    def identity_config(self) -> dict:
        """Settings of the wrapped model that enter the fingerprint (its weights enter through state_dict)."""
        return {"wrapped": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "dtype": str(self.dtype), "config": identity_config(self.model)}


#: SevenNet-0's targets: MPtrj energies as computed (PBE/PBE+U), without the MP2020 corrections.
SEVENNET_CONVENTION = "MPtrj uncorrected (PBE/PBE+U as computed; apply MP2020 corrections once)"


def engine_neighbor_list_fn(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float,
                            system_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch-sim's neighbour-list signature on the engine's exact list (:func:`geodite_sim.neighbors.neighbor_list`).

    Returns ``mapping`` [2, E] (i = receiver, j = sender: ``r_j + shift @ cell - r_i``), ``system_mapping`` [E] and
    float ``shifts`` [E, 3], as torch-sim's ``torchsim_nl``; unlike nvalchemiops' estimated neighbour capacity it
    never overflows on small dense cells (the engine grows its buffers).
    """
    n_systems = cell.shape[0] if cell.dim() == 3 else 1
    cell = cell.reshape(-1, 3, 3).expand(n_systems, 3, 3)
    pbc = pbc.reshape(-1, 3).expand(n_systems, 3).to(torch.bool)
    sys_idx = system_idx.to(torch.long)
    counts = torch.bincount(sys_idx, minlength=n_systems)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    batch = Batch(positions=positions, numbers=torch.zeros_like(sys_idx), cell=cell, pbc=pbc, system_index=sys_idx,
                  offsets=offsets, masses=torch.ones_like(positions[:, 0]))
    edges = neighbor_list(batch, float(cutoff), backend="auto")
    mapping = torch.stack([edges.receiver, edges.sender])
    return mapping, sys_idx[edges.receiver], edges.shifts.to(cell.dtype)


def load_sevennet(name: str = "7net-0", device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> TorchSimAdapter:
    """SevenNet-0 (MIT, weights shipped inside the ``sevenn`` wheel; loaded offline) behind the contract.

    ``dtype=torch.float64`` runs the engine in float64 around the float32 network (sevenn's
    ``Float64Wrapper``); SevenNet itself computes in float32. Supported elements: its 89-element type map.
    """
    key = name.lower()
    if key not in SEVENNET_NAMES:
        raise KeyError(f"unknown SevenNet model {name!r}; known: {sorted(SEVENNET_NAMES)}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            from sevenn.torchsim import Float64Wrapper, SevenNetModel
    except ImportError as exc:
        raise ImportError("SevenNet needs the optional dependency sevenn: pip install 'geodite-sim[sevenn]'") from exc
    inner = SevenNetModel(SEVENNET_NAMES[key], device=device, dtype=torch.float32,
                          neighbor_list_fn=engine_neighbor_list_fn)
    type_map = dict(inner.type_map)
    cutoff = float(inner.cutoff)
    ts_model = inner
    if dtype == torch.float64:
        ts_model = Float64Wrapper(inner)
    elif dtype != torch.float32:
        raise ValueError(f"SevenNet runs in float32 (or float64 around it), not {dtype}")
    adapter = TorchSimAdapter(ts_model, name="sevennet-0", supported_elements=type_map.keys(), cutoff=cutoff)
    import sevenn

    adapter.card = {"name": "SevenNet-0 (7net-0)", "version": f"sevenn {sevenn.__version__}",
                    "energy_convention": SEVENNET_CONVENTION}
    return adapter


__all__ = ["SEVENNET_NAMES", "TorchSimAdapter", "as_engine_model", "is_torchsim_model", "load_sevennet"]


def is_torchsim_model(model: Any) -> bool:
    """Whether ``model`` is a torch-sim ``ModelInterface`` (SevenNet's ``SevenNetModel``, MACE's ``MaceModel``, ...)
    not yet behind the contract (checked on the class names, so torch-sim is not imported)."""
    if isinstance(model, TorchSimAdapter):
        return False
    return any(c.__name__ == "ModelInterface" and c.__module__.startswith("torch_sim") for c in type(model).__mro__)


_ADAPTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def as_engine_model(model: Any) -> Any:
    """``model`` as the engine takes it: a torch-sim ``ModelInterface`` is wrapped in :class:`TorchSimAdapter` (the
    same adapter for the same model object), anything else is returned unchanged. Every entry point calls this, so
    ``relax_many(structures, SevenNetModel(...))`` works as ``relax_many(structures, TorchSimAdapter(...))``."""
    if not is_torchsim_model(model):
        return model
    adapter = _ADAPTED.get(model)
    if adapter is None:
        adapter = TorchSimAdapter(model)
        _ADAPTED[model] = adapter
    return adapter
