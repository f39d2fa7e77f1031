"""Harmonic phonons of many materials in shared batches (phonopy for everything but the forces).

Protocol (``shared/docs/protocols.md`` §3, MDR / paper Table 2): relax each material (batched FIRE with the
cell, fmax 0.01 eV/Å, ≤ 500 steps), let phonopy generate its finite displacements (0.01 Å) in a supercell,
evaluate **every displaced supercell of every material in one** :func:`geodite_sim.evaluate` **call**
(batched internally), hand the forces back to phonopy for the force constants, then the mesh, DOS and
thermal properties at 300 K, and optionally DOS and band-structure PNGs::

    from geodite_sim.workflows.properties import run_phonons
    res = run_phonons([bulk("Si", "diamond", 5.43), "NaCl.cif"], model, supercell=(2, 2, 2), out_dir="ph")
    res[0].omega_max_THz, res[0].entropy_J_per_K_mol, res[0].imaginary_modes

Thermal properties are phonopy's: per mole of phonopy's primitive cell, which is the input cell by
default (``primitive_matrix="P"``; divide by ``n_atoms`` for per atom). Band paths come from ASE's
``Cell.bandpath`` of that cell (no seekpath needed).
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
    FAILED,
    Material,
    PropertyRecord,
    admit,
    base_fields,
    check_finite,
    finish_stage,
    matplotlib_pyplot,
    relax_stage,
    safe_evaluate,
    save_figure,
)

import geodite_sim as gs


@dataclass
class PhononResult(PropertyRecord):
    """Phonons of one material.

    Attributes:
        supercell: diagonal supercell multiples. n_displacements: displaced supercells evaluated.
        omega_max_THz: highest frequency on the mesh. min_frequency_THz: lowest (negative = imaginary).
        imaginary_modes: ``min_frequency_THz < -imaginary_tol``.
        entropy_J_per_K_mol, free_energy_kJ_per_mol, cv_J_per_K_mol: at ``temperature_K``, per mole of the cell,
            without the three acoustic modes at Γ (zero in exact arithmetic; phonopy's ``exclude_gamma_acoustic``, so
            their round-off sign cannot decide whether they enter the sums).
        gamma_frequencies_THz: the 3N frequencies at Γ (numpy array). mesh: the q-point mesh used.
        warnings: this material's notes, phonopy's own warnings among them.
        files: written files (``json``, ``dos_png``, ``bands_png``, ``phonopy_yaml``).
        structure: the (relaxed) cell used; phonopy: the ``phonopy.Phonopy`` object (force constants set).
    """

    supercell: list[int] | None = None
    n_displacements: int = 0
    displacement_A: float = 0.01
    temperature_K: float = 300.0
    omega_max_THz: float = math.nan
    min_frequency_THz: float = math.nan
    imaginary_modes: bool = False
    entropy_J_per_K_mol: float = math.nan
    free_energy_kJ_per_mol: float = math.nan
    cv_J_per_K_mol: float = math.nan
    gamma_frequencies_THz: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mesh: list[int] | None = None
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    structure: Atoms | None = None
    phonopy: Any = None

    _arrays: ClassVar[tuple[str, ...]] = ("gamma_frequencies_THz",)


def auto_supercell(atoms: Atoms, min_length: float) -> list[int]:
    """Smallest diagonal multiples making every perpendicular width of the supercell ≥ ``min_length`` Å."""
    cell = np.asarray(atoms.cell[:], dtype=float)
    volume = abs(np.linalg.det(cell))
    widths = [volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)]
    return [max(1, math.ceil(min_length / w - 1e-9)) for w in widths]


def supercell_matrix(atoms: Atoms, supercell: Any, min_length: float) -> np.ndarray:
    """3x3 integer supercell matrix from ``"auto"``, an int, three ints or a 3x3 matrix."""
    if isinstance(supercell, str):
        if supercell != "auto":
            raise ValueError(f"supercell must be 'auto', an int, 3 ints or a 3x3 matrix, got {supercell!r}")
        return np.diag(auto_supercell(atoms, min_length))
    arr = np.asarray(supercell, dtype=int)
    if arr.ndim == 0:
        return np.diag([int(arr)] * 3)
    if arr.shape == (3,):
        return np.diag(arr)
    if arr.shape == (3, 3):
        return arr
    raise ValueError(f"supercell must be 'auto', an int, 3 ints or a 3x3 matrix, got {supercell!r}")


def make_phonopy(atoms: Atoms, matrix: np.ndarray, displacement: float, symprec: float = 1e-5,
                 primitive_matrix: Any = "P"):
    """A ``phonopy.Phonopy`` for ``atoms`` with displacements generated.

    ``primitive_matrix="P"`` (default) takes the input cell as phonopy's primitive cell (phonopy 4's own
    default ``"auto"`` would reduce a conventional cell, changing what "per mole" and the q-points mean).
    """
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.asarray(atoms.cell[:]),
                        scaled_positions=atoms.get_scaled_positions(wrap=False), masses=atoms.get_masses())
    ph = Phonopy(unit, supercell_matrix=matrix, primitive_matrix=primitive_matrix, symprec=symprec)
    ph.generate_displacements(distance=displacement)
    return ph


def phonopy_to_ase(cell) -> Atoms:
    """A phonopy supercell as a periodic ASE Atoms."""
    return Atoms(symbols=cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)


def resolve_mesh(mesh: float | Sequence[int], atoms: Atoms) -> list[int]:
    """q-mesh: three ints as given, or phonopy's length rule (n_i = max(1, round(length · |b_i|)))."""
    if isinstance(mesh, (int, float)) and not isinstance(mesh, bool):
        rec = np.linalg.norm(np.linalg.inv(np.asarray(atoms.cell[:], dtype=float)).T, axis=1)
        return [max(1, int(round(float(mesh) * b))) for b in rec]
    out = [int(v) for v in mesh]
    if len(out) != 3:
        raise ValueError(f"mesh must be a length or three ints, got {mesh!r}")
    return out


def run_phonons(
    structures: Any,
    model=None,
    *,
    supercell: Any = "auto",
    auto_min_length: float = 10.0,
    displacement: float = 0.01,
    relax: bool = True,
    fmax: float = 0.01,
    max_steps: int = 500,
    optimizer: str = "fire",
    mesh: float | Sequence[int] = 40.0,
    temperature: float = 300.0,
    imaginary_tol: float = 0.1,
    symprec: float = 1e-5,
    primitive_matrix: Any = "P",
    out_dir: str | Path | None = None,
    names: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    plots: bool = True,
    band_points: int = 51,
    max_atoms: int | None = None,
    progress: bool = False,
) -> list[PhononResult]:
    """Harmonic phonons of every structure, all displaced supercells evaluated in one batched call.

    Args:
        structures: ASE Atoms, pymatgen Structures or file paths (one or many).
        model: Geodite (default ``load_model()``) or any model with its call signature.
        supercell: ``"auto"`` (every supercell width ≥ ``auto_min_length`` Å), an int, 3 ints or a 3x3 matrix.
        displacement: finite displacement, Å.
        relax: relax ions and cell first (``optimizer``, ``fmax`` eV/Å, ``max_steps``).
        optimizer: ``"fire"`` (default), ``"lbfgs"`` or ``"bfgs"`` for every relaxation (docs/optimizers.md).
        mesh: q-mesh for DOS/thermal properties: three ints, or a length (Å) for phonopy's length rule.
        primitive_matrix: phonopy's primitive matrix: ``"P"`` (default: the input cell), ``"auto"``, a 3x3 matrix.
        temperature: K, for S, F and C_v. imaginary_tol: THz; modes below ``-imaginary_tol`` flag ``imaginary_modes``.
        out_dir: write ``<name>.json`` (+ ``<name>_dos.png``, ``<name>_bands.png``, ``<name>_phonopy.yaml``) here.
        names: file stems for ``out_dir`` (default: from the labels). labels: labels for the records.
        plots: write the PNGs (needs ``out_dir``). band_points: q-points per band-path segment.
        max_atoms: atoms per internal batch of ``evaluate``. progress: progress bars.
    Returns:
        One :class:`PhononResult` per input, in input order.
    """
    model = model if model is not None else gs.load_model()
    materials = admit(structures, labels)
    if relax:
        relax_stage(materials, model, fmax=fmax, max_steps=max_steps, relax_cell=True, progress=progress,
                    optimizer=optimizer)

    # 1. displacements of every material
    phonons: dict[int, Any] = {}
    cells: list[Atoms] = []
    owners: list[int] = []
    labels: list[str] = []
    for m in materials:
        if not m.ok:
            continue
        if not m.atoms.pbc.all():
            m.fail("phonons need a fully periodic structure")
            continue
        try:
            ph = make_phonopy(m.atoms, supercell_matrix(m.atoms, supercell, auto_min_length), displacement, symprec,
                              primitive_matrix)
        except Exception as exc:  # noqa: BLE001 - phonopy/spglib reject odd cells
            m.fail(f"phonopy set-up failed: {type(exc).__name__}: {exc}")
            continue
        phonons[m.index] = ph
        supercells = ph.supercells_with_displacements
        for k, sc in enumerate(supercells):
            cells.append(phonopy_to_ase(sc))
            owners.append(m.index)
            labels.append(f"{m.label} displaced supercell {k + 1}/{len(supercells)}")

    # 2. every displaced supercell in one batched evaluation
    # (derived cells of admitted structures: no second closest-pair admission check)
    forces_out, errors = safe_evaluate(cells, owners, model, compute_stress=False, max_atoms=max_atoms,
                                       labels=labels, min_distance_factor=None)
    per_material: dict[int, list[np.ndarray]] = {}
    for owner, res in zip(owners, forces_out, strict=True):
        if res is not None:
            bad = check_finite(res, ("forces",))
            if bad:
                errors.setdefault(owner, bad)
            per_material.setdefault(owner, []).append(res["forces"])

    # 3. phonopy post-processing, per material
    def record(m: Material) -> PhononResult:
        res = PhononResult(**base_fields(m), displacement_A=displacement, temperature_K=temperature,
                           structure=m.atoms if m.ok else None)
        if m.ok:
            try:
                _postprocess(res, m, phonons[m.index], per_material[m.index], mesh, temperature, imaginary_tol)
            except Exception as exc:  # noqa: BLE001 - one material's phonopy failure stays its own
                res.status, res.error = FAILED, f"phonopy post-processing failed: {type(exc).__name__}: {exc}"
        return res

    def write_files(res: PhononResult, out: Path, stem: str) -> None:
        _write_files(res, out, stem, plots and res.status == DONE, band_points)

    return finish_stage(materials, errors, record, desc="phonons", out_dir=out_dir, names=names, extra=write_files,
                        progress=progress)


def _postprocess(res: PhononResult, m: Material, ph, forces: list[np.ndarray], mesh, temperature: float,
                 imaginary_tol: float) -> None:
    ph.forces = np.array(forces)
    ph.produce_force_constants()
    res.phonopy = ph
    res.supercell = [int(v) for v in np.diag(ph.supercell_matrix)]
    res.n_displacements = len(forces)
    res.mesh = resolve_mesh(mesh, _primitive_atoms(ph))
    ph.run_mesh(res.mesh, is_gamma_center=True)
    freqs = ph.mesh.frequencies
    res.omega_max_THz = float(np.max(freqs))
    res.min_frequency_THz = float(np.min(freqs))
    res.imaginary_modes = bool(res.min_frequency_THz < -imaginary_tol)
    ph.run_qpoints([[0.0, 0.0, 0.0]])
    res.gamma_frequencies_THz = np.array(ph.qpoints.frequencies[0], dtype=float)
    ph.run_total_dos()
    with warnings.catch_warnings(record=True) as caught:  # phonopy's own warnings: kept with the result, re-shown
        warnings.simplefilter("always")
        ph.run_thermal_properties(temperatures=[temperature], exclude_gamma_acoustic=True)
    for w in caught:
        res.warnings.append(f"phonopy: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    tp = ph.thermal_properties
    res.free_energy_kJ_per_mol = float(tp.free_energy[0])
    res.entropy_J_per_K_mol = float(tp.entropy[0])
    res.cv_J_per_K_mol = float(tp.heat_capacity[0])
    if res.imaginary_modes:
        res.warnings.append(f"imaginary modes down to {res.min_frequency_THz:.3f} THz: thermal properties "
                            "ignore them")
    res.status = DONE


def _primitive_atoms(ph) -> Atoms:
    """phonopy's primitive cell as ASE Atoms (the cell q-points refer to)."""
    prim = ph.primitive
    return Atoms(symbols=prim.symbols, cell=prim.cell, scaled_positions=prim.scaled_positions, pbc=True)


def band_path(atoms: Atoms) -> tuple[list[list[np.ndarray]], list[list[str]]]:
    """ASE's band path for ``atoms``' cell: segments of special q-points (reduced coordinates) and their labels."""
    from ase.dft.kpoints import parse_path_string

    bp = atoms.cell.bandpath(npoints=0)
    segments = parse_path_string(bp.path)
    points = [[np.asarray(bp.special_points[name], dtype=float) for name in seg] for seg in segments]
    return points, segments


def _write_files(res: PhononResult, out: Path, stem: str, plots: bool, band_points: int) -> None:
    """phonopy YAML (force sets and displacements) and the DOS / band plots, listed in ``res.files``."""
    if res.status == DONE and res.phonopy is not None:
        yaml = out / f"{stem}_phonopy.yaml"
        res.phonopy.save(filename=str(yaml), settings={"force_sets": True, "displacements": True})
        res.files["phonopy_yaml"] = str(yaml)
    if plots:
        try:
            res.files["dos_png"] = _plot_dos(res, out / f"{stem}_dos.png")
        except Exception as exc:  # noqa: BLE001 - a plot never fails the result
            res.warnings.append(f"DOS plot failed: {exc}")
        try:
            res.files["bands_png"] = _plot_bands(res, out / f"{stem}_bands.png", band_points)
        except Exception as exc:  # noqa: BLE001
            res.warnings.append(f"band-structure plot failed: {exc}")


def _plot_dos(res: PhononResult, path: Path) -> str:
    plt = matplotlib_pyplot()
    dos = res.phonopy.total_dos
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(dos.frequency_points, dos.dos, lw=1.2)
    ax.axvline(0.0, color="0.6", lw=0.6)
    ax.set_xlabel("frequency (THz)")
    ax.set_ylabel("DOS (states/THz/cell)")
    ax.set_title(f"{res.formula}: ω_max {res.omega_max_THz:.2f} THz")
    return save_figure(fig, path)


def _plot_bands(res: PhononResult, path: Path, band_points: int) -> str:
    from phonopy.phonon.band_structure import get_band_qpoints_and_path_connections

    plt = matplotlib_pyplot()
    ph = res.phonopy
    points, names = band_path(_primitive_atoms(ph))
    qpoints, connections = get_band_qpoints_and_path_connections([[p.tolist() for p in seg] for seg in points],
                                                                 npoints=band_points)
    ph.run_band_structure(qpoints, path_connections=connections)
    bs = ph.band_structure
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ticks, tick_labels = [], []
    labels_flat = [(seg[i], seg[i + 1]) for seg in names for i in range(len(seg) - 1)]
    for k, (dist, freq) in enumerate(zip(bs.distances, bs.frequencies, strict=True)):
        ax.plot(dist, freq, color="C0", lw=1.0)
        start, end = labels_flat[k]
        pretty = [("Γ" if s == "G" else s) for s in (start, end)]
        if not ticks or abs(ticks[-1] - dist[0]) > 1e-9:
            ticks.append(dist[0])
            tick_labels.append(pretty[0])
        elif tick_labels[-1] != pretty[0]:
            tick_labels[-1] = f"{tick_labels[-1]}|{pretty[0]}"
        ticks.append(dist[-1])
        tick_labels.append(pretty[1])
    for t in ticks:
        ax.axvline(t, color="0.7", lw=0.5)
    ax.axhline(0.0, color="0.6", lw=0.5)
    ax.set_xticks(ticks, tick_labels)
    ax.set_xlim(ticks[0], ticks[-1])
    ax.set_ylabel("frequency (THz)")
    ax.set_title(res.formula)
    return save_figure(fig, path)


__all__ = ["PhononResult", "auto_supercell", "band_path", "make_phonopy", "run_phonons"]
