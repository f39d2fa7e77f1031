"""Elastic tensors of many materials, with the ions relaxed in every strained cell, in one batch.

Each material is (optionally) relaxed with its cell; each of the six Voigt strains is applied at the
magnitudes ``strains`` (default ±δ, ±δ/2); the ions of **every strained cell of every material** are
relaxed at fixed cell in one :func:`geodite_sim.relax_many` call (the relaxed-ion tensor), and the
same cells are evaluated unrelaxed in one :func:`geodite_sim.evaluate` call (the clamped-ion tensor).
C_ij = dσ_i/dε_j is the least-squares slope of the stress (ASE sign, Voigt xx, yy, zz, yz, xz, xy) against
the engineering strain ε_j, in GPa::

    from geodite_sim.workflows.properties import run_elastic
    r = run_elastic([bulk("Cu", "fcc", 3.6)], model)[0]
    r.C_GPa, r.C_clamped_GPa, r.bulk_hill_GPa, r.shear_hill_GPa, r.born_stable

The tensors are reported in the standard (IEEE 1987) setting of the conventional cell, found with spglib through
pymatgen (``Tensor.get_ieee_rotation``: for a cubic crystal x, y, z along its cubic axes, so C14 = 0 whatever the
input cell's orientation); ``ieee_rotation`` maps the input's Cartesian frame to it. Voigt/Reuss/Hill moduli follow
Hill (1952); Born stability is the positive definiteness of C (for cubic crystals it reduces to C11 − C12 > 0,
C11 + 2 C12 > 0, C44 > 0, also reported, on the IEEE tensor). The moduli of a Born-unstable tensor are NaN, with a
warning: averages of an unstable crystal mean nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from geodite_sim.workflows.properties.common import (
    DONE,
    EV_PER_A3_TO_GPA,
    FAILED,
    Material,
    PropertyRecord,
    admit,
    base_fields,
    check_finite,
    finish_stage,
    ion_relax_stage,
    relax_stage,
    safe_evaluate,
)

import geodite_sim as gs

#: Voigt index -> tensor pair (xx, yy, zz, yz, xz, xy).
VOIGT = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]


@dataclass
class ElasticResult(PropertyRecord):
    """Elastic constants of one material (GPa), numpy arrays in the IEEE setting of the conventional cell.

    Attributes:
        C_GPa: 6x6 relaxed-ion tensor (symmetrised; the clamped-ion one when ``relax_ions=False``).
        C_clamped_GPa: 6x6 clamped-ion tensor (homogeneous strain, ions not relaxed).
        ieee_rotation: 3x3 rotation R from the input's Cartesian frame to the IEEE frame (x_ieee = R x_input).
        asymmetry_GPa: max |C_ij − C_ji| / 2 before symmetrisation (a fit-quality indicator).
        bulk_/shear_ voigt/reuss/hill _GPa: Hill's averages of the relaxed-ion tensor (NaN when it is Born-unstable).
        eigenvalues_GPa: of C_GPa; born_stable: all > 0. cubic_born: the cubic criteria (only for cubic cells).
        residual_stress_GPa: Voigt stress of the unstrained reference cell. strains: magnitudes applied.
    """

    C_GPa: np.ndarray | None = None
    C_clamped_GPa: np.ndarray | None = None
    ieee_rotation: np.ndarray | None = None
    asymmetry_GPa: float = math.nan
    bulk_voigt_GPa: float = math.nan
    bulk_reuss_GPa: float = math.nan
    bulk_hill_GPa: float = math.nan
    shear_voigt_GPa: float = math.nan
    shear_reuss_GPa: float = math.nan
    shear_hill_GPa: float = math.nan
    bulk_hill_clamped_GPa: float = math.nan
    shear_hill_clamped_GPa: float = math.nan
    eigenvalues_GPa: np.ndarray = field(default_factory=lambda: np.zeros(0))
    born_stable: bool | None = None
    born_stable_clamped: bool | None = None
    cubic_born: dict[str, bool] | None = None
    residual_stress_GPa: np.ndarray = field(default_factory=lambda: np.zeros(0))
    strains: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ions_relaxed: bool = True
    ions_converged: bool | None = None
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    structure: Atoms | None = None

    _arrays: ClassVar[tuple[str, ...]] = ("C_GPa", "C_clamped_GPa", "ieee_rotation", "eigenvalues_GPa",
                                          "residual_stress_GPa", "strains")


def ieee_rotation(atoms: Atoms) -> np.ndarray:
    """The rotation R (3x3) from ``atoms``' Cartesian frame to the IEEE 1987 setting of its conventional cell
    (pymatgen's ``Tensor.get_ieee_rotation``: spglib's conventional cell, symmetry tolerance 0.01 Å)."""
    from pymatgen.core.tensors import Tensor
    from pymatgen.io.ase import AseAtomsAdaptor

    return np.asarray(Tensor.get_ieee_rotation(AseAtomsAdaptor.get_structure(atoms), refine_rotation=True),
                      dtype=float)


def rotate_voigt(c: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """A 6x6 stiffness tensor (Voigt, engineering shear) in the frame rotated by ``rotation`` (pymatgen's rules)."""
    from pymatgen.analysis.elasticity import ElasticTensor

    return np.asarray(ElasticTensor.from_voigt(c).rotate(rotation, tol=1e-2).voigt, dtype=float)


def strain_matrix(voigt: int, magnitude: float) -> np.ndarray:
    """Symmetric strain tensor for engineering Voigt strain ``magnitude`` along component ``voigt`` (0-5)."""
    i, j = VOIGT[voigt]
    eps = np.zeros((3, 3))
    if i == j:
        eps[i, i] = magnitude
    else:
        eps[i, j] = eps[j, i] = magnitude / 2.0
    return eps


def strained_copy(atoms: Atoms, voigt: int, magnitude: float) -> Atoms:
    """``atoms`` under the homogeneous deformation F = I + ε (cell rows and positions transformed)."""
    out = atoms.copy()
    out.calc = None
    deform = np.eye(3) + strain_matrix(voigt, magnitude)
    out.set_cell(np.asarray(atoms.cell[:]) @ deform.T, scale_atoms=True)
    return out


def to_voigt(stress: np.ndarray) -> np.ndarray:
    """(3, 3) -> (6,) in xx, yy, zz, yz, xz, xy order."""
    s = np.asarray(stress, dtype=float)
    return np.array([s[i, j] for i, j in VOIGT])


def fit_tensor(strains: Sequence[float], stresses: np.ndarray) -> np.ndarray:
    """C (6x6, units of the stresses) from stresses [6 components strained, n strains, 6] by linear fits."""
    x = np.asarray(strains, dtype=float)
    c = np.zeros((6, 6))
    for j in range(6):
        c[:, j] = np.polyfit(x, stresses[j], 1)[0]
    return c


def moduli(c: np.ndarray) -> dict[str, float]:
    """Voigt, Reuss and Hill bulk and shear moduli (units of ``c``) of a 6x6 stiffness tensor."""
    c = np.asarray(c, dtype=float)
    kv = (c[0, 0] + c[1, 1] + c[2, 2] + 2.0 * (c[0, 1] + c[0, 2] + c[1, 2])) / 9.0
    gv = (c[0, 0] + c[1, 1] + c[2, 2] - (c[0, 1] + c[0, 2] + c[1, 2]) + 3.0 * (c[3, 3] + c[4, 4] + c[5, 5])) / 15.0
    try:
        s = np.linalg.inv(c)
        kr = 1.0 / (s[0, 0] + s[1, 1] + s[2, 2] + 2.0 * (s[0, 1] + s[0, 2] + s[1, 2]))
        gr = 15.0 / (4.0 * (s[0, 0] + s[1, 1] + s[2, 2]) - 4.0 * (s[0, 1] + s[0, 2] + s[1, 2])
                     + 3.0 * (s[3, 3] + s[4, 4] + s[5, 5]))
    except np.linalg.LinAlgError:
        kr = gr = math.nan
    return {"bulk_voigt": kv, "bulk_reuss": kr, "bulk_hill": (kv + kr) / 2.0,
            "shear_voigt": gv, "shear_reuss": gr, "shear_hill": (gv + gr) / 2.0}


def is_cubic(atoms: Atoms, symprec: float = 1e-3) -> bool:
    """Whether spglib finds a cubic space group (195-230)."""
    import spglib

    data = spglib.get_symmetry_dataset((np.asarray(atoms.cell[:]), atoms.get_scaled_positions(), atoms.numbers),
                                       symprec=symprec)
    return data is not None and 195 <= int(data.number) <= 230


def cubic_born(c: np.ndarray) -> dict[str, bool]:
    """Born criteria of a cubic crystal: C11 − C12 > 0, C11 + 2 C12 > 0, C44 > 0."""
    return {"C11-C12>0": bool(c[0, 0] - c[0, 1] > 0), "C11+2C12>0": bool(c[0, 0] + 2 * c[0, 1] > 0),
            "C44>0": bool(c[3, 3] > 0)}


def run_elastic(
    structures: Any,
    model=None,
    *,
    strain: float = 0.01,
    strains: Sequence[float] | None = None,
    relax: bool = True,
    relax_ions: bool = True,
    fmax: float = 0.001,
    ion_fmax: float | None = None,
    max_steps: int = 500,
    optimizer: str = "fire",
    out_dir: str | Path | None = None,
    names: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    max_atoms: int | None = None,
    progress: bool = False,
) -> list[ElasticResult]:
    """Elastic tensors of every structure; all strained cells of all materials in one batch per stage.

    Args:
        structures: ASE Atoms, pymatgen Structures or file paths (fully periodic).
        model: Geodite (default ``load_model()``) or any model with its call signature.
        strain: largest engineering strain δ; ``strains`` (magnitudes, default (−δ, −δ/2, δ/2, δ)) overrides it.
        relax: relax ions and cell first (``optimizer`` to ``fmax`` eV/Å, ≤ ``max_steps``).
        optimizer: ``"fire"`` (default), ``"lbfgs"`` or ``"bfgs"`` for every relaxation (docs/optimizers.md).
        relax_ions: relax the ions of each strained cell (fixed cell, to ``ion_fmax``, default ``fmax``).
        out_dir: write ``<name>.json`` here. names/labels: file stems / record labels.
    Returns:
        One :class:`ElasticResult` per input, in input order.
    """
    model = model if model is not None else gs.load_model()
    mags = np.asarray(strains if strains is not None else [-strain, -strain / 2, strain / 2, strain], dtype=float)
    if mags.ndim != 1 or len(mags) < 2 or len(np.unique(mags)) < 2:
        raise ValueError(f"need at least two distinct strain magnitudes, got {mags.tolist()}")
    ion_fmax = fmax if ion_fmax is None else ion_fmax
    materials = admit(structures, labels)
    if relax:
        relax_stage(materials, model, fmax=fmax, max_steps=max_steps, relax_cell=True, progress=progress,
                    optimizer=optimizer)
    cells, owners, labels = [], [], []
    for m in materials:
        if m.ok and not m.atoms.pbc.all():
            m.fail("an elastic tensor needs a fully periodic structure")
        if m.ok:
            cells.append(m.atoms.copy())  # the reference cell (residual stress)
            owners.append(m.index)
            labels.append(f"{m.label} (unstrained)")
            for j in range(6):
                for e in mags:
                    cells.append(strained_copy(m.atoms, j, float(e)))
                    owners.append(m.index)
                    labels.append(f"{m.label} strained e{j + 1} = {e:+g}")
    per = 1 + 6 * len(mags)

    # derived cells of admitted structures: no second closest-pair admission check
    clamped, errors = safe_evaluate(cells, owners, model, compute_stress=True, max_atoms=max_atoms, labels=labels,
                                    min_distance_factor=None)
    for owner, r in zip(owners, clamped, strict=True):
        if r is not None and (bad := check_finite(r, ("energy", "stress"))):
            errors.setdefault(owner, bad)
    relaxed_stress: list[np.ndarray | None] = [None] * len(cells)
    converged: dict[int, bool] = {}
    if relax_ions:
        # the reference cell is already relaxed; only the strained ones need ionic relaxation
        strained = [k for k in range(len(cells)) if k % per != 0]
        out = ion_relax_stage([cells[k] for k in strained], model, fmax=ion_fmax, max_steps=max_steps,
                              progress=progress, labels=[labels[k] for k in strained], optimizer=optimizer)
        relaxed_cells, relaxed_owners, relaxed_pos = [], [], []
        for k, (atoms, _, conv, err) in zip(strained, out, strict=True):
            owner = owners[k]
            converged[owner] = converged.get(owner, True) and conv
            if err is not None:
                errors.setdefault(owner, f"fixed-cell relaxation of a strained cell failed: {err}")
                continue
            relaxed_cells.append(atoms)
            relaxed_owners.append(owner)
            relaxed_pos.append(k)
        # the stress of every relaxed strained cell, in one batched evaluation
        evaluated, eval_errors = safe_evaluate(relaxed_cells, relaxed_owners, model, compute_stress=True,
                                               max_atoms=max_atoms, labels=[labels[k] for k in relaxed_pos],
                                               min_distance_factor=None)
        for owner, msg in eval_errors.items():
            errors.setdefault(owner, msg)
        for k, r in zip(relaxed_pos, evaluated, strict=True):
            if r is not None and (bad := check_finite(r, ("energy", "stress"))):
                errors.setdefault(owners[k], bad)
            relaxed_stress[k] = None if r is None else r["stress"]

    start = {}
    for k, owner in enumerate(owners):
        start.setdefault(owner, k)

    def record(m: Material) -> ElasticResult:
        r = ElasticResult(**base_fields(m), strains=mags.copy(), ions_relaxed=relax_ions,
                          structure=m.atoms if m.ok else None)
        if m.ok:
            try:
                _fill(r, m.atoms, start[m.index], mags, clamped, relaxed_stress, relax_ions)
                r.ions_converged = converged.get(m.index) if relax_ions else None
                if r.ions_converged is False:
                    r.warnings.append("some fixed-cell ionic relaxations did not converge")
            except Exception as exc:  # noqa: BLE001 - this material's failure only
                r.status, r.error = FAILED, f"elastic fit failed: {type(exc).__name__}: {exc}"
        return r

    return finish_stage(materials, errors, record, desc="elastic", out_dir=out_dir, names=names, progress=progress)


def _fill(r: ElasticResult, atoms: Atoms, k0: int, mags: np.ndarray, clamped: list, relaxed: list,
          relax_ions: bool) -> None:
    n = len(mags)
    r.residual_stress_GPa = to_voigt(clamped[k0]["stress"]) * EV_PER_A3_TO_GPA

    def tensor(source) -> np.ndarray:
        stresses = np.array([[to_voigt(source(k0 + 1 + j * n + i)) for i in range(n)] for j in range(6)])
        return fit_tensor(mags, stresses) * EV_PER_A3_TO_GPA

    c_clamped = tensor(lambda k: clamped[k]["stress"])
    c_raw = tensor(lambda k: relaxed[k]) if relax_ions else c_clamped
    r.asymmetry_GPa = float(np.max(np.abs(c_raw - c_raw.T)) / 2.0)
    rot = ieee_rotation(atoms)  # the Born tests and the table read C in the crystal's standard setting
    c = rotate_voigt(0.5 * (c_raw + c_raw.T), rot)
    cc = rotate_voigt(0.5 * (c_clamped + c_clamped.T), rot)
    c, cc = 0.5 * (c + c.T), 0.5 * (cc + cc.T)
    r.C_GPa, r.C_clamped_GPa, r.ieee_rotation = c, cc, rot
    eig = np.linalg.eigvalsh(c)
    r.eigenvalues_GPa = eig
    r.born_stable = bool(eig.min() > 0)
    r.born_stable_clamped = bool(np.linalg.eigvalsh(cc).min() > 0)
    if r.born_stable:
        for key, value in moduli(c).items():
            setattr(r, f"{key}_GPa", float(value))
    else:
        r.warnings.append(f"Born-unstable tensor (smallest eigenvalue {eig.min():.3g} GPa): bulk and shear moduli "
                          "are not reported (NaN)")
        warnings.warn(f"{r.label}: {r.warnings[-1]}", RuntimeWarning, stacklevel=2)
    if r.born_stable_clamped:
        mc = moduli(cc)
        r.bulk_hill_clamped_GPa, r.shear_hill_clamped_GPa = float(mc["bulk_hill"]), float(mc["shear_hill"])
    if is_cubic(atoms):
        r.cubic_born = cubic_born(c)
    r.status = DONE


__all__ = ["ElasticResult", "cubic_born", "fit_tensor", "ieee_rotation", "moduli", "rotate_voigt", "run_elastic",
           "strain_matrix", "strained_copy"]
