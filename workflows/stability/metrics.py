"""Screening metrics against DFT labels: classification (precision, recall, F1, DAF), regression, structure RMSD."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from geodite_sim.workflows.stability.inputs import JSON_SUFFIXES, STABILITY_THRESHOLD, ScreenError, iter_items


# =============================================================================== metrics
def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating,)):
        return _nan_to_none(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def _pairs(true: Sequence[float], pred: Sequence[float]) -> tuple[np.ndarray, np.ndarray, int]:
    t = np.asarray(true, dtype=float).ravel()
    p = np.asarray(pred, dtype=float).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true and predicted values differ in length ({t.size} vs {p.size})")
    ok = np.isfinite(t) & np.isfinite(p)
    return t[ok], p[ok], int((~ok).sum())


def classification_metrics(
    e_above_hull_true: Sequence[float],
    e_above_hull_pred: Sequence[float],
    threshold: float = STABILITY_THRESHOLD,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """Stability classification metrics (Matbench Discovery conventions).

    Stable <=> E_above_hull <= ``threshold + tolerance`` for both DFT (true) and model (predicted).
    Pairs where either value is NaN are dropped (counted in ``n_dropped``).
    Returns counts ``tp, fp, tn, fn, n``, ``precision = tp/(tp+fp)``, ``recall = tp/(tp+fn)``,
    ``f1`` (harmonic mean; 0 when precision = recall = 0), ``accuracy = (tp+tn)/n``,
    ``prevalence = (tp+fn)/n`` (fraction of truly stable materials) and
    ``daf = precision / prevalence`` (discovery acceleration factor). A ratio whose
    denominator is 0 is NaN, never a silent 0, and ``notes`` says which and why.
    """
    t, p, dropped = _pairs(e_above_hull_true, e_above_hull_pred)
    true_pos, pred_pos = t <= threshold + tolerance, p <= threshold + tolerance
    tp = int(np.sum(true_pos & pred_pos))
    fp = int(np.sum(~true_pos & pred_pos))
    tn = int(np.sum(~true_pos & ~pred_pos))
    fn = int(np.sum(true_pos & ~pred_pos))
    n = tp + fp + tn + fn
    notes: list[str] = []
    nan = math.nan
    if n == 0:
        notes.append("no candidate with both a DFT label and a prediction: every metric is undefined")
    precision = tp / (tp + fp) if tp + fp else nan
    if n and tp + fp == 0:
        notes.append("precision undefined (NaN): no candidate is predicted stable")
    recall = tp / (tp + fn) if tp + fn else nan
    if n and tp + fn == 0:
        notes.append("recall undefined (NaN): no stable material in the labelled set")
    if math.isnan(precision) or math.isnan(recall):
        f1 = nan
        if n:
            notes.append("F1 undefined (NaN): precision or recall undefined")
    elif precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    accuracy = (tp + tn) / n if n else nan
    prevalence = (tp + fn) / n if n else nan
    if n and prevalence == 0:
        daf = nan
        notes.append("DAF undefined (NaN): prevalence of stable materials is 0")
    elif math.isnan(precision) or math.isnan(prevalence):
        daf = nan
        if n:
            notes.append("DAF undefined (NaN): precision undefined")
    else:
        daf = precision / prevalence
    return {
        "threshold": threshold, "tolerance": tolerance, "n": n, "n_dropped": dropped,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy,
        "prevalence": prevalence, "daf": daf, "notes": notes,
    }


def regression_metrics(true: Sequence[float], pred: Sequence[float]) -> dict[str, Any]:
    """MAE, RMSE and R² (= 1 - SS_res/SS_tot) of predicted vs true values; NaN pairs dropped.

    R² is NaN when fewer than two values or when the true values are all equal (SS_tot = 0).
    """
    t, p, dropped = _pairs(true, pred)
    notes: list[str] = []
    n = int(t.size)
    if n == 0:
        notes.append("no pairs: MAE/RMSE/R² undefined")
        return {"n": 0, "n_dropped": dropped, "mae": math.nan, "rmse": math.nan, "r2": math.nan, "notes": notes}
    err = p - t
    mae = float(np.mean(np.abs(err)))
    rmse = float(np.sqrt(np.mean(err**2)))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    if n < 2 or ss_tot == 0:
        r2 = math.nan
        notes.append("R² undefined (NaN): the true values have zero variance")
    else:
        r2 = 1.0 - float(np.sum(err**2)) / ss_tot
    return {"n": n, "n_dropped": dropped, "mae": mae, "rmse": rmse, "r2": r2, "notes": notes}


def structure_rmsd(pairs: Mapping[str, tuple[Any, Any]], matcher: Any = None) -> dict[str, Any]:
    """RMSD between relaxed and reference structures with pymatgen's ``StructureMatcher.get_rms_dist``.

    ``pairs``: ``{id: (predicted, reference)}`` (pymatgen Structures or ASE Atoms). The RMS
    displacement is normalised by ``(V/N)^(1/3)`` (pymatgen's convention); pairs the matcher
    cannot map onto each other are counted in ``n_unmatched`` and left out of the mean.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    matcher = matcher or StructureMatcher()
    per_id: dict[str, float] = {}
    unmatched: list[str] = []
    for key, (pred, ref) in pairs.items():
        pred = AseAtomsAdaptor.get_structure(pred) if isinstance(pred, Atoms) else pred
        ref = AseAtomsAdaptor.get_structure(ref) if isinstance(ref, Atoms) else ref
        try:
            out = matcher.get_rms_dist(pred, ref)
        except Exception:
            out = None
        if out is None:
            unmatched.append(key)
            per_id[key] = math.nan
        else:
            per_id[key] = float(out[0])
    vals = [v for v in per_id.values() if math.isfinite(v)]
    notes = [] if vals else ["RMSD undefined (NaN): no structure pair matched"]
    return {
        "n": len(pairs), "n_matched": len(vals), "n_unmatched": len(unmatched),
        "rmsd": float(np.mean(vals)) if vals else math.nan, "unmatched": unmatched,
        "per_id": per_id, "notes": notes,
    }


LABEL_ID_COLUMNS = ("id", "material_id", "candidate_id", "candidate", "name", "entry_id")
LABEL_VALUE_COLUMNS = ("e_above_hull", "e_above_hull_dft", "e_hull", "energy_above_hull",
                       "e_above_hull_mp2020_corrected_ppd_mp", "e_above_hull_dft_mp2020")


def load_labels(path: str | os.PathLike) -> dict[str, float]:
    """DFT E_above_hull labels (eV/atom): CSV with an id and an E_above_hull column, or JSON.

    CSV id columns: ``id``, ``material_id``, ``candidate_id``, ``candidate``, ``name``,
    ``entry_id``; value columns: ``e_above_hull``, ``e_above_hull_dft``, ``e_hull``,
    ``energy_above_hull`` or Matbench Discovery's ``e_above_hull_mp2020_corrected_ppd_mp``
    (a two-column CSV is read as id, value). JSON: ``{id: value}``, ``{id: {"e_above_hull": v}}``
    or a list of records with those columns.
    """
    path = Path(path)

    def pick(record: Mapping, names: Sequence[str]) -> Any:
        lower = {str(k).strip().lower(): v for k, v in record.items()}
        for n in names:
            if n in lower:
                return lower[n]
        return None

    out: dict[str, float] = {}
    if path.name.lower().endswith(JSON_SUFFIXES):
        from monty.serialization import loadfn

        data = loadfn(str(path))
        if isinstance(data, Mapping):
            for k, v in data.items():
                out[str(k)] = float(pick(v, LABEL_VALUE_COLUMNS) if isinstance(v, Mapping) else v)
        else:
            for rec in data:
                out[str(pick(rec, LABEL_ID_COLUMNS))] = float(pick(rec, LABEL_VALUE_COLUMNS))
        return out
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        id_col = next((c for c in LABEL_ID_COLUMNS if c in cols), None)
        val_col = next((c for c in LABEL_VALUE_COLUMNS if c in cols), None)
        if (id_col is None or val_col is None) and len(cols) == 2:
            id_col, val_col = cols
        if id_col is None or val_col is None:
            raise ScreenError(f"{path}: need an id column ({', '.join(LABEL_ID_COLUMNS)}) and an E_above_hull "
                              f"column ({', '.join(LABEL_VALUE_COLUMNS)}); found {cols}")
        for rec in reader:
            rec = {str(k).strip().lower(): v for k, v in rec.items()}
            v = rec.get(val_col)
            out[str(rec[id_col]).strip()] = float(v) if v not in (None, "") else math.nan
    return out


def load_reference_structures(path: str | os.PathLike) -> dict[str, Any]:
    """DFT-relaxed structures by candidate id: a directory (``<id>.<ext>``), a monty JSON
    (``{id: Structure}``, list of ComputedStructureEntry) or a multi-frame file with ``id`` in
    each frame's info."""
    return {item.id: item.atoms for item in iter_items(path) if item.atoms is not None}


def stability_metrics(
    rows: Sequence[Mapping[str, Any]],
    labels: Mapping[str, float],
    threshold: float = STABILITY_THRESHOLD,
    relaxed: Mapping[str, Any] | None = None,
    reference_structures: Mapping[str, Any] | None = None,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """All metrics of a screen against DFT labels (rows as in ``results.json``); stable <=> E_above_hull <=
    ``threshold + tolerance``.

    Candidates with a label but no prediction (any error) are left out of the metrics and
    counted in ``n_missing_prediction`` (listed in ``missing_prediction``); labels of ids
    that are not candidates are counted in ``n_unused_labels``.
    """
    ids = [r["id"] for r in rows]
    pred = {r["id"]: r.get("e_above_hull") for r in rows}
    labelled = [i for i in ids if i in labels and labels[i] is not None and math.isfinite(float(labels[i]))]
    have = [i for i in labelled if pred.get(i) is not None and math.isfinite(float(pred[i]))]
    missing = [i for i in labelled if i not in have]
    t = [float(labels[i]) for i in have]
    p = [float(pred[i]) for i in have]
    out: dict[str, Any] = {
        "threshold": threshold,
        "tolerance": tolerance,
        "n_candidates": len(ids),
        "n_labelled": len(labelled),
        "n_evaluated": len(have),
        "n_missing_prediction": len(missing),
        "missing_prediction": missing,
        "n_unused_labels": len(set(labels) - set(ids)),
        "classification": classification_metrics(t, p, threshold, tolerance),
        "e_above_hull": regression_metrics(t, p),
    }
    if reference_structures:
        relaxed = relaxed or {}
        pairs = {i: (relaxed[i], reference_structures[i]) for i in ids if i in relaxed and i in reference_structures}
        out["structure"] = structure_rmsd(pairs)
    c, r = out["classification"], out["e_above_hull"]
    out["summary"] = {
        "precision": c["precision"], "recall": c["recall"], "f1": c["f1"], "accuracy": c["accuracy"],
        "daf": c["daf"], "prevalence": c["prevalence"], "mae": r["mae"], "rmse": r["rmse"], "r2": r["r2"],
        "rmsd": out["structure"]["rmsd"] if "structure" in out else math.nan,
    }
    return out


# =============================================================================== relaxation records
