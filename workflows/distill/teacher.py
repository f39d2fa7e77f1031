"""The teacher: load any model the engine runs, describe it, and compute its isolated-atom energies (E0)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from geodite_sim.workflows.distill.spec import SpecError, TeacherSpec

#: Edge of the cubic box (Å) an isolated atom sits in; pbc off, so no image is ever seen.
ISOLATED_BOX = 20.0


@dataclass(frozen=True)
class TeacherInfo:
    """What the model card records about the teacher."""

    name: str
    version: str
    energy_convention: str
    fingerprint: str

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "energy_convention": self.energy_convention,
                "fingerprint": self.fingerprint}




def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_teacher(spec: TeacherSpec):
    """The teacher model of ``spec`` (see :func:`geodite_sim.model.registry.resolve_model`)."""
    from geodite_sim.model.registry import resolve_model

    try:
        return resolve_model(spec.model, spec.options, dtype=spec.dtype, device=resolve_device(spec.device))
    except (ImportError, FileNotFoundError, KeyError, ValueError, AttributeError) as exc:
        raise SpecError(f"[teacher] model {spec.model!r} cannot be loaded: {exc}") from exc


def teacher_info(model, spec: TeacherSpec) -> TeacherInfo:
    """Name, version, energy convention and fingerprint of the teacher."""
    from geodite_sim.model.contract import model_fingerprint, model_name

    name = model_name(model)
    key = spec.model.lower()
    version = "unknown"
    if key in ("sevennet-0", "7net-0"):
        import sevenn

        version = f"SevenNet-0 (7net-0) from sevenn {sevenn.__version__}"
        convention = model.card["energy_convention"]
    elif key == "morse":
        version = "geodite_sim MorsePotential " + json.dumps(spec.options, sort_keys=True)
        convention = "Morse pair energy (zero for isolated atoms)"
    else:
        checksum = getattr(model, "checksum", None)
        version = f"checkpoint sha256 {checksum}" if checksum else spec.model
        card = getattr(model, "card", None)
        convention = (card or {}).get("energy_convention", "as the teacher computes it")
    return TeacherInfo(name=name, version=version, energy_convention=convention,
                       fingerprint=model_fingerprint(model))


def isolated_atom_energies(model, numbers: list[int]) -> dict[int, float]:
    """Energy (eV) of each element alone in a large non-periodic box, one batched ``evaluate``."""
    from geodite_sim.evaluate import evaluate

    out = evaluate(isolated_atoms(numbers), model, compute_stress=False)
    e0 = {}
    for z, r in zip(numbers, out):
        if r["error"] is not None or not np.isfinite(r["energy"]):
            raise SpecError(f"the teacher cannot compute an isolated {chemical_symbols[z]} atom: {r['error']}")
        e0[int(z)] = float(r["energy"])
    return e0


def isolated_atoms(numbers: list[int]) -> list[Atoms]:
    """The one-atom structures of :func:`isolated_atom_energies` (also training data)."""
    return [Atoms(numbers=[z], positions=[[ISOLATED_BOX / 2] * 3], cell=[ISOLATED_BOX] * 3, pbc=False)
            for z in numbers]
