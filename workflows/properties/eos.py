"""Equations of state of many materials: all strained copies relaxed in one batch, Birch–Murnaghan fits.

Each material is (optionally) relaxed with its cell, then copied at ``n_points`` volumes spanning
``±volume_range`` (isotropic scaling of the cell and atoms); the ions of **every copy of every material**
are relaxed at fixed cell in one :func:`geodite_sim.relax_many` call (or evaluated as they are with
``relax_ions=False``, one :func:`geodite_sim.evaluate` call), and ASE's ``EquationOfState`` fits
E(V)::

    from geodite_sim.workflows.properties import run_eos
    r = run_eos([bulk("Cu", "fcc", 3.6)], model)[0]
    r.v0_A3, r.b0_GPa, r.b0_prime, r.e0_eV
"""

from __future__ import annotations

import math
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
    matplotlib_pyplot,
    relax_stage,
    safe_evaluate,
    save_figure,
)

import geodite_sim as gs


@dataclass
class EOSResult(PropertyRecord):
    """Equation of state of one material.

    Attributes:
        volumes_A3, energies_eV: the E(V) points (whole cell), numpy arrays. volume_strains: V/V_ref − 1 of each point.
        v0_A3, e0_eV, b0_GPa, b0_prime: fitted equilibrium volume, energy, bulk modulus and its pressure derivative.
        eos: the EOS form fitted. ions_relaxed: whether ions were relaxed at each volume;
        ions_converged: every fixed-cell relaxation converged.
    """

    eos: str = "birchmurnaghan"
    volume_strains: np.ndarray = field(default_factory=lambda: np.zeros(0))
    volumes_A3: np.ndarray = field(default_factory=lambda: np.zeros(0))
    energies_eV: np.ndarray = field(default_factory=lambda: np.zeros(0))
    v0_A3: float = math.nan
    e0_eV: float = math.nan
    b0_GPa: float = math.nan
    b0_prime: float = math.nan
    ions_relaxed: bool = True
    ions_converged: bool | None = None
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    structure: Atoms | None = None

    _arrays: ClassVar[tuple[str, ...]] = ("volume_strains", "volumes_A3", "energies_eV")


def volume_points(volume_range: float = 0.08, n_points: int = 9) -> np.ndarray:
    """Volume strains V/V_ref − 1, evenly spaced in [−volume_range, +volume_range]."""
    return np.linspace(-volume_range, volume_range, n_points)


def scaled_copy(atoms: Atoms, volume_strain: float) -> Atoms:
    """``atoms`` scaled isotropically to (1 + volume_strain) times its volume (fractional coordinates kept)."""
    out = atoms.copy()
    out.calc = None
    out.set_cell(np.asarray(atoms.cell[:]) * (1.0 + volume_strain) ** (1.0 / 3.0), scale_atoms=True)
    return out


def fit_eos(volumes: Sequence[float], energies: Sequence[float], eos: str = "birchmurnaghan") -> dict[str, float]:
    """ASE's EOS fit: ``v0_A3``, ``e0_eV``, ``b0_GPa`` and (for four-parameter forms) ``b0_prime``."""
    from ase.eos import EquationOfState

    fit = EquationOfState(list(volumes), list(energies), eos=eos)
    v0, e0, b = fit.fit(warn=False)
    b0_prime = math.nan
    params = getattr(fit, "eos_parameters", None)
    if eos in ("murnaghan", "birch", "birchmurnaghan", "pouriertarantola", "vinet") and params is not None:
        b0_prime = float(params[2])
    return {"v0_A3": float(v0), "e0_eV": float(e0), "b0_GPa": float(b) * EV_PER_A3_TO_GPA, "b0_prime": b0_prime}


def run_eos(
    structures: Any,
    model=None,
    *,
    strains: Sequence[float] | None = None,
    volume_range: float = 0.08,
    n_points: int = 9,
    relax: bool = True,
    relax_ions: bool = True,
    fmax: float = 0.01,
    max_steps: int = 500,
    optimizer: str = "fire",
    eos: str = "birchmurnaghan",
    out_dir: str | Path | None = None,
    names: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    plots: bool = True,
    max_atoms: int | None = None,
    progress: bool = False,
) -> list[EOSResult]:
    """Fit an equation of state for every structure; all strained copies run in one batch.

    Args:
        structures: ASE Atoms, pymatgen Structures or file paths (fully periodic).
        model: Geodite (default ``load_model()``) or any model with its call signature.
        strains: volume strains V/V_ref − 1 (default ``n_points`` evenly in ±``volume_range``; at least 5 points).
        relax: relax ions and cell first (``optimizer``, ``fmax`` eV/Å, ``max_steps``).
        relax_ions: relax the ions in every strained cell (fixed cell) before taking its energy.
        optimizer: ``"fire"`` (default), ``"lbfgs"`` or ``"bfgs"`` for every relaxation (docs/optimizers.md).
        eos: ASE EOS name (``birchmurnaghan``, ``vinet``, ``murnaghan``, …).
        out_dir: write ``<name>.json`` and ``<name>_eos.png`` here. names/labels: file stems / record labels.
    Returns:
        One :class:`EOSResult` per input, in input order.
    """
    model = model if model is not None else gs.load_model()
    eps = np.asarray(strains if strains is not None else volume_points(volume_range, n_points), dtype=float)
    if eps.ndim != 1 or len(eps) < 5:
        raise ValueError(f"an EOS fit needs at least 5 volume points, got {eps.tolist()}")
    if np.any(eps <= -1.0):
        raise ValueError("volume strains must be > -1")
    materials = admit(structures, labels)
    if relax:
        relax_stage(materials, model, fmax=fmax, max_steps=max_steps, relax_cell=True, progress=progress,
                    optimizer=optimizer)
    cells, owners, labels = [], [], []
    for m in materials:
        if m.ok and not m.atoms.pbc.all():
            m.fail("an equation of state needs a fully periodic structure")
        if m.ok:
            for e in eps:
                cells.append(scaled_copy(m.atoms, float(e)))
                owners.append(m.index)
                labels.append(f"{m.label} at V/V0 = {1 + e:.3f}")

    energies: dict[int, list[float]] = {}
    volumes: dict[int, list[float]] = {}
    converged: dict[int, bool] = {}
    errors: dict[int, str] = {}
    if relax_ions:
        for owner, cell, (_, energy, conv, err) in zip(
                owners, cells, ion_relax_stage(cells, model, fmax=fmax, max_steps=max_steps, progress=progress,
                                               labels=labels, optimizer=optimizer), strict=True):
            if err is not None:
                errors.setdefault(owner, f"fixed-cell relaxation at V = {cell.get_volume():.3f} Å³ failed: {err}")
            energies.setdefault(owner, []).append(energy)
            volumes.setdefault(owner, []).append(cell.get_volume())
            converged[owner] = converged.get(owner, True) and conv
    else:
        res, errors = safe_evaluate(cells, owners, model, compute_stress=False, max_atoms=max_atoms, labels=labels,
                                    min_distance_factor=None)
        for owner, cell, r in zip(owners, cells, res, strict=True):
            if r is not None and (bad := check_finite(r, ("energy",))):
                errors.setdefault(owner, bad)
            energies.setdefault(owner, []).append(r["energy"] if r is not None else math.nan)
            volumes.setdefault(owner, []).append(cell.get_volume())

    def record(m: Material) -> EOSResult:
        r = EOSResult(**base_fields(m), eos=eos, volume_strains=eps.copy(), ions_relaxed=relax_ions,
                      structure=m.atoms if m.ok else None)
        if m.ok:
            r.volumes_A3, r.energies_eV = np.array(volumes[m.index]), np.array(energies[m.index])
            r.ions_converged = converged.get(m.index) if relax_ions else None
            try:
                for k, v in fit_eos(r.volumes_A3, r.energies_eV, eos).items():
                    setattr(r, k, v)
                if not (min(r.volumes_A3) <= r.v0_A3 <= max(r.volumes_A3)):
                    r.warnings.append("fitted V0 lies outside the sampled volumes")
            except Exception as exc:  # noqa: BLE001 - a failed fit is this material's error
                r.status, r.error = FAILED, f"EOS fit failed: {type(exc).__name__}: {exc}"
            if r.ions_converged is False:
                r.warnings.append("some fixed-cell ionic relaxations did not converge")
        return r

    def write_plot(r: EOSResult, out: Path, stem: str) -> None:
        if plots and r.status == DONE:
            try:
                r.files["eos_png"] = plot_eos(r, out / f"{stem}_eos.png")
            except Exception as exc:  # noqa: BLE001
                r.warnings.append(f"EOS plot failed: {exc}")

    return finish_stage(materials, errors, record, desc="eos", out_dir=out_dir, names=names, extra=write_plot,
                        progress=progress)


def plot_eos(r: EOSResult, path: Path) -> str:
    """E(V) points and the fitted curve as a PNG."""
    from ase.eos import birchmurnaghan, murnaghan, vinet

    plt = matplotlib_pyplot()
    v = np.asarray(r.volumes_A3)
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ax.plot(v, r.energies_eV, "o", label="model")
    forms = {"birchmurnaghan": birchmurnaghan, "murnaghan": murnaghan, "vinet": vinet}
    if r.eos in forms and math.isfinite(r.b0_prime):
        x = np.linspace(v.min(), v.max(), 200)
        ax.plot(x, forms[r.eos](x, r.e0_eV, r.b0_GPa / EV_PER_A3_TO_GPA, r.b0_prime, r.v0_A3), "-",
                label=f"{r.eos}: B0 {r.b0_GPa:.1f} GPa, B0' {r.b0_prime:.2f}")
    ax.set_xlabel("volume (Å³)")
    ax.set_ylabel("energy (eV)")
    ax.set_title(f"{r.formula}: V0 {r.v0_A3:.3f} Å³")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


__all__ = ["EOSResult", "fit_eos", "run_eos", "scaled_copy", "volume_points"]
