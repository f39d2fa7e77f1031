"""Batched constraints on the device: ASE's ``FixAtoms``, ``FixCartesian`` and ``FixSymmetry`` (ASE 3.29).

Admission (host, once per structure; :mod:`geodite_sim.dynamics.constraint_admission`):
:func:`constraints_from_atoms` reads ``atoms.constraints`` (and builds a ``FixSymmetry`` with spglib when
asked) into an :class:`AtomConstraints`, or returns an error message naming the unsupported constraint
class. :meth:`BatchConstraints.from_list` packs many of them into tensors; every field is per atom
(leading dim N) or per system (leading dim S) and atom indices are *local* to their system, so
:meth:`BatchConstraints.select` /
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
from geodite_sim.dynamics.constraint_admission import (
    MAX_OPS,
    SUPPORTED,
    AtomConstraints,
    constraints_from_atoms,
    prep_symmetry,
)
from geodite_sim.state import PER, atom_field, system_field

#: ASE's ``FixSymmetry.adjust_cell`` refuses deformation-gradient steps larger than this.
MAX_DEFORM_STEP = 0.25
#: Error for a system flagged by :meth:`BatchConstraints.adjust_cell` (ASE raises RuntimeError there).
DEFORM_STEP_ERROR = ("FixSymmetry adjust_cell does not work properly with a deformation gradient step "
                     f"> {MAX_DEFORM_STEP} (as ASE, the relaxation stops)")


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


__all__ = ["MAX_DEFORM_STEP", "MAX_OPS", "SUPPORTED", "DEFORM_STEP_ERROR", "AtomConstraints", "BatchConstraints",
           "constraints_from_atoms", "prep_symmetry"]
