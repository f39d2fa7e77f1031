"""Shared stages of the property workflows: input admission, the batched relaxation, robust evaluation, files.

Every workflow follows the same error contract: each input gets exactly one result record; an input
that cannot be read or whose relaxation fails gets ``status="failed"`` and an ``error`` message, and
the others finish unchanged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ase import Atoms

import geodite_sim as gs

#: eV/Å³ -> GPa.
EV_PER_A3_TO_GPA = 160.21766208

DONE = "done"
FAILED = "failed"


@dataclass
class Material:
    """One admitted input: position, label, the working structure (None once it failed) and why it failed."""

    index: int
    label: str
    atoms: Atoms | None
    error: str | None = None
    relax_converged: bool | None = None
    relax_steps: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.atoms is not None

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message


@dataclass
class PropertyRecord:
    """Fields every property result carries; subclasses add theirs. ``to_dict`` is JSON-ready."""

    index: int
    label: str
    formula: str = ""
    n_atoms: int = 0
    status: str = FAILED
    error: str | None = None
    relax_converged: bool | None = None
    relax_steps: int = 0

    #: fields left out of ``to_dict`` (live objects)
    _skip_json: ClassVar[tuple[str, ...]] = ("structure", "phonopy")
    #: fields held as float numpy arrays (given as lists, e.g. reloaded from JSON, they are converted)
    _arrays: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        as_arrays(self, self._arrays)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            if f.name.startswith("_") or f.name in self._skip_json:
                continue
            out[f.name] = jsonable(getattr(self, f.name))
        return out

    @property
    def failed(self) -> bool:
        return self.error is not None


def as_arrays(record: Any, names: Sequence[str]) -> None:
    """Turn the fields ``names`` of ``record`` into float numpy arrays (None stays None; JSON nulls become NaN)."""
    for name in names:
        value = getattr(record, name)
        if value is not None and not isinstance(value, np.ndarray):
            setattr(record, name, np.array(value, dtype=float))


def jsonable(value: Any) -> Any:
    """numpy/NaN-safe conversion for JSON (NaN and Inf become None)."""
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if hasattr(value, "__dataclass_fields__"):
        return jsonable(asdict(value))
    return value


def admit(structures: Any, labels: Sequence[str] | None = None) -> list[Material]:
    """Read and validate every input (lazily converted); unreadable/invalid ones are recorded as failed."""
    from geodite_sim.io.structures import iter_inputs

    materials = []
    for item in iter_inputs(structures):
        label = labels[item.index] if labels is not None else item.label
        m = Material(item.index, label, item.atoms.copy() if item.atoms is not None else None)
        if item.error is not None or item.atoms is None:
            m.fail(item.error or "could not read the structure")
        materials.append(m)
    return materials


def relax_stage(materials: list[Material], model, *, fmax: float, max_steps: int, relax_cell: bool = True,
                progress: bool = False, optimizer: str = "fire") -> None:
    """Relax every admitted material in one ``relax_many`` call (``optimizer``: its ``optimizer=``); replace its
    structure by the relaxed one.

    A failed relaxation marks the material failed; an unconverged one keeps going with
    ``relax_converged=False`` (reported in its result).
    """
    todo = [m for m in materials if m.ok]
    if not todo:
        return
    if relax_cell:
        periodic = [bool(m.atoms.pbc.all()) for m in todo]
        cell_flags: bool | list[bool] = periodic
    else:
        cell_flags = False
    from geodite_sim.io.structures import Labeled

    # labelled with the material's own label, so a failure names the user's input (not its place among survivors)
    results = gs.relax_many([Labeled(m.atoms, m.label) for m in todo], model, fmax=fmax, max_steps=max_steps,
                            relax_cell=cell_flags, progress=progress, optimizer=optimizer)
    for m, r in zip(todo, results, strict=True):
        m.relax_steps = int(r.n_steps)
        if r.error is not None:
            m.fail(f"relaxation failed: {r.error}")
            continue
        m.relax_converged = bool(r.converged)
        atoms = r.structure.copy()
        atoms.calc = None
        m.atoms = atoms


def ion_relax_stage(cells: list[Atoms], model, *, fmax: float, max_steps: int, progress: bool = False,
                    labels: Sequence[str] | None = None,
                    optimizer: str = "fire") -> list[tuple[Atoms | None, float, bool, str | None]]:
    """Relax the ions of every cell at fixed cell (one ``relax_many`` call with ``optimizer``); ``labels`` name the
    cells in messages (e.g. ``"Si.cif strained e4=+0.01"``).

    Returns one ``(relaxed atoms, energy eV, converged, error)`` per cell, in order. (Stresses are
    taken by the callers from one batched ``evaluate`` of the relaxed cells: ``relax_many`` need not
    compute the stress of a fixed-cell relaxation.)
    """
    if not cells:
        return []
    from geodite_sim.io.structures import Labeled

    inputs = cells if labels is None else [Labeled(c, name) for c, name in zip(cells, labels, strict=True)]
    out = []
    for r in gs.relax_many(inputs, model, fmax=fmax, max_steps=max_steps, relax_cell=False, progress=progress,
                           optimizer=optimizer):
        if r.error is not None:
            out.append((None, math.nan, False, r.error))
        else:
            atoms = r.structure.copy()
            atoms.calc = None
            out.append((atoms, float(r.energy), bool(r.converged), None))
    return out


def safe_evaluate(cells: list[Atoms], owners: list[int], model, *, compute_stress: bool = True,
                  max_atoms: int | None = None, labels: Sequence[str] | None = None,
                  **options: Any) -> tuple[list[dict | None], dict[int, str]]:
    """``evaluate`` all cells in one call; a cell that fails marks its owner failed, the others are kept.

    Args:
        cells: the structures. owners: for each cell, the id of the material it belongs to.
        labels: names of the cells in messages (e.g. ``"Au2 at r = 0.010 Å"``; default: their place in ``cells``).
        options: further ``evaluate`` keywords.
    Returns:
        (one result dict or None per cell, {owner: error message} for owners with a failed cell).
    """
    if not cells:
        return [], {}

    from geodite_sim.io.structures import Labeled

    def run(subset: list) -> list[dict]:
        return list(gs.evaluate(subset, model, max_atoms=max_atoms, compute_stress=compute_stress, **options))

    if labels is not None:
        cells = [Labeled(c, name) for c, name in zip(cells, labels, strict=True)]
    results: list[dict | None] = [None] * len(cells)
    errors: dict[int, str] = {}
    try:
        results = list(run(cells))
    except Exception:  # noqa: BLE001 - isolate the failing material below
        for owner in dict.fromkeys(owners):
            idx = [i for i, o in enumerate(owners) if o == owner]
            try:
                res = run([cells[i] for i in idx])
            except Exception as exc:  # noqa: BLE001
                errors[owner] = f"evaluation failed: {type(exc).__name__}: {exc}"
                continue
            for i, r in zip(idx, res, strict=True):
                results[i] = r
    for i, (owner, r) in enumerate(zip(owners, results, strict=True)):
        if r is not None and r.get("error"):
            errors.setdefault(owner, f"evaluation failed: {r['error']}")
            results[i] = None
    return results, errors


def check_finite(result: dict, keys: Sequence[str] = ("energy", "forces")) -> str | None:
    """Message when an evaluation result holds NaN/Inf, else None."""
    for k in keys:
        if k in result and not np.all(np.isfinite(result[k])):
            return f"non-finite {k} from the model"
    return None


def safe_name(label: str) -> str:
    """A file-name stem for a label (path separators and odd characters replaced)."""
    stem = Path(label).name if ("/" in label or "\\" in label) else label
    stem = re.sub(r"[^A-Za-z0-9._@+-]+", "_", stem).strip("._") or "structure"
    return stem[:120]


def file_stems(materials: list[Material], names: Sequence[str] | None) -> dict[int, str]:
    """Output file stem of each material: ``names`` when given, else its label made file-safe and unique."""
    if names is not None:
        return {m.index: names[m.index] for m in materials}
    stems, seen = {}, set()
    for m in materials:
        s = safe_name(m.label)
        if s in seen:
            s = f"{s}_{m.index}"
        seen.add(s)
        stems[m.index] = s
    return stems


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file then rename), so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=1))
    tmp.replace(path)


def save_record(record: PropertyRecord, out: Path, stem: str,
                extra: Callable[[Any, Path, str], None] | None = None) -> None:
    """Write ``out/<stem>.json`` (listed first in ``record.files``); ``extra(record, out, stem)`` writes the
    workflow's other files (plots, phonopy YAML) and lists them in ``record.files`` before the JSON is written."""
    out.mkdir(parents=True, exist_ok=True)
    record.files["json"] = str(out / f"{stem}.json")
    if extra is not None:
        extra(record, out, stem)
    write_json(out / f"{stem}.json", record.to_dict())


def finish_stage(materials: list[Material], errors: dict[int, str], make_record: Callable[[Material], Any], *,
                 desc: str, out_dir: str | Path | None = None, names: Sequence[str] | None = None,
                 extra: Callable[[Any, Path, str], None] | None = None, progress: bool = False) -> list:
    """The last stage of every per-material workflow: one record per material, in input order.

    A material with an entry in ``errors`` is failed first; ``make_record(material)`` builds its record (and
    records its own failures); with ``out_dir`` each record is saved by :func:`save_record` under its file stem.
    """
    from geodite_sim.progress import Progress

    out = Path(out_dir) if out_dir is not None else None
    stems = file_stems(materials, names)
    results = []
    bar = Progress(total=len(materials), desc=desc, unit="material", enabled=progress)
    try:
        for m in materials:
            if m.ok and m.index in errors:
                m.fail(errors[m.index])
            r = make_record(m)
            if out is not None:
                save_record(r, out, stems[m.index], extra)
            results.append(r)
            bar.finish("done" if r.status == DONE else "failed")
    finally:
        bar.close()
    return results


def formula_of(atoms: Atoms | None) -> str:
    return atoms.get_chemical_formula() if atoms is not None else ""


def base_fields(m: Material) -> dict[str, Any]:
    """The common record fields of a material."""
    return dict(index=m.index, label=m.label, formula=formula_of(m.atoms), n_atoms=len(m.atoms) if m.atoms else 0,
                error=m.error, status=FAILED if m.error else DONE, relax_converged=m.relax_converged,
                relax_steps=m.relax_steps)


def matplotlib_pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> str:
    """Lay out, save (creating the folder) and close ``fig``; returns the path as a string."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)
