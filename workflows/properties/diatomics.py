"""The homonuclear-diatomics smoothness suite (MLIP Arena; ``shared/docs/protocols.md`` §4), in one batch.

For every element the model supports, two atoms in vacuum at ``n`` distances from 0.01 to 6.1 Å: all
``n × n_elements`` dimers are evaluated in one :func:`geodite_sim.evaluate` call. The bond force
F(r) = f₂ · r̂₁₂ (eV/Å, positive = repulsive) and E(r) (eV, shifted to 0 at the largest distance) feed
:func:`diatomic_metrics`, computed on the points with r_min ≤ r ≤ r_max, r_min = 0.5 × covalent radius,
r_max = 6.0 Å, ordered from far to near as MLIP Arena does:

- ``force_flips``: sign changes of F after setting |F| < ``force_tol`` (0.01 eV/Å) to zero and dropping the zeros;
- ``energy_diff_flips``: sign changes of ΔE_i = E_{i+1} − E_i after dropping |ΔE_i| < ``energy_tol`` (1 meV);
- ``tortuosity``: Σ|ΔE_i| / (|E(r_min) − E_min| + |E_min − E(r_max)|) (1 = one smooth well);
- ``energy_jump`` (``force_jump``): over the (thresholded, non-zero) differences ΔE_i (ΔF_i),
  Σ_i |sign ΔE_i − sign ΔE_{i−1}| · (|ΔE_i| + |ΔE_{i−1}|) — protocols.md's formula, so a flip counts
  2(|ΔE_i| + |ΔE_{i−1}|); MLIP Arena's code sums (|ΔE_i| + |ΔE_{i−1}|) once per flip, i.e. half of this
  (``energy_jump_arena``, ``force_jump_arena``; the paper's 0.022 for Geodite-MP is on that scale).
  Only ΔE below ``energy_tol`` are dropped; force differences are not thresholded (as MLIP Arena);
- ``conservation_deviation``: ⟨|F + dE/dr|⟩ with dE/dr from ``numpy.gradient`` of the energy curve;
- Spearman rank correlations (``scipy.stats.spearmanr``) of E with r on the repulsive branch
  (r ≤ r at the energy minimum; −1 ideal) and the attractive branch (r > it; +1 ideal), and of F with r
  below (``descending_force``, −1 ideal) and above (``ascending_force``, +1 ideal) the force minimum.

::

    from geodite_sim.workflows.properties import run_diatomics
    report = run_diatomics(model, elements=["H", "C", "O"], out_dir="diatomics")
    report.means["force_flips"], report.results[0].tortuosity
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from geodite_sim.workflows.properties.common import (
    DONE,
    FAILED,
    as_arrays,
    jsonable,
    matplotlib_pyplot,
    safe_evaluate,
    save_figure,
    write_json,
)

import geodite_sim as gs

#: Metric names, in table order.
METRICS = (
    "force_flips", "energy_diff_flips", "tortuosity", "energy_jump", "force_jump", "conservation_deviation",
    "spearman_repulsion_energy", "spearman_attraction_energy", "spearman_descending_force",
    "spearman_ascending_force", "energy_jump_arena", "force_jump_arena",
)


@dataclass
class DiatomicResult:
    """One element's dimer curve and its smoothness metrics (see the module docstring)."""

    element: str
    Z: int
    status: str = FAILED
    error: str | None = None
    r_A: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: eV; NaN where the model failed at that distance (``n_failed_points``)
    energy_eV: np.ndarray = field(default_factory=lambda: np.zeros(0))
    force_eV_per_A: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_failed_points: int = 0
    r_min_A: float = math.nan
    r_max_A: float = 6.0
    n_points_used: int = 0
    r_energy_min_A: float = math.nan
    energy_min_eV: float = math.nan
    force_flips: float = math.nan
    energy_diff_flips: float = math.nan
    tortuosity: float = math.nan
    energy_jump: float = math.nan
    force_jump: float = math.nan
    energy_jump_arena: float = math.nan
    force_jump_arena: float = math.nan
    conservation_deviation: float = math.nan
    spearman_repulsion_energy: float = math.nan
    spearman_attraction_energy: float = math.nan
    spearman_descending_force: float = math.nan
    spearman_ascending_force: float = math.nan

    def __post_init__(self) -> None:  # the curves as numpy arrays, also when reloaded from JSON lists
        as_arrays(self, ("r_A", "energy_eV", "force_eV_per_A"))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}


@dataclass
class DiatomicsReport:
    """All elements' results, the per-metric means over the successful ones, and written files."""

    results: list[DiatomicResult]
    means: dict[str, float]
    files: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown table: one row per element, then the means."""
        cols = ["element", *METRICS]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.results:
            if r.status != DONE:
                lines.append(f"| {r.element} | failed: {r.error} |" + " |" * (len(cols) - 2))
                continue
            lines.append("| " + " | ".join([r.element] + [_fmt(getattr(r, k)) for k in METRICS]) + " |")
        lines.append("| **mean** | " + " | ".join(_fmt(self.means.get(k, math.nan)) for k in METRICS) + " |")
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _jump(diff: np.ndarray) -> tuple[float, float]:
    """(protocol jump, MLIP Arena jump) of a sequence of non-zero differences."""
    if len(diff) < 2:
        return 0.0, 0.0
    sign = np.sign(diff)
    weight = np.abs(diff[1:]) + np.abs(diff[:-1])
    protocol = float(np.sum(np.abs(sign[1:] - sign[:-1]) * weight))
    flip = sign[1:] != sign[:-1]
    return protocol, float(np.sum(weight[flip]))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(x) < 2 or np.all(y == y[0]):
        return math.nan
    return float(spearmanr(x, y).statistic)


def diatomic_metrics(r: Sequence[float], energy: Sequence[float], force: Sequence[float], r_min: float,
                     r_max: float = 6.0, force_tol: float = 1e-2, energy_tol: float = 1e-3) -> dict[str, float]:
    """Smoothness metrics of one dimer curve (module docstring). ``force`` is the bond force, + = repulsive."""
    r, e, f = (np.asarray(v, dtype=float) for v in (r, energy, force))
    keep = (r >= r_min) & (r <= r_max) & np.isfinite(e) & np.isfinite(f)
    order = np.argsort(r[keep])[::-1]  # far -> near
    r, e, f = r[keep][order], e[keep][order], f[keep][order]
    if len(r) < 3:
        raise ValueError(f"fewer than 3 finite points in [{r_min:.3f}, {r_max:.3f}] Å")
    e = e - e[0]
    imine, iminf = int(np.argmin(e)), int(np.argmin(f))
    de_dr = np.gradient(e, r)

    fs = np.where(np.abs(f) < force_tol, 0.0, f)
    fsign = np.sign(fs)
    fsign = fsign[fsign != 0]
    de = np.diff(e)
    de = de[np.abs(de) >= energy_tol]
    df = np.diff(f)
    df = df[df != 0]
    ejump, ejump_arena = _jump(de)
    fjump, fjump_arena = _jump(df)
    denom = abs(e[-1] - e.min()) + abs(e.min() - e[0])
    return {
        "n_points_used": int(len(r)),
        "r_energy_min_A": float(r[imine]),
        "energy_min_eV": float(e[imine]),
        "force_flips": float(np.sum(fsign[1:] != fsign[:-1])),
        "energy_diff_flips": float(np.sum(np.sign(de[1:]) != np.sign(de[:-1]))),
        "tortuosity": float(np.sum(np.abs(np.diff(e))) / denom) if denom > 0 else math.nan,
        "energy_jump": ejump,
        "force_jump": fjump,
        "energy_jump_arena": ejump_arena,
        "force_jump_arena": fjump_arena,
        "conservation_deviation": float(np.mean(np.abs(f + de_dr))),
        "spearman_repulsion_energy": _spearman(r[imine:], e[imine:]),
        "spearman_attraction_energy": _spearman(r[:imine], e[:imine]),
        "spearman_descending_force": _spearman(r[iminf:], f[iminf:]),
        "spearman_ascending_force": _spearman(r[:iminf], f[:iminf]),
    }


def model_elements(model) -> list[int]:
    """Atomic numbers the model supports: ``model.supported_elements``, else 1..max_z − 1, else 1..94."""
    supported = getattr(model, "supported_elements", None)
    if callable(supported):
        supported = supported()
    if supported is not None:
        return sorted(int(z) for z in supported)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "max_z", None):
        return list(range(1, int(config.max_z)))
    return list(range(1, 95))


def dimer(z: int, r: float, box: float = 30.0) -> Atoms:
    """Two atoms of element ``z`` at distance ``r`` Å along x, centred in a non-periodic ``box`` Å cube."""
    c = box / 2.0
    return Atoms(numbers=[z, z], positions=[[c - r / 2, c, c], [c + r / 2, c, c]], cell=[box] * 3, pbc=False)


def run_diatomics(
    model=None,
    elements: Sequence[int | str] | None = None,
    *,
    n: int = 200,
    r_start: float = 0.01,
    r_stop: float = 6.1,
    r_max: float = 6.0,
    r_min_factor: float = 0.5,
    force_tol: float = 1e-2,
    energy_tol: float = 1e-3,
    out_dir: str | Path | None = None,
    plots: bool = True,
    skip: Sequence[str] = (),
    max_atoms: int | None = None,
    progress: bool = False,
) -> DiatomicsReport:
    """The diatomics suite: every element's ``n`` dimers in one batched evaluation, then the metrics.

    Args:
        model: Geodite (default ``load_model()``) or any model with its call signature.
        elements: symbols or atomic numbers (default :func:`model_elements`).
        n, r_start, r_stop: the distance grid, Å. r_max, r_min_factor: metric window [r_min_factor·r_cov, r_max].
        force_tol (eV/Å), energy_tol (eV): zero thresholds of the flip counts.
        out_dir: write ``<El>.json`` per element, ``diatomics.json`` / ``diatomics.md`` (table + means) and
            ``diatomics.png`` (grid of curves) here. skip: element symbols not to compute (resume).
    Returns:
        A :class:`DiatomicsReport` (results in element order, skipped ones left out).
    """
    from ase.data import atomic_numbers, chemical_symbols, covalent_radii

    from geodite_sim.progress import Progress

    model = model if model is not None else gs.load_model()
    zs = model_elements(model) if elements is None else [
        int(e) if not isinstance(e, str) else atomic_numbers.get(e.strip().capitalize(), -1) for e in elements]
    rs = np.linspace(r_start, r_stop, n)
    results: list[DiatomicResult] = []
    cells, owners, labels = [], [], []
    for k, z in enumerate(zs):
        name = chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z)
        if name in skip:
            continue
        res = DiatomicResult(element=name, Z=int(z), r_max_A=r_max)
        results.append(res)
        if not 0 < z < len(chemical_symbols):
            res.error = f"unknown element {elements[k] if elements is not None else z!r}"
            continue
        res.r_min_A = float(r_min_factor * covalent_radii[z])
        for r in rs:
            cells.append(dimer(z, float(r)))
            owners.append(len(results) - 1)
            labels.append(f"{name}2 at r = {r:.3f} Å")

    out, errors = safe_evaluate(cells, owners, model, compute_stress=False, max_atoms=max_atoms, labels=labels,
                                min_distance_factor=None)
    curves: dict[int, tuple[list, list]] = {}
    for owner, cell, o in zip(owners, cells, out, strict=True):
        e_list, f_list = curves.setdefault(owner, ([], []))
        if o is None:
            e_list.append(math.nan)
            f_list.append(math.nan)
            continue
        bond = cell.positions[1] - cell.positions[0]
        e_list.append(float(o["energy"]))
        f_list.append(float(np.dot(o["forces"][1], bond / np.linalg.norm(bond))))
    bar = Progress(total=len(results), desc="diatomics", unit="element", enabled=progress)
    try:
        for k, res in enumerate(results):
            if res.error is None:
                # a distance the model fails on (e.g. non-finite at 0.01 Å) is a NaN point, not a failed element
                e, f = curves[k]
                res.r_A, res.energy_eV, res.force_eV_per_A = rs.copy(), np.array(e), np.array(f)
                res.n_failed_points = int(sum(not math.isfinite(v) for v in e))
                if res.n_failed_points == len(e):
                    res.error = errors.get(k, "no distance could be evaluated")
            if res.error is None:
                try:
                    for key, v in diatomic_metrics(rs, e, f, res.r_min_A, r_max, force_tol, energy_tol).items():
                        setattr(res, key, v)
                    res.status = DONE
                except Exception as exc:  # noqa: BLE001 - a degenerate curve is this element's error
                    res.error = f"metrics failed: {exc}"
            bar.finish("done" if res.status == DONE else "failed")
    finally:
        bar.close()
    report = DiatomicsReport(results, means(results))
    if out_dir is not None:
        write_report(report, Path(out_dir), plots)
    return report


def means(results: Sequence[DiatomicResult]) -> dict[str, float]:
    """Mean of each metric over the successful results (NaN values left out)."""
    out = {}
    for key in METRICS:
        vals = np.array([getattr(r, key) for r in results if r.status == DONE], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[key] = float(vals.mean()) if len(vals) else math.nan
    out["n_elements"] = float(sum(r.status == DONE for r in results))
    return out


def write_report(report: DiatomicsReport, out: Path, plots: bool = True) -> None:
    """Per-element JSON, the summary JSON and Markdown table, and the grid plot."""
    out.mkdir(parents=True, exist_ok=True)
    for r in report.results:
        write_json(out / f"{r.element}.json", r.to_dict())
    summary = {"means": report.means,
               "elements": [{k: v for k, v in r.to_dict().items() if k not in ("r_A", "energy_eV", "force_eV_per_A")}
                            for r in report.results]}
    write_json(out / "diatomics.json", summary)
    (out / "diatomics.md").write_text(report.table() + "\n")
    report.files.update(json=str(out / "diatomics.json"), table=str(out / "diatomics.md"))
    if plots and any(r.status == DONE for r in report.results):
        report.files["png"] = plot_grid(report.results, out / "diatomics.png")


def plot_grid(results: Sequence[DiatomicResult], path: Path, ncols: int = 8) -> str:
    """A grid of E(r) curves (shifted to 0 at the largest r), one panel per element."""
    plt = matplotlib_pyplot()
    done = [r for r in results if r.status == DONE]
    nrows = max(1, math.ceil(len(done) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.0 * ncols, 1.6 * nrows), squeeze=False)
    for ax in axes.flat[len(done):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, done, strict=False):
        x, e = np.asarray(r.r_A), np.asarray(r.energy_eV)
        e = e - e[-1]
        ax.plot(x, e, lw=1.0)
        ax.axhline(0.0, color="0.7", lw=0.5)
        emin = float(np.nanmin(e[x >= r.r_min_A])) if np.any(x >= r.r_min_A) else -1.0
        ax.set_ylim(min(emin * 1.3, -0.5), max(3.0, -2.0 * emin))
        ax.set_xlim(0.0, x.max())
        ax.text(0.95, 0.9, r.element, transform=ax.transAxes, ha="right", va="top", fontsize=9)
        ax.tick_params(labelsize=6)
    fig.supxlabel("r (Å)")
    fig.supylabel("E − E(r_max) (eV)")
    return save_figure(fig, path, dpi=100)


__all__ = ["DiatomicResult", "DiatomicsReport", "diatomic_metrics", "model_elements", "run_diatomics"]
