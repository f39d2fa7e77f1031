"""Stability monitors: stop a system whose simulation has gone wrong, let the others run on.

Checks, all per system and evaluated on the device in one pass (the engine reads the
result back only at check intervals):

- ``nan``: non-finite positions, momenta, forces or energy.
- ``temperature``: instantaneous temperature above a per-system limit × target (systems with a
  target of 0 K are not checked). The limit is the larger of ``max_temperature_factor`` and a
  statistical bound: in equilibrium 3N·T/T0 follows a χ² law with 3N degrees of freedom, so
  T/T0 > χ²_{3N}.isf(p)/(3N) happens with probability ``p`` per check
  (:data:`RUNAWAY_TAIL_PROBABILITY`); for a two-atom cell that is ~11.6 × T0, for 100 atoms the
  fixed factor 4 applies. An ordinary fluctuation of a small cell no longer stops it.
- ``contact``: two atoms closer than ``min_distance_factor`` × the sum of their covalent
  radii (``ase.data.covalent_radii``), taken over the model's current edges.
- ``drift``: |conserved − conserved at step 0| / N above ``max_drift`` eV/atom (NVE and
  NHC; Langevin has no conserved quantity and is not checked).

A failed system keeps its frames so far; its result carries the reason in ``error``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from ase.data import covalent_radii
from ase.units import kB

from geodite_sim.core.graph import min_contact_ratio

#: Tail probability per check of the statistical temperature bound (a false stop in ~10^12 checks).
RUNAWAY_TAIL_PROBABILITY = 1e-12

#: Reason codes (bit flags) and their names.
NAN, TEMPERATURE, CONTACT, DRIFT = 1, 2, 4, 8
REASONS = {NAN: "non-finite positions, momenta, forces or energy", TEMPERATURE: "temperature runaway",
           CONTACT: "atoms too close", DRIFT: "conserved-quantity drift"}


@dataclass
class Monitors:
    """Thresholds of the stability checks (None switches a check off).

    Attributes:
        max_temperature_factor: stop when T > factor × target temperature.
        min_distance_factor: stop when a distance < factor × (r_cov,i + r_cov,j).
        max_drift: stop when |ΔE_conserved| / N_atoms > this, eV/atom.
        check_every: steps between checks (the engine also checks when a system finishes).
        max_volume_ratio: NPT ensembles: stop when V / V0 leaves [1/r, r] (V0: the volume at the start).
    """

    max_temperature_factor: float | None = 4.0
    min_distance_factor: float | None = 0.5
    max_drift: float | None = 0.5
    check_every: int = 10
    max_volume_ratio: float | None = 3.0

    def check(self, positions: torch.Tensor, momenta: torch.Tensor, forces: torch.Tensor, energy: torch.Tensor,
              numbers: torch.Tensor, system_index: torch.Tensor, atoms_per_system: torch.Tensor,
              temperature: torch.Tensor, kT: torch.Tensor, conserved: torch.Tensor | None,
              conserved0: torch.Tensor | None, edge_vectors: torch.Tensor | None = None,
              edge_receiver: torch.Tensor | None = None, edge_sender: torch.Tensor | None = None,
              temperature_factor: torch.Tensor | None = None) -> dict:
        """Per-system failure codes [S] (0 = fine; OR of reason flags) and the offending values.

        Shapes: positions/momenta/forces [N, 3], energy/temperature/kT/conserved [S], edges [E, 3] / [E].
        Returns ``{"code": [S] int64, "temperature": [S], "drift": [S] eV/atom, "min_ratio": [S]}``.
        """
        n_sys = energy.shape[0]
        code = torch.zeros(n_sys, dtype=torch.long, device=energy.device)
        finite_atom = torch.isfinite(positions).all(1) & torch.isfinite(momenta).all(1) & torch.isfinite(forces).all(1)
        bad_atoms = torch.zeros(n_sys, dtype=torch.long, device=energy.device)
        bad_atoms.index_add_(0, system_index, (~finite_atom).long())
        nan = (bad_atoms > 0) | ~torch.isfinite(energy)
        code |= nan.long() * NAN
        out = {"temperature": temperature}
        if self.max_temperature_factor is not None:
            target = kT / kB
            factor = self.max_temperature_factor if temperature_factor is None else temperature_factor
            hot = (target > 0) & (temperature > factor * target)
            code |= hot.long() * TEMPERATURE
        if self.max_drift is not None and conserved is not None and conserved0 is not None:
            drift = (conserved - conserved0).abs() / atoms_per_system.to(conserved.dtype)
            code |= (drift > self.max_drift).long() * DRIFT
            out["drift"] = drift
        if (self.min_distance_factor is not None and edge_vectors is not None and edge_sender is not None
                and edge_receiver is not None and edge_vectors.shape[0] > 0):
            radii = torch.as_tensor(covalent_radii, dtype=edge_vectors.dtype, device=edge_vectors.device)
            min_ratio = min_contact_ratio(edge_vectors, radii, numbers, edge_sender, edge_receiver, system_index,
                                          n_sys)
            code |= (min_ratio < self.min_distance_factor).long() * CONTACT
            out["min_ratio"] = min_ratio
        out["code"] = code
        return out

    def describe(self, code: int, values: dict, s: int, step: int) -> str:
        """Human-readable reason for system slot ``s`` (host-side values)."""
        parts = []
        if code & NAN:
            parts.append(REASONS[NAN])
        if code & TEMPERATURE:
            parts.append(f"temperature runaway: T = {float(values['temperature'][s]):.4g} K above the "
                         f"runaway limit (max of {self.max_temperature_factor} x target and the chi-square bound "
                         f"for the system's degrees of freedom)")
        if code & CONTACT:
            parts.append(f"atoms too close: distance {float(values['min_ratio'][s]):.3g} x covalent-radius sum "
                         f"< {self.min_distance_factor}")
        if code & DRIFT:
            parts.append(f"conserved-quantity drift {float(values['drift'][s]):.4g} eV/atom > {self.max_drift}")
        return f"stopped at step {step}: " + "; ".join(parts)


def temperature_limit_factor(monitors: Monitors, n_atoms: int, dof: int | None = None) -> float:
    """T/T0 above which a system of ``n_atoms`` atoms counts as running away: the larger of the monitors'
    ``max_temperature_factor`` and χ²_f.isf(p) / f with p = :data:`RUNAWAY_TAIL_PROBABILITY` and f = ``dof``
    degrees of freedom (default 3N; fewer under constraints) (host)."""
    if monitors.max_temperature_factor is None:
        return math.inf
    from scipy.stats import chi2

    dof = 3 * max(int(n_atoms), 1) if dof is None else max(int(dof), 1)
    return max(float(monitors.max_temperature_factor), float(chi2.isf(RUNAWAY_TAIL_PROBABILITY, dof)) / dof)
