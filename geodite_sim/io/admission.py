"""Admission checks: what every entry point verifies, on the host, once per input structure.

:func:`admit` converts one input (ASE ``Atoms``, pymatgen structure, file path) and checks that
it can be simulated; it never raises for a bad input. The :class:`Admission` it returns carries a
:class:`~geodite_sim.status.Status` (``None`` when admitted), a message naming the problem and the
input, and warnings. Checks, in order:

1. readable: a known input type; a file that exists, is not empty and parses (``UNREADABLE``);
2. non-empty: at least one atom (``INVALID_STRUCTURE``);
3. known elements: atomic numbers 1-118 (Z = 0, negative or >= 119 never crashes), and within the
   model's ``supported_elements`` when given (``UNSUPPORTED_ELEMENT``, or a warning with
   ``allow_unsupported_elements=True``);
4. finite positions, cell and momenta (``INVALID_STRUCTURE``);
5. a non-singular cell along the periodic axes: for a slab only the periodic lattice vectors must
   be independent (``INVALID_STRUCTURE``);
6. no two atoms (periodic images included) closer than ``min_distance_factor`` x the sum of their
   covalent radii (``ase.data.covalent_radii``) (``ATOMS_TOO_CLOSE``, with the distance in Å).

Labels (:func:`input_label`) are the file name for a path, otherwise ``"index:formula"``; building
one never fails, whatever the atomic numbers.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols, covalent_radii

from geodite_sim.io.readers import StructureError, to_atoms
from geodite_sim.status import Status

#: Atomic numbers with a name (hydrogen .. oganesson).
MAX_KNOWN_Z = 118
#: Relative threshold on the singular values of the periodic lattice vectors (and absolute floor, Å).
SINGULAR_RTOL = 1e-6


@dataclass
class Admission:
    """Outcome of :func:`admit` for one input.

    ``status`` is None when the input is admitted, otherwise the reason it is rejected;
    ``message`` names the problem and the input; ``warnings`` are non-fatal notes (e.g. an
    unsupported element allowed on request); ``atoms`` is the converted structure (None when it
    could not be read); ``label`` the input's name (file path or ``"index:formula"``).
    """

    status: Status | None
    message: str | None = None
    warnings: list[str] = field(default_factory=list)
    atoms: Any = None
    label: str = ""

    @property
    def ok(self) -> bool:
        """True when the input was admitted."""
        return self.status is None


def element_name(z: int) -> str:
    """Chemical symbol of atomic number ``z``, or ``"Z=<z>"`` when there is none (never raises)."""
    z = int(z)
    return chemical_symbols[z] if 1 <= z < len(chemical_symbols) else f"Z={z}"


def safe_formula(atoms: Any) -> str:
    """``atoms.get_chemical_formula()``, with ``[Z=<z>]`` for unknown elements; ``"empty"`` for no atoms.

    Never raises (ASE's own formula raises for Z >= 119 and misnames negative Z).
    """
    try:
        z = np.asarray(atoms.numbers).ravel()
        if z.size == 0:
            return "empty"
        if ((z >= 1) & (z <= MAX_KNOWN_Z)).all():
            return atoms.get_chemical_formula()
        counts = Counter(int(v) for v in z)
        parts = (element_name(v) if 1 <= v <= MAX_KNOWN_Z else f"[Z={v}]" for v in sorted(counts))
        return "".join(f"{p}{'' if counts[v] == 1 else counts[v]}" for p, v in zip(parts, sorted(counts)))
    except Exception:  # noqa: BLE001 - a label must never fail
        return type(atoms).__name__


def input_label(obj: Any, atoms: Any = None, index: int | None = None) -> str:
    """Human-readable name of an input: the path for a file, else ``"index:formula"`` (never raises)."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    prefix = "" if index is None else f"{index}:"
    if atoms is not None:
        return f"{prefix}{safe_formula(atoms)}"
    if isinstance(obj, Atoms):
        return f"{prefix}{safe_formula(obj)}"
    return f"{prefix}{type(obj).__name__}"


def _read(obj: Any) -> tuple[Any, str | None]:
    """(Atoms, None) or (None, why it could not be read)."""
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.exists():
            return None, "file not found"
        if path.is_dir():
            return None, "is a directory, not a structure file"
        try:
            if path.stat().st_size == 0:
                return None, "file is empty"
        except OSError as exc:
            return None, f"cannot access the file ({exc.strerror or exc})"
        if not os.access(path, os.R_OK):
            return None, "file is not readable (permission denied)"
    try:
        atoms = to_atoms(obj)
    except StructureError as exc:
        msg = str(exc)
        if isinstance(obj, (str, os.PathLike)):  # to_atoms names the path; the label already does
            msg = msg.replace(f"could not read {Path(obj)}: ", "could not read the file: ")
        return None, msg
    except Exception as exc:  # noqa: BLE001 - any conversion failure is this input's problem
        return None, f"could not convert the input: {type(exc).__name__}: {exc}"
    if not isinstance(atoms, Atoms):
        return None, f"reading gave {type(atoms).__name__}, not a structure"
    return atoms, None


def _as_z_set(elements: Iterable[int | str]) -> set[int]:
    out = set()
    for e in elements:
        out.add(atomic_numbers[e] if isinstance(e, str) else int(e))
    return out


def _check_cell(cell: np.ndarray, pbc: np.ndarray) -> str | None:
    if not pbc.any():
        return None
    periodic = cell[pbc]
    sv = np.linalg.svd(periodic, compute_uv=False)
    lengths = np.linalg.norm(periodic, axis=1)
    axes = "".join("abc"[k] for k in range(3) if pbc[k])
    if lengths.min() < SINGULAR_RTOL:
        k = int(np.flatnonzero(pbc)[int(np.argmin(lengths))])
        return f"singular cell: periodic lattice vector {'abc'[k]} has zero length (pbc={pbc.tolist()})"
    if sv.min() < SINGULAR_RTOL * max(1.0, float(sv.max())):
        kind = "cell volume is zero" if pbc.all() else f"periodic lattice vectors {', '.join(axes)} are not independent"
        return f"singular cell: {kind} (pbc={pbc.tolist()}, vectors {np.round(periodic, 6).tolist()} Å)"
    return None


def _pairs_small(atoms: Any, radii: np.ndarray, max_work: int) -> tuple | None:
    """(i, j, d) of every pair closer than radii[i] + radii[j], images included, by enumeration (numpy);
    None when the enumeration would exceed ``max_work`` pair-image distances (then ASE's cell list runs)."""
    n = len(atoms)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell[:], dtype=float)
    rc = 2.0 * float(radii.max())
    # rows: the periodic lattice vectors, completed by unit vectors normal to them (non-periodic axes)
    m = np.eye(3)
    if pbc.any():
        p = cell[pbc]
        _, _, vt = np.linalg.svd(p)
        normals = vt[p.shape[0]:]
        m[pbc] = p
        m[~pbc] = normals
    # a pair vector shorter than rc has |fractional coordinate| < rc / plane spacing along each axis, so
    # around the nearest image by rounding, |shift| <= floor(rc / spacing + 0.5) covers every candidate
    recip = np.linalg.norm(np.linalg.inv(m).T, axis=1)  # 1 / plane spacing per axis
    reach = np.where(pbc, np.floor(rc * recip + 0.5).astype(int), 0)
    n_images = int(np.prod(2 * reach + 1))
    if n * n * n_images > max_work:
        return None
    frac = atoms.positions @ np.linalg.inv(m)
    dfrac = frac[None, :, :] - frac[:, None, :]  # [N, N, 3]: j - i
    dfrac[..., pbc] -= np.round(dfrac[..., pbc])  # nearest image by fractional rounding, in [-0.5, 0.5]
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    shifts = np.stack([g.ravel() for g in grids], axis=1).astype(float)  # [I, 3]
    d = (dfrac[:, :, None, :] + shifts[None, None, :, :]) @ m  # [N, N, I, 3]
    dist = np.linalg.norm(d, axis=-1)
    zero = np.all(shifts == 0, axis=1)
    dist[np.arange(n), np.arange(n), np.flatnonzero(zero)[0]] = np.inf  # an atom with itself
    close = dist < (radii[:, None] + radii[None, :])[:, :, None]
    i, j, k = np.nonzero(close)
    return i, j, dist[i, j, k]


def closest_pair(atoms: Any, factor: float, max_work: int = 100_000) -> tuple[int, int, float, float] | None:
    """The pair (i, j, distance Å, threshold Å) with the smallest distance / threshold ratio among pairs
    closer than ``factor`` x the sum of their covalent radii (periodic images included), or None.

    Small structures are enumerated with numpy (pair x image distances up to ``max_work``); larger
    ones use ``ase.neighborlist.neighbor_list`` with per-atom cutoffs.
    """
    z = np.asarray(atoms.numbers)
    radii = factor * covalent_radii[z]
    if len(atoms) < 2 and not np.asarray(atoms.pbc).any():
        return None
    found = _pairs_small(atoms, radii, max_work) if max_work > 0 else None
    if found is None:
        from ase.neighborlist import neighbor_list

        found = neighbor_list("ijd", atoms, radii, self_interaction=False)
    i, j, d = found
    if i.size == 0:
        return None
    thresh = radii[i] + radii[j]
    k = int(np.argmin(d / thresh))
    return int(i[k]), int(j[k]), float(d[k]), float(thresh[k])


def admit(
    atoms: Any,
    *,
    supported_elements: Iterable[int | str] | None = None,
    allow_unsupported_elements: bool = False,
    min_distance_factor: float | None = 0.5,
    require_momenta_finite: bool = True,
    label: str | None = None,
    index: int | None = None,
    model_name: str | None = None,
) -> Admission:
    """Convert and check one input structure; never raises for a bad input.

    Args:
        atoms: ASE Atoms, pymatgen Structure/Molecule or a file path (anything ``ase.io.read`` reads;
            last frame). Anything else is rejected as ``UNREADABLE``.
        supported_elements: atomic numbers (or symbols) the model can evaluate; None: any of 1-118.
        allow_unsupported_elements: report an element outside ``supported_elements`` as a warning
            instead of rejecting the input.
        min_distance_factor: reject two atoms closer than this x the sum of their covalent radii
            (periodic images included); None switches the check off.
        require_momenta_finite: reject NaN/Inf momenta (ASE ``momenta`` array, when present).
        label: the input's name in messages (default :func:`input_label`: file path or ``"index:formula"``).
        index: the input's position in its stream (used in the default label).
        model_name: the model named in an unsupported-element message.
    Returns:
        :class:`Admission`: ``status`` None and ``atoms`` set when admitted; otherwise the
        :class:`Status` and a message ``"<label>: <problem>"``.
    """
    obj = atoms
    conv, why = _read(obj)
    name = label if label is not None else input_label(obj, conv, index)

    def reject(status: Status, problem: str, warns: list[str] | None = None) -> Admission:
        return Admission(status, f"{name}: {problem}" if name else problem, warns or [], conv, name)

    if conv is None:
        return reject(Status.UNREADABLE, why or "could not be read")
    assert isinstance(conv, Atoms)
    warns: list[str] = []
    n = len(conv)
    if n == 0:
        return reject(Status.INVALID_STRUCTURE, "empty structure (0 atoms)")

    z = np.asarray(conv.numbers)
    unknown = sorted({int(v) for v in z if not 1 <= int(v) <= MAX_KNOWN_Z})
    if unknown:
        listed = ", ".join(f"Z={v}" for v in unknown)
        return reject(Status.UNSUPPORTED_ELEMENT, f"unknown element {listed} (atomic numbers run 1-{MAX_KNOWN_Z})")
    if supported_elements is not None:
        allowed = _as_z_set(supported_elements)
        bad = sorted({int(v) for v in z} - allowed)
        if bad:
            who = f"model {model_name!r}" if model_name else "the model"
            problem = f"unsupported element {', '.join(element_name(v) for v in bad)}: not supported by {who}"
            if not allow_unsupported_elements:
                return reject(Status.UNSUPPORTED_ELEMENT, problem)
            warns.append(f"{name + ': ' if name else ''}{problem} (allowed on request; its results are not meaningful)")

    pos = np.asarray(conv.positions, dtype=float)
    if pos.shape != (n, 3):
        return reject(Status.INVALID_STRUCTURE, f"positions have shape {pos.shape}, expected ({n}, 3)")
    bad_rows = np.flatnonzero(~np.isfinite(pos).all(axis=1))
    if bad_rows.size:
        return reject(Status.INVALID_STRUCTURE, f"positions contain NaN or Inf (atom {int(bad_rows[0])}"
                      + (f" and {bad_rows.size - 1} more)" if bad_rows.size > 1 else ")"))
    cell = np.asarray(conv.cell[:], dtype=float)
    if not np.isfinite(cell).all():
        return reject(Status.INVALID_STRUCTURE, "cell contains NaN or Inf")
    if require_momenta_finite and conv.has("momenta"):
        mom = np.asarray(conv.get_momenta(), dtype=float)
        bad_rows = np.flatnonzero(~np.isfinite(mom).all(axis=1))
        if bad_rows.size:
            return reject(Status.INVALID_STRUCTURE, f"momenta contain NaN or Inf (atom {int(bad_rows[0])}"
                          + (f" and {bad_rows.size - 1} more)" if bad_rows.size > 1 else ")"))
    pbc = np.asarray(conv.pbc, dtype=bool)
    problem = _check_cell(cell, pbc)  # type: ignore[assignment]
    if problem:
        return reject(Status.INVALID_STRUCTURE, problem)

    if min_distance_factor is not None and min_distance_factor > 0:
        pair = closest_pair(conv, float(min_distance_factor))
        if pair is not None:
            i, j, d, t = pair
            syms = element_name(z[i]), element_name(z[j])
            what = f"atom {i} ({syms[0]}) and its periodic image" if i == j else \
                f"atoms {i} ({syms[0]}) and {j} ({syms[1]})"
            return reject(Status.ATOMS_TOO_CLOSE,
                          f"atoms too close: {what} are {d:.3f} Å apart, closer than {min_distance_factor:g} x "
                          f"the sum of their covalent radii ({t:.3f} Å)")
    return Admission(None, None, warns, conv, name)


def model_elements(model: Any) -> tuple[set[int] | None, str | None]:
    """(atomic numbers ``model`` can evaluate or None for no restriction, its display name).

    The model contract's ``supported_elements`` when declared; otherwise, for a model with an
    embedding table (``config.max_z``, e.g. Geodite), Z = 1..max_z-1. ``(None, None)`` for no model.
    """
    if model is None:
        return None, None
    from geodite_sim.model import contract

    declared = contract.supported_elements(model)
    name = contract.model_name(model)
    if declared is not None:
        return set(declared), name
    cfg = getattr(contract.unwrap(model), "config", None)
    max_z = getattr(cfg, "max_z", None)
    if isinstance(max_z, int) and max_z > 1:
        return set(range(1, max_z)), name
    return None, name


__all__ = ["Admission", "admit", "closest_pair", "element_name", "input_label", "model_elements", "safe_formula"]
