"""Single-point evaluation of many structures, batched internally."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from geodite_sim.batch import Batch
from geodite_sim.io.structures import StructureError, to_atoms, validate_atoms
from geodite_sim.model import Geodite, load_model


def _chunks(atoms_list: list, max_atoms: int) -> Iterable[list[int]]:
    """Group structure indices so each group holds at most ``max_atoms`` atoms (one structure minimum)."""
    group, total = [], 0
    for i, a in enumerate(atoms_list):
        if group and total + len(a) > max_atoms:
            yield group
            group, total = [], 0
        group.append(i)
        total += len(a)
    if group:
        yield group


def evaluate(
    structures: Any,
    model: Geodite | None = None,
    max_atoms: int = 4096,
    compute_stress: bool = True,
    per_atom_energies: bool = False,
) -> list[dict[str, Any]]:
    """Energy, forces and stress of each structure (ASE units and sign conventions).

    Args:
        structures: ASE Atoms, pymatgen Structures/Molecules or file paths (or one of them).
        model: a loaded Geodite (default: ``load_model()``).
        max_atoms: atoms per internal batch.
    Returns:
        One dict per structure, in input order: ``energy`` (float, eV), ``forces``
        (N, 3) eV/Å, ``stress`` (3, 3) eV/Å^3 (zeros unless fully periodic),
        and ``energies`` (N,) per-atom eV when requested.
    Raises:
        StructureError naming the first invalid structure.
    """
    model = model if model is not None else load_model()
    if not isinstance(structures, (list, tuple)):
        from geodite_sim.io.structures import iter_inputs

        structures = [item.original for item in iter_inputs(structures)]
    atoms_list = []
    for i, s in enumerate(structures):
        atoms = to_atoms(s)
        try:
            validate_atoms(atoms)
        except StructureError as exc:
            raise StructureError(f"structure {i} ({atoms.get_chemical_formula()}): {exc}") from exc
        atoms_list.append(atoms)
    results: list[dict[str, Any]] = [None] * len(atoms_list)  # type: ignore[list-item]
    for group in _chunks(atoms_list, max_atoms):
        batch = Batch.from_atoms([atoms_list[i] for i in group], dtype=model.dtype, device=model.device)
        out = model(batch, compute_stress=compute_stress, per_atom_energies=per_atom_energies)
        offsets = batch.offsets.tolist()
        for k, i in enumerate(group):
            a, b = offsets[k], offsets[k + 1]
            r = {
                "energy": float(out["energy"][k]),
                "forces": out["forces"][a:b].cpu().double().numpy(),
            }
            if compute_stress:
                r["stress"] = out["stress"][k].cpu().double().numpy()
            if per_atom_energies:
                r["energies"] = out["energies"][a:b].cpu().double().numpy()
            results[i] = r
    return results


def stress_to_voigt(stress: np.ndarray) -> np.ndarray:
    """3x3 -> ASE Voigt order (xx, yy, zz, yz, xz, xy)."""
    s = np.asarray(stress)
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


__all__ = ["evaluate", "stress_to_voigt"]

