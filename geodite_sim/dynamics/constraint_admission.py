"""Admission of ASE constraints (host, once per structure): ``atoms.constraints`` (FixAtoms, FixCartesian,
FixSymmetry, or a FixSymmetry built with spglib on request) -> an :class:`AtomConstraints` of numpy tables, or a
message naming what is not supported. The device side, :class:`geodite_sim.dynamics.constraints.BatchConstraints`,
packs many of them; the module docstring there says where a step applies each constraint and how symmetry is
stored (factorised into translations and at most :data:`MAX_OPS` point operations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Point operations kept per system (the largest crystallographic point group, m-3m, has 48).
MAX_OPS = 48
#: Constraint classes admitted (ASE 3.29's).
SUPPORTED = ("FixAtoms", "FixCartesian", "FixSymmetry")


@dataclass
class AtomConstraints:
    """Constraints of one structure (host, numpy), as admitted by :func:`constraints_from_atoms`.

    Attributes:
        fixed_pre: [n, 3] bool, Cartesian components fixed by FixAtoms/FixCartesian applied *before*
            FixSymmetry in ``atoms.constraints`` (all of them when there is no FixSymmetry).
        fixed_post: [n, 3] bool, components fixed by constraints listed after FixSymmetry.
        rotations: [P, 3, 3] int fractional rotations, one per distinct rotation of the space group
            (P = 0: no symmetry constraint).
        perm: [P, n] int, ``perm[p, j]`` = the atom that operation p maps onto atom j (local index).
        orbit: [n] int, smallest local index of the atom's orbit under the pure translations.
        n_translations: pure translations m of the operation list (|G| = P · m).
        symmetrize_positions, symmetrize_cell: FixSymmetry's ``adjust_positions`` / ``adjust_cell``.
        removed_dof: degrees of freedom removed (ASE's sum of ``get_removed_dof``; FixSymmetry none).
        spacegroup: space-group number found at admission (None without symmetry).
        positions, cell: the symmetry-refined start structure (Å) when admission refined it
            (``fix_symmetry=True``, as ASE's ``FixSymmetry(atoms)`` does in place), else None.
    """

    n_atoms: int
    fixed_pre: np.ndarray
    fixed_post: np.ndarray
    rotations: np.ndarray
    perm: np.ndarray
    orbit: np.ndarray
    n_translations: int = 1
    symmetrize_positions: bool = True
    symmetrize_cell: bool = True
    removed_dof: int = 0
    spacegroup: int | None = None
    positions: np.ndarray | None = None
    cell: np.ndarray | None = None

    @classmethod
    def none(cls, n_atoms: int) -> AtomConstraints:
        """No constraint on a structure of ``n_atoms`` atoms."""
        no = np.zeros((n_atoms, 3), dtype=bool)
        return cls(n_atoms, no, no.copy(), np.zeros((0, 3, 3), dtype=np.int64),
                   np.zeros((0, n_atoms), dtype=np.int64), np.arange(n_atoms))

    @property
    def has_symmetry(self) -> bool:
        return len(self.rotations) > 0

    @property
    def is_empty(self) -> bool:
        return not (self.has_symmetry or self.fixed_pre.any() or self.fixed_post.any())


def _fixed_components(constraint, n: int) -> np.ndarray:
    """[n, 3] bool components fixed by a FixAtoms / FixCartesian."""
    idx = np.arange(n)[np.asarray(constraint.index, dtype=np.int64)]
    mask = np.zeros((n, 3), dtype=bool)
    comp = np.ones(3, dtype=bool) if type(constraint).__name__ == "FixAtoms" else np.asarray(constraint.mask, bool)
    mask[idx] |= comp[None, :]
    return mask


def _symmetry_tables(rotations, symm_map, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | str:
    """Factorise spglib's operation list into (distinct rotations, inverse maps, translation orbits, m)."""
    rot = np.asarray(rotations, dtype=np.int64)
    maps = np.asarray(symm_map, dtype=np.int64).reshape(len(rot), n)
    if (np.sort(maps, axis=1) != np.arange(n)).any():
        return "FixSymmetry: an operation does not map the atoms one-to-one (symprec too loose or too tight?)"
    keys: dict[bytes, int] = {}
    for k, r in enumerate(rot):
        keys.setdefault(r.tobytes(), k)
    reps = np.fromiter(keys.values(), dtype=np.int64)
    if len(reps) > MAX_OPS:
        return f"FixSymmetry: {len(reps)} distinct rotations > {MAX_OPS}"
    trans = np.flatnonzero((rot == np.eye(3, dtype=np.int64)).all(axis=(1, 2)))
    m = len(trans)
    if m == 0 or m * len(reps) != len(rot):
        return f"FixSymmetry: {len(rot)} operations are not {len(reps)} rotations x {m} pure translations"
    orbit = maps[trans].min(axis=0)
    if (np.bincount(orbit, minlength=n)[orbit] != m).any():
        return "FixSymmetry: the pure translations do not act freely on the atoms"
    perm = np.empty((len(reps), n), dtype=np.int64)
    for p, k in enumerate(reps):  # type: ignore[assignment]
        perm[p, maps[k]] = np.arange(n)
    return rot[reps], perm, orbit, m


def _check_factorisation(rotations, translations, symm_map, tables, n: int) -> str | None:
    """Compare the factorised rank-1 symmetrisation with ASE's on a random vector (fractional frame)."""
    from ase.spacegroup.symmetrize import symmetrize_rank1

    rot, perm, orbit, m = tables
    v = np.random.default_rng(0).standard_normal((n, 3))
    eye = np.eye(3)
    ref = symmetrize_rank1(eye, eye, v, rotations, translations, symm_map)
    sums = np.zeros((n, 3))
    np.add.at(sums, orbit, v)
    mean = sums[orbit] / m
    ours = np.einsum("pab,pjb->ja", rot, mean[perm]) / len(rot)
    if np.abs(ours - ref).max() > 1e-10 * max(1.0, np.abs(ref).max()):
        return "FixSymmetry: the operations do not form a group at this symprec (inconsistent atom maps)"
    return None


def prep_symmetry(atoms, symprec: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ASE's ``ase.spacegroup.symmetrize.prep_symmetry`` without its Python loops (a periodic k-d tree).

    Returns (rotations [G, 3, 3], translations [G, 3], symm_map [G, n]): the same spglib operations and
    the same nearest-image atom maps (argmin of the wrapped fractional distance) as ASE's loops.
    """
    from ase.spacegroup.symmetrize import spglib_get_symmetry_dataset
    from ase.utils import atoms_to_spglib_cell

    data = spglib_get_symmetry_dataset(atoms_to_spglib_cell(atoms), symprec=symprec)
    if data is None:
        raise ValueError(f"spglib found no symmetry dataset at symprec={symprec}")
    rot, trans = data.rotations.copy(), data.translations.copy()
    from scipy.spatial import cKDTree

    def wrap(x):
        x = np.mod(x, 1.0)
        return np.where(x >= 1.0, 0.0, x)

    # ASE: argmin_j |d - round(d)| with d = s_j - (R s_i + t) in fractional coordinates; a periodic
    # k-d tree (box 1) uses exactly this per-coordinate minimum-image metric.
    pos = atoms.get_scaled_positions()
    tree = cKDTree(wrap(pos), boxsize=1.0)
    new_p = np.einsum("gab,ib->gia", rot, pos) + trans[:, None, :]
    maps = tree.query(wrap(new_p.reshape(-1, 3)))[1].reshape(len(rot), len(pos)).astype(np.int64)
    return rot, trans, maps


def constraints_from_atoms(
    atoms, fix_symmetry: bool = False, symprec: float = 0.01, check: bool = True
) -> AtomConstraints | str:
    """The constraints of ``atoms`` (host side, once per structure), or an error message.

    Reads ``atoms.constraints``: ``FixAtoms``, ``FixCartesian`` (any number, in any order) and one
    ``FixSymmetry`` are supported; anything else returns a message naming the class. With
    ``fix_symmetry=True`` and no FixSymmetry present, one is built as ASE's ``FixSymmetry(atoms, symprec)``
    does: the symmetry of a copy is refined (``refine_symmetry``) and found with spglib; the refined
    positions and cell are returned in ``positions``/``cell`` and must be the start structure.
    ``check`` verifies the factorised symmetrisation against ASE's (cheap; O(|G| n)).
    """
    from ase.constraints import FixAtoms, FixCartesian, FixSymmetry

    n = len(atoms)
    out = AtomConstraints.none(n)
    cons = list(atoms.constraints)
    names = [type(c).__name__ for c in cons]
    for c, name in zip(cons, names, strict=True):
        if type(c) not in (FixAtoms, FixCartesian, FixSymmetry):  # exact classes: subclasses may differ
            return (f"unsupported constraint {name} (supported: {', '.join(SUPPORTED)}); "
                    "remove it or relax this structure with ASE")
    if names.count("FixSymmetry") > 1:
        return "more than one FixSymmetry constraint"
    # symmetry as (rotations, translations, symm_map, symprec, adjust_positions, adjust_cell)
    fs = next((c for c in cons if type(c) is FixSymmetry), None)
    sym = None if fs is None else (fs.rotations, fs.translations, fs.symm_map, fs.symprec,
                                   fs.do_adjust_positions, fs.do_adjust_cell)
    refined = None
    if sym is None and fix_symmetry:
        from ase.spacegroup.symmetrize import refine_symmetry

        if abs(np.linalg.det(atoms.cell[:])) < 1e-12:
            return "fix_symmetry needs a 3D cell (degenerate cell)"
        refined = atoms.copy()
        refined.set_constraint()
        try:  # what FixSymmetry(refined, symprec) does, with a vectorised prep_symmetry
            refine_symmetry(refined, symprec)
            sym = (*prep_symmetry(refined, symprec), symprec, True, True)
        except Exception as exc:  # spglib found nothing usable
            return f"fix_symmetry: symmetry search failed: {type(exc).__name__}: {exc}"
    seen_sym = False
    for c, name in zip(cons, names, strict=True):
        if name == "FixSymmetry":
            seen_sym = True
            continue
        try:
            comp = _fixed_components(c, n)
        except IndexError as exc:
            return f"{name}: atom index out of range for {n} atoms ({exc})"
        if seen_sym:
            out.fixed_post |= comp
        else:
            out.fixed_pre |= comp
        out.removed_dof += int(c.get_removed_dof(atoms))
    if sym is not None:
        rotations, translations, symm_map, sym_prec, adj_pos, adj_cell = sym
        start = refined if refined is not None else atoms
        if abs(np.linalg.det(np.asarray(start.cell[:]))) < 1e-12:
            return "FixSymmetry needs a 3D cell (degenerate cell)"
        if np.shape(symm_map) != (len(rotations), n):
            return f"FixSymmetry was built for {np.shape(symm_map)[-1]} atoms, the structure has {n}"
        tables = _symmetry_tables(rotations, symm_map, n)
        if isinstance(tables, str):
            return tables
        if check:
            msg = _check_factorisation(rotations, translations, symm_map, tables, n)
            if msg:
                return msg
        out.rotations, out.perm, out.orbit, out.n_translations = tables
        out.symmetrize_positions, out.symmetrize_cell = bool(adj_pos), bool(adj_cell)
        out.spacegroup = _spacegroup(start, sym_prec)
        if refined is not None:
            out.positions, out.cell = refined.positions.copy(), np.asarray(refined.cell[:]).copy()
    return out


def _spacegroup(atoms, symprec: float) -> int | None:
    from ase.spacegroup.symmetrize import check_symmetry

    data = check_symmetry(atoms, symprec=symprec)
    return None if data is None else int(data.number)
