"""The runner's configuration and bookkeeping types: admission budget (:class:`Capacity`), engine settings
(:class:`StepConfig`), per-step device checks (:class:`FailureChecks`), per-slot status (:class:`SlotStatus`),
what observers see at a check (:class:`CheckEvent`) and the one admission exception (:class:`AdmissionError`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from geodite_sim.status import Status

#: Two-level edge lists: smallest inner margin (Å) and the multiple of a system's last step it gets.
INNER_MIN_MARGIN, INNER_PACE_FACTOR = 0.05, 3.0


class AdmissionError(ValueError):
    """A structure that cannot start for a reason with its own status (raised by a job's ``per_system``)."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Capacity:
    """Admission budget of one packed batch: total real atoms and (optionally) systems.

    A structure larger than ``max_atoms`` still runs, alone. The default budget of a run comes from
    :func:`geodite_sim.runner.capacity.default_capacity` (one policy for every front-end).
    """

    max_atoms: int
    max_systems: int | None = None

    def fits(self, n_atoms: int, n_systems: int, extra_atoms: int) -> bool:
        if self.max_systems is not None and n_systems + 1 > self.max_systems:
            return False
        return n_atoms == 0 or n_atoms + extra_atoms <= self.max_atoms


@dataclass
class StepConfig:
    """Engine settings of a run (never stored on the model).

    Attributes:
        neighbor_backend: ``"auto"``, ``"triton"``, ``"alchemiops"`` or ``"torch"`` (builds at checks).
        skin: Verlet skin, Å (edges are built at cutoff + skin).
        check_interval: steps between checks (host reads); results do not depend on it.
        accelerate: ``"auto"`` (CUDA graph of the whole step on CUDA, eager elsewhere), ``"off"``/``"eager"``,
            ``"compile"`` (``torch.compile(fullgraph=True)`` of the step) or ``"cuda_graph"``.
        fused_kernels: Geodite's fused CPU edge kernels: ``"auto"`` or False (compile needs False).
        compile_options: extra ``torch.compile`` arguments in ``"compile"`` mode (e.g. ``{"backend": "aot_eager"}``).
        rebuild_every_check: rebuild every system's edges at every check (protocols that ask for a neighbour list
            rebuilt every step use this with ``check_interval=1``).
        inner_skin: two-level edge lists (``"auto"``: on when the step is neither compiled nor captured, a check
            comes every step and ``skin`` ≥ 0.3 Å, with 0.1 Å; a float: on, with that start margin, Å; None: off).
            The edges built by a neighbour search at ``cutoff + skin`` (the outer list) are filtered at every
            check, without a search, into the list the steps use: the pairs now within ``cutoff + m_s``, with a
            per-system margin ``m_s`` of :data:`INNER_PACE_FACTOR` × the system's pace per step × the check
            interval (at least :data:`INNER_MIN_MARGIN`; doubled for a parked one), so the model sees few shell
            edges while the outer list is rebuilt only when it can no longer supply ``m_s``. Trajectories do not
            depend on it (docs/runner.md).
        refill_fraction: admit queued structures at a check only once the systems retired since the last
            admission hold at least this fraction of the batch's atoms (or nothing runs): an admission is a model
            evaluation of its own, whose fixed cost does not shrink with the number of structures it starts.
        vacant_fraction: systems that retire at a check with nothing to admit leave their atoms in the batch
            (their slots vacated, their edges dropped: no model work on edges) until such vacant atoms would
            exceed this fraction of the batch's atoms; only then is the batch re-packed.
    """

    neighbor_backend: str = "auto"
    skin: float = 0.5
    check_interval: int = 1
    accelerate: str = "auto"
    fused_kernels: bool | str = "auto"
    compile_options: dict = field(default_factory=dict)
    rebuild_every_check: bool = False
    inner_skin: float | str | None = "auto"
    refill_fraction: float = 0.125
    vacant_fraction: float = 0.125


@dataclass
class FailureChecks:
    """Per-step device checks (None switches one off): non-finite outputs always; ``min_distance_factor``:
    two atoms closer than this × their covalent-radius sum; ``max_volume_ratio``: a cell-relaxing system whose
    volume leaves [V0 / r, r · V0]."""

    min_distance_factor: float | None = None
    max_volume_ratio: float | None = None


@dataclass
class SlotStatus:
    """Runner bookkeeping per slot ([S + 1]: the last row is the padding system), on the device.

    occupied: slot holds a system. parked: waits for an edge rebuild at the next check.
    code: 0 or a :class:`~geodite_sim.status.Status` device code. fail_step: the system's step at failure.
    fail_value: the offending value (distance ratio, volume ratio). horizon: steps a system may reach before
    the next check (frames, targets). volume0: cell volume at admission, Å³.
    """

    occupied: torch.Tensor
    parked: torch.Tensor
    code: torch.Tensor
    fail_step: torch.Tensor
    fail_value: torch.Tensor
    horizon: torch.Tensor
    volume0: torch.Tensor


@dataclass
class CheckEvent:
    """What observers see at a check: ``steps`` engine steps since the previous check, ``iteration`` in all,
    ``n_systems`` / ``n_atoms`` active during them, ``finished`` results retired at this check."""

    iteration: int
    steps: int
    n_systems: int
    n_atoms: int
    finished: list = field(default_factory=list)


__all__ = ["AdmissionError", "Capacity", "CheckEvent", "FailureChecks", "INNER_MIN_MARGIN", "INNER_PACE_FACTOR",
           "SlotStatus", "StepConfig"]
