"""Screening stage 3 and the whole screen: metrics, report, outputs and hull plots; ``screen`` chains the stages."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from geodite_sim.workflows.stability.hull import ReferenceHull
from geodite_sim.workflows.stability.inputs import (
    REFERENCE_COLUMNS,
    RESULT_COLUMNS,
    SCREENED,
    STABILITY_THRESHOLD,
    STABLE_TOLERANCE,
    _exc_text,
    supported_elements,
)
from geodite_sim.workflows.stability.known_phases import convergence_tolerance, match_known_phases
from geodite_sim.workflows.stability.metrics import (
    _nan_to_none,
    load_labels,
    load_reference_structures,
    stability_metrics,
)
from geodite_sim.workflows.stability.records import ScreenResult, _csv_text, _settings, _write_atomic, open_relax_store
from geodite_sim.workflows.stability.stages import (
    CandidateInputs,
    admit_candidates,
    candidate_rows,
    hull_stage,
    model_energy_convention,
    reference_inputs,
    reference_rows,
    reference_stage,
    relax_stage,
)

import geodite_sim


# ------------------------------------------------------------------------------- stage 3: metrics and report
def metrics_stage(rows: list[dict], labels: Any, dft_structures: Any, threshold: float, tolerance: float,
                  relaxed_atoms: Mapping[str, Atoms], warn: list[str]) -> dict | None:
    """DFT labels onto the rows (``e_above_hull_dft``, ``stable_dft``) and :func:`stability_metrics`."""
    if labels is None:
        if dft_structures is not None:
            warn.append("dft_structures given without labels: RMSD is computed only together with labels")
        return None
    label_map = load_labels(labels) if isinstance(labels, (str, os.PathLike)) else dict(labels)
    ref_structs = None
    if dft_structures is not None:
        ref_structs = (load_reference_structures(dft_structures)
                       if isinstance(dft_structures, (str, os.PathLike)) else dict(dft_structures))
    for row in rows:
        v = label_map.get(row["id"])
        if v is not None and math.isfinite(float(v)):
            row["e_above_hull_dft"] = float(v)
            row["stable_dft"] = bool(float(v) <= threshold + tolerance)
    return stability_metrics(rows, label_map, threshold, relaxed_atoms, ref_structs, tolerance=tolerance)


def report_stage(result: ScreenResult, relaxed_atoms: Mapping[str, Atoms], plots: bool, max_plots: int,
                 hull: ReferenceHull) -> None:
    """Hull plots, results.csv/json, references.csv, relaxed.extxyz, metrics.json and run.json under ``out``."""
    t0 = time.perf_counter()
    if result.out is not None and plots:
        result.plots = plot_hulls(hull, result.rows, result.out, max_plots=max_plots, warn=result.warnings)
    result.timings["plot_s"] = time.perf_counter() - t0
    if result.out is None:
        return
    write_outputs(result, relaxed_atoms)
    _write_atomic(result.out / "run.json", json.dumps(_nan_to_none(
        {"settings": result.settings, "timings": result.timings, "warnings": result.warnings,
         "plots": result.plots}), indent=2))


def screen(
    candidates: Any,
    references: Any,
    out: str | os.PathLike | None = None,
    model: Any = None,
    *,
    fmax: float = 0.05,
    max_steps: int = 500,
    relax_cell: bool = True,
    optimizer: str = "fire",
    threshold: float = STABILITY_THRESHOLD,
    stable_tolerance: float | None = STABLE_TOLERANCE,
    mp2020: bool | None = None,
    labels: str | os.PathLike | Mapping[str, float] | None = None,
    dft_structures: str | os.PathLike | Mapping[str, Any] | None = None,
    require_converged: bool = False,
    plots: bool = True,
    max_plots: int = 50,
    restart: bool = False,
    progress: bool = True,
    relax_kwargs: Mapping[str, Any] | None = None,
    relax_fn: Callable[..., Iterable] | None = None,
    executor: Any = None,
) -> ScreenResult:
    """Screen candidates for thermodynamic stability against a convex hull of references.

    Stages: admission (:func:`reference_inputs`, :func:`admit_candidates`) -> :func:`relax_stage` (over the
    result store in ``out``) -> :func:`reference_stage` -> :func:`candidate_rows` + :func:`hull_stage` ->
    :func:`metrics_stage` -> :func:`report_stage`.

    Args:
        candidates: structures to screen (see :func:`iter_items`): paths, directories,
            multi-frame files, Atoms, Structures, ``{id: structure}``, lazy iterables.
        references: a monty JSON file (or list) of pymatgen entries, e.g. an MP export, or
            structures of the elements and known phases to relax with ``model``
            (self-consistent references; same input forms as ``candidates``).
        out: output directory (results, plots, result store); None keeps everything in memory.
        model: a loaded model (default ``geodite_sim.load_model()``).
        fmax, max_steps, relax_cell: relaxation settings (:func:`geodite_sim.relax_many`);
            the same for candidates and self-consistent references.
        optimizer: ``"fire"`` (default), ``"lbfgs"`` or ``"bfgs"`` (``relax_many``'s; docs/optimizers.md).
        threshold: stable <=> E_above_hull <= threshold + stable_tolerance (eV/atom).
        stable_tolerance: eV/atom added to the threshold so that relaxation noise of a candidate sitting on the
            hull cannot decide its call; None (default) ties it to ``fmax``:
            :func:`~geodite_sim.workflows.stability.known_phases.convergence_tolerance` (1.25 meV/atom at fmax 0.05).
            Recorded in ``run.json``. A candidate whose relaxed structure matches a reference structure
            (``StructureMatcher``) is placed on that reference (``matches_reference``; docs/screening.md).
        mp2020: apply MP2020 corrections; None = only when every reference entry carries
            MP-style ``parameters`` (``run_type``/``hubbards``).
        labels: DFT E_above_hull per candidate id (file for :func:`load_labels` or mapping).
        dft_structures: DFT-relaxed structures per candidate id, for the RMSD.
        require_converged: report candidates whose relaxation hit ``max_steps`` as
            ``not_converged`` instead of screening their last energy (the default screens
            them and flags ``converged = False``, as Matbench Discovery does).
        plots: write ``hull_<chemsys>.png`` for binary/ternary systems (at most ``max_plots``).
        restart: discard the result store in ``out`` and relax everything again.
        relax_kwargs: extra keyword arguments of ``relax_many`` (``max_atoms``, ...).
        relax_fn: replaces ``relax_many`` (same signature; for tests and other engines).
        executor: where the relaxations run (:mod:`geodite_sim.executors`; default this process).
    """
    t_start = time.perf_counter()
    if stable_tolerance is None:
        stable_tolerance = convergence_tolerance(fmax)
    relax_kwargs = dict(relax_kwargs or {})
    if optimizer != "fire":  # a relax_many option (so in the resume settings); FIRE's settings stay as before
        if relax_kwargs.setdefault("optimizer", optimizer) != optimizer:
            raise ValueError(f"optimizer={optimizer!r} but relax_kwargs has optimizer={relax_kwargs['optimizer']!r}")
    if relax_fn is None:
        relax_fn = executor.relax_many if executor is not None else geodite_sim.relax_many
    if model is None:
        model = geodite_sim.load_model()
    warn: list[str] = []
    out_dir = Path(out) if out is not None else None
    settings = _settings(model, fmax, max_steps, relax_cell, relax_kwargs)
    store = open_relax_store(out_dir, settings, model, restart) if out_dir is not None else None
    allowed = supported_elements(model)
    try:
        refs = reference_inputs(references, allowed)
        cands = CandidateInputs()
        jobs = itertools.chain((("reference", it) for it in refs.items if it.atoms is not None),
                               (("candidate", it) for it in admit_candidates(candidates, allowed, refs.elements,
                                                                             cands)))
        relaxed = relax_stage(jobs, store, relax_fn, {"model": model, "fmax": fmax, "max_steps": max_steps,
                                                      "relax_cell": relax_cell, "progress": progress,
                                                      **relax_kwargs})
    finally:
        if store is not None:
            store.close()
    t0 = time.perf_counter()
    refset = reference_stage(refs, relaxed, cands, mp2020, settings["model"], warn, model_energy_convention(model))
    rows = candidate_rows(cands, relaxed, require_converged)
    relaxed_atoms = hull_stage(rows, cands, relaxed, refset, threshold, stable_tolerance, settings["model"])
    n_matched = match_known_phases(rows, relaxed_atoms, refset, threshold, stable_tolerance)
    ref_rows = reference_rows(refset, stable_tolerance)
    t_hull = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = metrics_stage(rows, labels, dft_structures, threshold, stable_tolerance, relaxed_atoms, warn)
    t_metrics = time.perf_counter() - t0
    n, t_relax = relaxed.n_relaxed, relaxed.seconds
    timings = {
        "relax_s": t_relax, "hull_s": t_hull, "metrics_s": t_metrics, "plot_s": 0.0,
        "n_relaxed_this_run": n, "n_resumed": relaxed.n_resumed,
        "relaxations_per_hour": (n / t_relax * 3600.0) if t_relax > 0 and n else math.nan,
        # end to end (reading, relaxing references and candidates, hull): meaningful for a fresh run
        "candidates_per_hour": (len(rows) / (time.perf_counter() - t_start) * 3600.0)
        if not relaxed.n_resumed else math.nan,
    }
    settings = {**settings, "threshold": threshold, "stable_tolerance": stable_tolerance, "mp2020": refset.mp2020,
                "mp2020_reason": refset.mp2020_reason, "reference_mode": refs.mode,
                "require_converged": require_converged, "n_references": len(refset.entries),
                "n_candidates": len(rows), "n_screened": sum(r["status"] == SCREENED for r in rows),
                "n_stable": sum(bool(r.get("stable")) for r in rows if r["status"] == SCREENED),
                "n_matching_references": n_matched,
                "executor": executor.describe() if executor is not None else "local (one process)"}
    result = ScreenResult(rows=rows, references=ref_rows, metrics=metrics, settings=settings, timings=timings,
                          warnings=warn, out=out_dir)
    result.timings["total_s"] = time.perf_counter() - t_start
    report_stage(result, relaxed_atoms, plots, max_plots, refset.hull)
    result.timings["total_s"] = time.perf_counter() - t_start
    return result


def write_outputs(result: ScreenResult, relaxed_atoms: Mapping[str, Atoms]) -> None:
    """results.csv/json, references.csv, relaxed.extxyz and metrics.json under ``result.out``."""
    out = result.out
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.csv", _csv_text(result.rows, RESULT_COLUMNS))
    _write_atomic(out / "results.json", json.dumps(_nan_to_none(
        [{k: r.get(k) for k in RESULT_COLUMNS if k in r or not k.endswith("_dft")} for r in result.rows]), indent=1))
    _write_atomic(out / "references.csv", _csv_text(result.references, REFERENCE_COLUMNS))
    if result.metrics is not None:
        _write_atomic(out / "metrics.json", json.dumps(_nan_to_none(result.metrics), indent=2))
    frames = []
    for r in result.rows:
        a = relaxed_atoms.get(r["id"])
        if a is None:
            continue
        a = a.copy()
        a.info = {"id": r["id"], "energy_per_atom": r.get("energy_per_atom"), "e_above_hull": r.get("e_above_hull")}
        a.info = {k: v for k, v in a.info.items() if v is not None}
        frames.append(a)
    if frames:
        import ase.io

        buf = io.StringIO()
        ase.io.write(buf, frames, format="extxyz")
        _write_atomic(out / "relaxed.extxyz", buf.getvalue())


# =============================================================================== plots
def plot_hulls(hull: ReferenceHull, rows: Sequence[Mapping], out_dir: str | os.PathLike,
               max_plots: int = 50, warn: list[str] | None = None) -> list[str]:
    """One ``hull_<chemsys>.png`` per binary/ternary chemical system of the screened candidates.

    pymatgen's ``PDPlotter`` (matplotlib backend) draws the reference hull; the candidates are
    overlaid at their composition (binary: formation energy vs fraction; ternary: Gibbs
    triangle), green if predicted stable, red otherwise.
    """
    out_dir = Path(out_dir)
    mpl_log = logging.getLogger("matplotlib")
    level = mpl_log.level
    mpl_log.setLevel(logging.ERROR)  # "Ignoring fixed y limits..." from PDPlotter's equal-aspect ternary axes
    try:
        return _plot_hulls(hull, rows, out_dir, max_plots, warn)
    finally:
        mpl_log.setLevel(level)


def _plot_hulls(hull: ReferenceHull, rows: Sequence[Mapping], out_dir: Path, max_plots: int,
                warn: list[str] | None) -> list[str]:
    import matplotlib.pyplot as plt
    from pymatgen.analysis.phase_diagram import PDPlotter, triangular_coord
    from pymatgen.core import Composition

    by_sys: dict[str, list[Mapping]] = {}
    for r in rows:
        if r.get("status") == SCREENED and r.get("chemsys") and 2 <= len(r["chemsys"].split("-")) <= 3:
            by_sys.setdefault(r["chemsys"], []).append(r)
    paths: list[str] = []
    for k, (cs, members) in enumerate(sorted(by_sys.items())):
        if k >= max_plots:
            if warn is not None:
                warn.append(f"only the first {max_plots} of {len(by_sys)} hull plots were drawn")
            break
        try:
            pd = hull.phase_diagram(cs)
            fig, ax = plt.subplots(figsize=(8, 6))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                PDPlotter(pd, show_unstable=0.2, backend="matplotlib").get_plot(ax=ax)
            els = pd.elements
            ys = []
            for r in members:
                comp = Composition(r["reduced_formula"])
                x = np.array([comp.get_atomic_fraction(el) for el in els[1:]])
                stable = bool(r.get("stable"))
                style = {"marker": "*" if stable else "x", "color": "tab:green" if stable else "tab:red",
                         "s": 160 if stable else 80, "zorder": 5}
                if len(els) == 2:
                    xy = (x[0], r["e_form_per_atom"])
                    ys.append(r["e_form_per_atom"])
                else:
                    xy = tuple(triangular_coord(x))
                ax.scatter([xy[0]], [xy[1]], **style)
                ax.annotate(f"{r['id']} ({r['e_above_hull']:+.3f})", xy, fontsize=7,
                            xytext=(4, -10), textcoords="offset points", color=style["color"])
            if len(els) == 2 and ys:
                lo, hi = ax.get_ylim()
                lo, hi = min(lo, min(ys) - 0.05), max(hi, max(ys) + 0.05)
                ax.set_ylim(lo, hi)
                ax.set_xlabel(f"fraction {els[1].symbol}", fontsize=12)
                ax.set_ylabel("formation energy (eV/atom)", fontsize=12)
            ax.set_title(f"{cs}: reference hull + {len(members)} candidate(s) "
                         f"(green = predicted stable; label: E_above_hull eV/atom)", fontsize=10)
            path = out_dir / f"hull_{cs}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            paths.append(str(path))
        except Exception as exc:  # a plot must never sink the screen
            if warn is not None:
                warn.append(f"hull plot for {cs} failed: {_exc_text(exc)}")
        finally:
            plt.close("all")
    return paths

