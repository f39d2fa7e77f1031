"""Batched constraints on the device: ASE's ``FixAtoms``, ``FixCartesian`` and ``FixSymmetry`` (ASE 3.29).

Admission (host, once per structure): :func:`constraints_from_atoms` reads ``atoms.constraints``
(and builds a ``FixSymmetry`` with spglib when asked) into an :class:`AtomConstraints`, or returns
an error message naming the unsupported constraint class. :meth:`BatchConstraints.from_list`
packs many of them into tensors; every field is per atom (leading dim N) or per system (leading
dim S) and atom indices are *local* to their system, so :meth:`BatchConstraints.select` /
:meth:`BatchConstraints.concat` (or :func:`geodite_sim.state.select_systems`-style generic
re-packing by the field metadata) follow the scheduler's re-packing.

Where ASE applies each constraint in ``FIRE(FrechetCellFilter(atoms))`` (and in plain ``FIRE(atoms)``),
and so where the runner must call these functions in one relaxation step::

    model(batch) -> forces, stress                         (raw model output)
    forces = C.adjust_forces(forces, batch)                ASE: atoms.get_forces()  (filter.get_forces)
    stress = C.adjust_stress(stress, batch)                ASE: atoms.get_stress()  (filter.get_forces)
        -> the Fréchet generalised forces, the fmax convergence test and the FIRE update all use
           these adjusted forces/stress (ASE's optimizer sees only the filter's constrained forces)
    fire_step / apply_displacement -> new_positions, new_cell   (unconstrained: C0 exp(X)ᵀ, F'(u + du))
    new_cell, too_large = C.adjust_cell(old_batch.cell, new_cell)
                                                           ASE: filter.set_positions -> atoms.set_cell(
                                                                newcell, scale_atoms=True) -> adjust_cell
    new_positions = C.adjust_positions(old_batch, new_positions, new_cell)
                                                           ASE: the atoms scaled with the (adjusted) cell
                                                                change, then atoms.set_positions(new) ->
                                                                adjust_positions (displacement relative to
                                                                the scaled old positions)

``old_batch`` is the batch *before* the step. FIRE's velocities are never projected (ASE does not
either). ``adjust_cell``/``adjust_positions`` leave bit-for-bit unchanged every system whose cell
and positions did not move (frozen/done systems), so they may be applied to the whole batch after
``fire_step``. The filter's X = log F and F state may be kept as ``apply_displacement`` returns them:
with symmetrised forces and stress the step is already symmetric, so the adjustment of the cell is a
rounding-level correction and ASE's ``logm`` of the adjusted cell differs from X by rounding only
(the tests compare with ASE to 1e-8 Å this way).

Molecular dynamics (FixAtoms/FixCartesian; ASE's MTK NPT refuses constraints): ASE's integrators call
``atoms.get_forces(md=True)`` (no force adjustment) but ``set_positions`` (fixed atoms stay) and
``set_momenta`` (fixed momenta zeroed) with constraints, and recompute p = m Δr / dt after the drift
(VelocityVerlet). Equivalent batched recipe: ``momenta = C.adjust_momenta(momenta, batch)`` after each
kick and on the initial momenta, ``positions = C.adjust_positions(old_batch, positions, cell)`` after
the drift; temperatures use 3 n - ``C.removed_dof`` degrees of freedom (ASE's ``get_temperature``).

Symmetry is stored factorised: spglib's operation list G of a supercell contains the pure
translations T (rotation = identity). The rank-1 symmetrisation (1/|G|) Σ_g R_g v[g⁻¹ j] equals the
mean over the translation orbit of each atom (T acts freely) followed by (1/|P|) Σ_p R_p v[p⁻¹ j]
over one operation per distinct rotation (|P| ≤ 48, the point-group order); rank 2 needs only P.
Shapes therefore stay static: :data:`MAX_OPS` = 48 operations per system, padded with the identity
at zero weight. Admission checks the factorisation against ASE's own ``symmetrize_rank1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from geodite_sim.batch import Batch, atom_indices
from geodite_sim.state import PER, atom_field, system_field

#: Point operations kept per system (the largest crystallographic point group, m-3m, has 48).
MAX_OPS = 48
#: ASE's ``FixSymmetry.adjust_cell`` refuses deformation-gradient steps larger than this.
MAX_DEFORM_STEP = 0.25
SUPPORTED = ("FixAtoms", "FixCartesian", "FixSymmetry")
#: Error for a system flagged by :meth:`BatchConstraints.adjust_cell` (ASE raises RuntimeError there).
DEFORM_STEP_ERROR = ("FixSymmetry adjust_cell does not work properly with a deformation gradient step "
                     f"> {MAX_DEFORM_STEP} (as ASE, the relaxation stops)")


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


def _rows_times(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """v_i @ m_i for rows v [N, 3] and matrices m [N, 3, 3]."""
    return (v[:, :, None] * m).sum(dim=1)


@dataclass
class BatchConstraints:
    """Constraints of a packed batch (N atoms, S systems), all tensors on the batch's device.

    Per atom: ``fixed_pre``/``fixed_post`` [N, 3] bool, ``perm`` [N, MAX_OPS] int64 and ``orbit`` [N]
    int64 (local indices within the atom's system). Per system: ``counts`` [S] atoms, ``rot`` [S, MAX_OPS,
    3, 3] fractional rotations (float, identity padding), ``weight`` [S, MAX_OPS] (1/P, 0 padding),
    ``n_trans`` [S] float, ``has_sym``/``sym_positions``/``sym_cell`` [S] bool, ``removed_dof`` [S] int64.
    ``any_fixed``/``any_sym``/``any_trans`` are host flags set at packing (no device reads) that skip work.
    """

    fixed_pre: torch.Tensor = atom_field()
    fixed_post: torch.Tensor = atom_field()
    perm: torch.Tensor = atom_field()
    orbit: torch.Tensor = atom_field()
    counts: torch.Tensor = system_field()
    rot: torch.Tensor = system_field()
    weight: torch.Tensor = system_field()
    n_trans: torch.Tensor = system_field()
    has_sym: torch.Tensor = system_field()
    sym_positions: torch.Tensor = system_field()
    sym_cell: torch.Tensor = system_field()
    removed_dof: torch.Tensor = system_field()
    any_fixed: bool = False
    any_sym: bool = False
    any_trans: bool = False

    # ------------------------------------------------------------------ packing
    @classmethod
    def from_list(
        cls, items: Sequence[AtomConstraints], dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> BatchConstraints:
        """Pack per-structure constraints (in batch order) into one host-to-device transfer per field."""
        if not items:
            raise ValueError("no structures to pack")
        n_tot = sum(c.n_atoms for c in items)
        perm = np.empty((n_tot, MAX_OPS), dtype=np.int64)
        rot = np.tile(np.eye(3), (len(items), MAX_OPS, 1, 1))
        weight = np.zeros((len(items), MAX_OPS))
        a = 0
        for s, c in enumerate(items):
            n, p = c.n_atoms, len(c.rotations)
            perm[a:a + n] = np.arange(n)[:, None]
            if p:
                perm[a:a + n, :p] = c.perm.T
                rot[s, :p] = c.rotations
                weight[s, :p] = 1.0 / p
            a += n
        dev = torch.device(device)

        def t(x, dt):
            return torch.as_tensor(np.asarray(x), dtype=dt, device=dev)

        return cls(
            fixed_pre=t(np.concatenate([c.fixed_pre for c in items]), torch.bool),
            fixed_post=t(np.concatenate([c.fixed_post for c in items]), torch.bool),
            perm=t(perm, torch.long),
            orbit=t(np.concatenate([c.orbit for c in items]), torch.long),
            counts=t([c.n_atoms for c in items], torch.long),
            rot=t(rot, dtype),
            weight=t(weight, dtype),
            n_trans=t([c.n_translations for c in items], dtype),
            has_sym=t([c.has_symmetry for c in items], torch.bool),
            sym_positions=t([c.has_symmetry and c.symmetrize_positions for c in items], torch.bool),
            sym_cell=t([c.has_symmetry and c.symmetrize_cell for c in items], torch.bool),
            removed_dof=t([c.removed_dof for c in items], torch.long),
            any_fixed=any(c.fixed_pre.any() or c.fixed_post.any() for c in items),
            any_sym=any(c.has_symmetry for c in items),
            any_trans=any(c.has_symmetry and c.n_translations > 1 for c in items),
        )

    @classmethod
    def none(cls, batch: Batch) -> BatchConstraints:
        """No constraints for ``batch`` (host read of the counts: call at packing time only)."""
        return cls.from_list([AtomConstraints.none(int(n)) for n in batch.atoms_per_system.tolist()],
                             batch.dtype, batch.device)

    @classmethod
    def padding(cls, counts: Sequence[int], dtype: torch.dtype, device) -> BatchConstraints:
        """No constraints for systems of ``counts`` atoms (the runner's empty slots and padding system)."""
        return cls.from_list([AtomConstraints.none(int(n)) for n in counts], dtype, device)

    @property
    def is_empty(self) -> bool:
        return not (self.any_fixed or self.any_sym)

    def _tensor_fields(self):
        return [f for f in fields(self) if f.metadata.get(PER)]

    def select(self, systems: Sequence[int] | torch.Tensor) -> BatchConstraints:
        """Constraints of ``systems`` only (in that order), as :meth:`Batch.select`."""
        idx = torch.as_tensor(systems, dtype=torch.long, device=self.counts.device)
        offsets = torch.zeros(self.counts.numel() + 1, dtype=torch.long, device=idx.device)
        offsets[1:] = torch.cumsum(self.counts, 0)
        atoms = atom_indices(offsets, idx)
        out = {f.name: getattr(self, f.name)[atoms if f.metadata[PER] == "atom" else idx]
               for f in self._tensor_fields()}
        # host flags stay conservative (a superset is harmless: the masks decide)
        return BatchConstraints(**out, any_fixed=self.any_fixed, any_sym=self.any_sym, any_trans=self.any_trans)

    @staticmethod
    def concat(parts: Sequence[BatchConstraints]) -> BatchConstraints:
        """Pack several batches' constraints into one (systems in order), as :meth:`Batch.concatenate`."""
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        out = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in parts[0]._tensor_fields()}
        return BatchConstraints(**out, any_fixed=any(p.any_fixed for p in parts),
                                any_sym=any(p.any_sym for p in parts), any_trans=any(p.any_trans for p in parts))

    # ------------------------------------------------------------------ symmetrisation kernels
    def _safe_cell(self, cell: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
        return torch.where(use[:, None, None], cell, eye)

    def symmetrize_vectors(self, v: torch.Tensor, cell: torch.Tensor, batch: Batch) -> torch.Tensor:
        """ASE's ``symmetrize_rank1``: v [N, 3] Cartesian per-atom vectors, cell [S, 3, 3] -> [N, 3].

        v_frac = v L⁻¹; mean over the translation orbit; y_j = (1/P) Σ_p R_p v_frac[perm_p(j)]; y L.
        Meaningful for systems with symmetry only (callers select those with ``has_sym``; the others
        get finite values computed with the identity cell).
        """
        n = v.shape[0]
        sys_idx = batch.system_index[:n]
        lat = self._safe_cell(cell, self.has_sym)
        inv = torch.linalg.inv_ex(lat)[0]
        x = _rows_times(v, inv[sys_idx])  # fractional components (ASE: inv_lattice.T @ forces.T)
        start = batch.offsets[:-1][sys_idx]
        if self.any_trans:
            orb = self.orbit + start
            sums = torch.zeros_like(x).index_add_(0, orb, x)
            x = sums.index_select(0, orb) / self.n_trans[sys_idx, None]
        k = self.perm.shape[1]
        src = (self.perm + start[:, None]).reshape(-1)  # [N K] global source atoms
        rw = (self.rot * self.weight[:, :, None, None]).permute(0, 2, 1, 3).reshape(-1, 9 * k)  # [S, 3 x 3K]
        m = rw.index_select(0, sys_idx).view(n, 3, 3 * k)
        y = torch.bmm(m, x.index_select(0, src).view(n, 3 * k, 1))[:, :, 0]
        return _rows_times(y, lat[sys_idx])  # ASE: (lattice.T @ sym).T

    def symmetrize_tensors(self, t: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """ASE's ``symmetrize_rank2``: L⁻¹ [(1/P) Σ_p R_pᵀ (L t Lᵀ) R_p] L⁻ᵀ for t [S, 3, 3], L = cell."""
        lat = self._safe_cell(cell, self.has_sym)
        inv = torch.linalg.inv_ex(lat)[0]
        scaled = lat @ t @ lat.transpose(1, 2)
        rw = self.rot * self.weight[:, :, None, None]
        sym = torch.einsum("skba,sbc,skcd->sad", rw, scaled, self.rot)
        return inv @ sym @ inv.transpose(1, 2)

    # ------------------------------------------------------------------ ASE's adjust_* methods
    def adjust_forces(self, forces: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Constrained forces [N, 3] (eV/Å) as ``atoms.get_forces()``: fixed components zeroed, FixSymmetry
        symmetrisation with the current cell ``batch.cell``, in the order of ``atoms.constraints``."""
        f = forces
        if self.any_fixed:
            f = torch.where(self.fixed_pre, 0.0, f)
        if self.any_sym:
            f = torch.where(self.has_sym[batch.system_index[: f.shape[0]], None],
                            self.symmetrize_vectors(f, batch.cell, batch), f)
        if self.any_fixed:
            f = torch.where(self.fixed_post, 0.0, f)
        return f

    def adjust_momenta(self, momenta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Constrained momenta [N, 3] as ``atoms.set_momenta`` (ASE's default: same as the forces)."""
        return self.adjust_forces(momenta, batch)

    def adjust_stress(self, stress: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Constrained stress [S, 3, 3] (eV/Å³, ASE sign) as ``atoms.get_stress()``: FixSymmetry systems get the
        rank-2 symmetrisation of the Voigt-symmetric stress with the current cell; others unchanged."""
        if not self.any_sym:
            return stress
        sym = self.symmetrize_tensors(0.5 * (stress + stress.transpose(1, 2)), batch.cell)
        sym = 0.5 * (sym + sym.transpose(1, 2))  # ASE returns Voigt: the symmetric part
        return torch.where(self.has_sym[:, None, None], sym, stress)

    def adjust_cell(self, old_cell: torch.Tensor, new_cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FixSymmetry's ``adjust_cell``: symmetrise the deformation-gradient step of [S, 3, 3] cells (Å).

        dF = (C_old⁻¹ C_new)ᵀ - I is symmetrised as a rank-2 tensor in the old cell's frame and
        C = C_old (I + sym dF)ᵀ. Returns (cell [S, 3, 3], too_large [S] bool): where max|dF| > 0.25 ASE
        raises RuntimeError, so the caller should fail those systems. Systems without a cell
        symmetry constraint, or whose cell did not change, get ``new_cell`` back bit for bit.
        """
        if not self.any_sym:
            return new_cell, torch.zeros(new_cell.shape[0], dtype=torch.bool, device=new_cell.device)
        act = self.sym_cell & (new_cell != old_cell).flatten(1).any(dim=1)
        lat = self._safe_cell(old_cell, act)
        eye = torch.eye(3, dtype=new_cell.dtype, device=new_cell.device)
        inv = torch.linalg.inv_ex(lat)[0]
        d_f = (inv @ new_cell).transpose(1, 2) - eye
        sym = self.symmetrize_tensors(d_f, lat)
        cell = lat @ (sym + eye).transpose(1, 2)
        too_large = act & (d_f.abs().flatten(1).amax(dim=1) > MAX_DEFORM_STEP)
        return torch.where(act[:, None, None], cell, new_cell), too_large

    def adjust_positions(self, old_batch: Batch, new_positions: torch.Tensor, new_cell: torch.Tensor) -> torch.Tensor:
        """Constrained positions [N, 3] (Å) after a step, as ASE's ``set_cell(scale_atoms=True)`` then
        ``set_positions`` with constraints.

        ``old_batch``: positions and cell before the step; ``new_cell``: the cell after
        :meth:`adjust_cell`. The reference is the old positions scaled by C_old⁻¹ C_new (the old
        positions themselves where the cell is unchanged); fixed components are set to it and the
        FixSymmetry displacement (new - reference) is symmetrised with the new cell.
        """
        if self.is_empty:
            return new_positions
        old, old_cell = old_batch.positions[: new_positions.shape[0]], old_batch.cell
        sys_idx = old_batch.system_index[: new_positions.shape[0]]
        changed = (new_cell != old_cell).flatten(1).any(dim=1)
        lat = self._safe_cell(old_cell, changed)
        scale = torch.linalg.inv_ex(lat)[0] @ torch.where(changed[:, None, None], new_cell, lat)
        ref = torch.where(changed[sys_idx, None], _rows_times(old, scale[sys_idx]), old)
        new = new_positions
        if self.any_fixed:
            new = torch.where(self.fixed_pre, ref, new)
        if self.any_sym:
            sym = ref + self.symmetrize_vectors(new - ref, new_cell, old_batch)
            new = torch.where(self.sym_positions[sys_idx, None], sym, new)
        if self.any_fixed:
            new = torch.where(self.fixed_post, ref, new)
        return new
