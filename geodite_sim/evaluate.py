"""Single-point evaluation of many structures, batched internally, one result per input."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from geodite_sim.batch import Batch
from geodite_sim.io.admission import model_elements
from geodite_sim.io.structures import InputItem, StructureError, iter_inputs
from geodite_sim.model import load_model
from geodite_sim.model.torchsim_adapter import as_engine_model
from geodite_sim.progress import Progress
from geodite_sim.runner.capacity import PROBE_STRUCTURES, estimate_capacity
from geodite_sim.status import Status
from geodite_sim.threads import check_threads, thread_limit

log = logging.getLogger(__name__)


def _chunks(atoms_list: list, max_atoms: int) -> Iterable[list[int]]:
    """Group structure indices so each group holds at most ``max_atoms`` atoms (one structure minimum)."""
    group: list[int] = []
    total = 0
    for i, a in enumerate(atoms_list):
        if group and total + len(a) > max_atoms:
            yield group
            group, total = [], 0
        group.append(i)
        total += len(a)
    if group:
        yield group


def _failure(item: InputItem, status: Status, error: str, compute_stress: bool, per_atom: bool) -> dict[str, Any]:
    r: dict[str, Any] = {"index": item.index, "label": item.label, "status": status, "error": error,
                         "energy": float("nan"), "forces": None}
    if compute_stress:
        r["stress"] = None
    if per_atom:
        r["energies"] = None
    return r


def _run_group(model, items: list[InputItem], compute_stress: bool, per_atom: bool) -> list[dict[str, Any]]:
    """Evaluate ``items`` in one batch; raises what the model raises."""
    batch = Batch.from_atoms([it.atoms for it in items], dtype=model.dtype, device=model.device)
    out = model(batch, compute_stress=compute_stress, per_atom_energies=per_atom) if per_atom else \
        model(batch, compute_stress=compute_stress)
    energy = out["energy"].detach().double().cpu().numpy()
    forces = out["forces"].detach().double().cpu().numpy()
    stress = out["stress"].detach().double().cpu().numpy() if compute_stress else None
    energies = out["energies"].detach().double().cpu().numpy() if per_atom else None
    offsets = np.cumsum([0] + [len(it.atoms) for it in items])  # type: ignore[arg-type, var-annotated]
    results = []
    for k, it in enumerate(items):
        a, b = offsets[k], offsets[k + 1]
        r: dict[str, Any] = {"index": it.index, "label": it.label, "status": Status.DONE, "error": None,
                             "energy": float(energy[k]), "forces": forces[a:b]}
        if compute_stress:
            r["stress"] = stress[k]  # type: ignore[index]
        if per_atom:
            r["energies"] = energies[a:b]  # type: ignore[index]
        bad = [name for name in ("energy", "forces", "stress", "energies")
               if r.get(name) is not None and not np.isfinite(r[name]).all()]
        if bad:
            r.update(status=Status.NON_FINITE, error=f"{it.label}: the model returned non-finite {', '.join(bad)}")
        results.append(r)
    return results


def evaluate(
    structures: Any,
    model: Any = None,
    max_atoms: int | None = None,
    compute_stress: bool = True,
    per_atom_energies: bool = False,
    *,
    on_error: str = "record",
    min_distance_factor: float | None = 0.5,
    allow_unsupported_elements: bool = False,
    threads: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Energy, forces and stress of each structure (ASE units and sign conventions).

    Args:
        structures: ASE Atoms, pymatgen Structures/Molecules or file paths (or one of them), or any
            iterable of them.
        model: a loaded Geodite or any model with the same call (default: ``load_model()``).
        max_atoms: atoms per internal batch (a larger structure runs alone). Default: the engine's one capacity
            policy (:func:`geodite_sim.runner.capacity.estimate_capacity`, probed with the first structures).
        on_error: ``"record"`` (default): a bad input (see :func:`geodite_sim.io.admission.admit`) or a
            system the model raises on / returns non-finite numbers for gets its own failed result
            and the others are evaluated unchanged; ``"raise"``: raise :class:`StructureError`
            naming the first invalid input (before evaluating anything), and let model errors propagate.
        min_distance_factor: admission rejects atoms closer than this x their covalent-radius sum
            (None: no check).
        allow_unsupported_elements: evaluate elements outside the model's ``supported_elements``
            (with a logged warning) instead of rejecting them.
        threads: CPU threads of this call (None: torch's setting, i.e. ``OMP_NUM_THREADS`` or one per core;
            :mod:`geodite_sim.threads`; warns once when the machine is oversubscribed).
        progress: show a progress bar (structures done of all, rate, ETA) on stderr.
    Returns:
        One dict per input, in input order: ``index``, ``label`` (file path or ``"index:formula"``),
        ``status`` (:class:`~geodite_sim.status.Status`: ``DONE`` or why it failed), ``error`` (None,
        or a message naming the problem and the input), ``energy`` (float, eV; NaN on failure),
        ``forces`` (N, 3) eV/Å, ``stress`` (3, 3) eV/Å^3 (zeros unless fully periodic), and
        ``energies`` (N,) per-atom eV when requested (None on failure).
    """
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    threads = check_threads(threads)
    model = as_engine_model(model) if model is not None else load_model()
    allowed, name = model_elements(model)
    items = list(iter_inputs(structures, supported_elements=allowed, model_name=name,
                             allow_unsupported_elements=allow_unsupported_elements,
                             min_distance_factor=min_distance_factor))
    for it in items:
        for w in it.warnings:
            log.warning(w)
    if on_error == "raise":
        bad = next((it for it in items if it.atoms is None), None)
        if bad is not None:
            raise StructureError(bad.error or f"structure {bad.index}: invalid", bad.status or Status.INVALID_STRUCTURE)
    results: list[dict[str, Any] | None] = [None] * len(items)
    good = [it for it in items if it.atoms is not None]
    for it in items:
        if it.atoms is None:
            results[it.index] = _failure(it, it.status or Status.INVALID_STRUCTURE, it.error or "", compute_stress,
                                         per_atom_energies)
    if max_atoms is None and good:
        admitted = [it.atoms for it in good if it.atoms is not None]
        max_atoms = estimate_capacity(model, probe=admitted[:PROBE_STRUCTURES],
                                      total_atoms=sum(len(a) for a in admitted)).max_atoms
    with thread_limit(threads), Progress(total=len(items), desc="evaluate", unit="structure", enabled=progress,
                                         outcomes=("done", "failed")) as bar:
        bar.finish("failed", len(items) - len(good))
        for group in _chunks([it.atoms for it in good], max_atoms or 1):
            members = [good[i] for i in group]
            try:
                outs = _run_group(model, members, compute_stress, per_atom_energies)
            except Exception:
                if on_error == "raise":
                    raise
                outs = []
                for it in members:  # isolate the system the model raises on
                    try:
                        outs.extend(_run_group(model, [it], compute_stress, per_atom_energies))
                    except Exception as exc:  # noqa: BLE001 - recorded in this input's result
                        outs.append(_failure(it, Status.MODEL_ERROR,
                                             f"{it.label}: the model raised {type(exc).__name__}: {exc}",
                                             compute_stress, per_atom_energies))
            for r in outs:
                results[r["index"]] = r
                bar.finish("done" if r["error"] is None else "failed")
    return results  # type: ignore[return-value]


def stress_to_voigt(stress: np.ndarray) -> np.ndarray:
    """3x3 -> ASE Voigt order (xx, yy, zz, yz, xz, xy)."""
    s = np.asarray(stress)
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


__all__ = ["evaluate", "stress_to_voigt"]

