"""Adapters exposing a geodite_sim model (Geodite or any model of the contract) to ASE and torch-sim."""

from __future__ import annotations

import torch
from ase.calculators.calculator import Calculator, all_changes
from torch_sim.models.interface import ModelInterface

from geodite_sim.batch import Batch
from geodite_sim.evaluate import stress_to_voigt
from geodite_sim.io.structures import validate_atoms
from geodite_sim.model import load_model


class GeoditeCalculator(Calculator):
    """ASE calculator: energy (eV), forces (eV/Å), stress (eV/Å^3, Voigt, ASE sign), per-atom energies.

    ``model``: a Geodite (default: ``load_model()``) or any model of the contract
    (``geodite_sim.model.contract``, e.g. ``load_model("sevennet-0")``); per-atom energies only from
    models that return them (``per_atom_energies=True``), and only when asked for.
    pbc is honoured per axis; stress is returned for fully periodic cells only (zeros otherwise).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model=None, **kwargs):
        super().__init__(**kwargs)
        self.model = model if model is not None else load_model()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        validate_atoms(self.atoms)
        batch = Batch.from_atoms([self.atoms], dtype=self.model.dtype, device=self.model.device)
        n = len(self.atoms)
        if "energies" in properties:
            out = self.model(batch, compute_stress=True, per_atom_energies=True)
        else:
            out = self.model(batch, compute_stress=True)
        energy = float(out["energy"][0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"][:n].detach().cpu().double().numpy(),
            "stress": stress_to_voigt(out["stress"][0].detach().cpu().double().numpy()),
        }
        if "energies" in out:
            self.results["energies"] = out["energies"][:n].detach().cpu().double().numpy()


class TorchSimModel(ModelInterface):
    """torch-sim ``ModelInterface`` wrapper of a geodite_sim model: column-vector cells in, ASE-sign stress out.

    Wraps a Geodite (default ``load_model()``) or any model of the contract that uses this package's
    :class:`~geodite_sim.batch.Batch` (MorsePotential, the padded ``StaticStep``).

    torch-sim stores cells with lattice vectors as columns (``state.row_vector_cell``
    is ASE's) and one pbc vector for the whole batch.
    """

    def __init__(self, model=None, compute_stress: bool = True, compute_forces: bool = True):
        super().__init__()
        self.model = model if model is not None else load_model()
        self._device = self.model.device
        self._dtype = self.model.dtype
        self._compute_stress = compute_stress
        self._compute_forces = compute_forces
        self._memory_scales_with = "n_atoms_x_density"

    def forward(self, state, **kwargs) -> dict[str, torch.Tensor]:
        n_sys = state.n_systems
        counts = torch.bincount(state.system_idx, minlength=n_sys)
        offsets = torch.zeros(n_sys + 1, dtype=torch.long, device=counts.device)
        offsets[1:] = torch.cumsum(counts, 0)
        pbc = state.pbc
        if pbc.dim() == 0:
            pbc = pbc.expand(3)
        batch = Batch(
            positions=state.positions,
            numbers=state.atomic_numbers.long(),
            cell=state.row_vector_cell,
            pbc=pbc.reshape(1, 3).expand(n_sys, 3),
            system_index=state.system_idx.long(),
            offsets=offsets,
            masses=state.masses,
        )
        out = self.model(batch, compute_forces=self._compute_forces, compute_stress=self._compute_stress)
        return {k: v[: state.n_atoms] if k == "forces" else v for k, v in out.items()}


__all__ = ["GeoditeCalculator", "TorchSimModel"]

