"""High-throughput stability screening: relax → energies → (MP2020) → convex hull → metrics.

The workflow behind ``geodite-sim screen`` (see ``docs/screening.md``)::

    from geodite_sim.workflows.stability import screen
    res = screen(["candidates/"], references="mp_entries.json.gz", out="screen_out")
    res.rows[0]["e_above_hull"]

1. **Candidates** (files, directories, multi-frame files, ASE Atoms, pymatgen Structures,
   ``{id: structure}`` mappings or any lazy iterable) get a stable id and are checked
   before any model time is spent on them: unreadable input, elements the model does not
   support and compositions outside the reference chemical space are reported with their
   reason and skipped.
2. The rest are relaxed with :func:`geodite_sim.relax_many` (``stream=True``). Each
   finished relaxation is appended to ``<out>/relaxations.jsonl`` (flushed and fsynced),
   so a killed run resumes where it stopped: re-running the same command skips every
   structure already in the log.
3. **References** are either a file of pymatgen ``ComputedEntry`` /
   ``ComputedStructureEntry`` objects (e.g. an MP export) or *self-consistent*: structures
   of the elements and known compounds relaxed with the same model in the same run.
4. Optionally the Materials Project 2020 compatibility scheme is applied to references
   and candidates (``mp2020``; automatic when the reference entries carry MP-style
   ``parameters``).
5. Per candidate, formation energy and distance to the convex hull come from pymatgen's
   ``PhaseDiagram`` built **from the references only** (one per chemical system,
   ``get_decomp_and_e_above_hull(allow_negative=True)``): candidates never change each
   other's hull distance, and a candidate below the hull gets a negative value.
6. Results go to ``results.csv`` / ``results.json`` (one row per candidate, input order),
   ``references.csv``, ``relaxed.extxyz``, ``hull_<chemsys>.png`` (binary/ternary systems),
   ``run.json`` (settings, warnings, timings) and, when DFT labels are given,
   ``metrics.json`` (precision, recall, F1, accuracy, DAF, MAE/RMSE/R², RMSD).

Metric functions return NaN (``null`` in JSON) where a quantity is undefined (for example
precision when nothing is predicted stable) and list the reason under ``notes``.
"""

from __future__ import annotations

from geodite_sim.workflows.stability.hull import (
    HullResult,
    ReferenceHull,
    _mp2020,
    apply_mp2020,
    chemsys_of,
    entries_are_mp_style,
    hull_distances,
    is_entries_file,
    load_reference_entries,
    mp_style_parameters,
)
from geodite_sim.workflows.stability.inputs import (
    COMPAT_ERROR,
    DUPLICATE,
    HULL_ERROR,
    ID_KEYS,
    INPUT_ERROR,
    JSON_SUFFIXES,
    NOT_CONVERGED,
    OUTSIDE,
    REFERENCE_COLUMNS,
    RELAX_FAILED,
    RESULT_COLUMNS,
    SCREENED,
    STABILITY_THRESHOLD,
    STABLE_TOLERANCE,
    UNSUPPORTED,
    Item,
    ScreenError,
    iter_items,
    model_fingerprint,
    supported_elements,
    unsupported_message,
)
from geodite_sim.workflows.stability.metrics import (
    LABEL_ID_COLUMNS,
    LABEL_VALUE_COLUMNS,
    classification_metrics,
    load_labels,
    load_reference_structures,
    regression_metrics,
    stability_metrics,
    structure_rmsd,
)
from geodite_sim.workflows.stability.pipeline import (
    metrics_stage,
    plot_hulls,
    report_stage,
    screen,
    write_outputs,
)
from geodite_sim.workflows.stability.records import (
    RELAX_LOG,
    RELAXED_STRUCTURES,
    RelaxationRecord,
    ScreenResult,
    open_relax_store,
)
from geodite_sim.workflows.stability.stages import (
    CandidateInputs,
    ReferenceInputs,
    ReferenceSet,
    Relaxations,
    admit_candidates,
    candidate_rows,
    hull_stage,
    model_energy_convention,
    reference_inputs,
    reference_rows,
    reference_stage,
    relax_stage,
)

__all__ = [
    "COMPAT_ERROR",
    "CandidateInputs",
    "DUPLICATE",
    "HULL_ERROR",
    "HullResult",
    "ID_KEYS",
    "INPUT_ERROR",
    "Item",
    "JSON_SUFFIXES",
    "LABEL_ID_COLUMNS",
    "LABEL_VALUE_COLUMNS",
    "NOT_CONVERGED",
    "OUTSIDE",
    "REFERENCE_COLUMNS",
    "RELAXED_STRUCTURES",
    "RELAX_FAILED",
    "RELAX_LOG",
    "RESULT_COLUMNS",
    "ReferenceHull",
    "ReferenceInputs",
    "ReferenceSet",
    "RelaxationRecord",
    "Relaxations",
    "SCREENED",
    "STABILITY_THRESHOLD",
    "STABLE_TOLERANCE",
    "ScreenError",
    "ScreenResult",
    "UNSUPPORTED",
    "_mp2020",
    "admit_candidates",
    "apply_mp2020",
    "candidate_rows",
    "chemsys_of",
    "classification_metrics",
    "entries_are_mp_style",
    "hull_distances",
    "hull_stage",
    "is_entries_file",
    "iter_items",
    "load_labels",
    "load_reference_entries",
    "load_reference_structures",
    "metrics_stage",
    "model_energy_convention",
    "model_fingerprint",
    "mp_style_parameters",
    "open_relax_store",
    "plot_hulls",
    "reference_inputs",
    "reference_rows",
    "reference_stage",
    "regression_metrics",
    "relax_stage",
    "report_stage",
    "screen",
    "stability_metrics",
    "structure_rmsd",
    "supported_elements",
    "unsupported_message",
    "write_outputs",
]
